"""The package as pip installs it: every package listed, and a wheel that carries conf/ and runs.

conf/ stays at the top of the repository (where users and the docs look for it) and ships in the
package as ``rlhf_dist.conf`` (``pyproject.toml``); Hydra composes it from ``pkg://rlhf_dist.conf``
in a checkout and from an installed wheel alike.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

from tests.conftest import REPO


def _packages() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_the_package_list_names_every_package():
    # setuptools' find cannot see the mapped conf/, so the list is explicit: a new package must be on it.
    # hydra_plugins is a namespace package (no __init__.py, shared with other Hydra plugins): listed so
    # that an editable install maps its directory, where Hydra's plugin scan looks.
    on_disk = {".".join(p.parent.relative_to(REPO).parts)
               for top in ("rlhf_dist", "hydra_plugins") for p in (REPO / top).rglob("__init__.py")}
    assert set(_packages()) == on_disk | {"rlhf_dist.conf", "hydra_plugins"}
    assert not (REPO / "hydra_plugins" / "__init__.py").exists()  # it would hide every other Hydra plugin


def test_a_built_wheel_carries_the_configs_and_composes_them_when_installed(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("rlhf_dist", "conf", "hydra_plugins"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(wheels), str(source)], capture_output=True, text=True, check=False, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = wheels.glob("rlhf_dist-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"rlhf_dist/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                              "--target", str(target), str(wheel)], capture_output=True, text=True, check=False,
                             timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    # Run from elsewhere, the installed copy first on the path (the checkout's editable install behind it).
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import rlhf_dist.cli, rlhf_dist.conf as c; "
                            "print(rlhf_dist.cli.__file__); print(c.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert where.stdout.split() == [str(target / "rlhf_dist" / "cli.py"), str(target / "rlhf_dist" / "conf" / "__init__.py")], where.stderr
    job = subprocess.run([sys.executable, "-m", "rlhf_dist.train", "--cfg", "job", "algo=grpo"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert job.returncode == 0, job.stdout + job.stderr
    assert "estimator: grpo" in job.stdout  # conf/algo/grpo.yaml, read from the installed wheel
    # the wheel's launcher plugin is found by Hydra beside the others of the namespace (Optuna's sweeper)
    assert "hydra_plugins/rlhf_dist_ray_jobs/ray_jobs_launcher.py" in names and "hydra_plugins/__init__.py" not in names
    plugins = subprocess.run([sys.executable, "-m", "rlhf_dist.train", "--cfg", "hydra", "-p", "hydra",
                              "hydra/launcher=ray_jobs", "hydra/sweeper=optuna"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert plugins.returncode == 0, plugins.stdout + plugins.stderr
    assert "_target_: hydra_plugins.rlhf_dist_ray_jobs.ray_jobs_launcher.RayJobsLauncher" in plugins.stdout
    assert "_target_: hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper" in plugins.stdout
