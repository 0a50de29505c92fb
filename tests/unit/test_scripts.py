"""The launch scripts parse, and the GPU smoke test refuses a machine without a GPU in one line."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO

SCRIPTS = REPO / "scripts"


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
