"""Runs shared by several integration tests: each start of the roles costs about a minute of the
2 cores, so a run that can serve more than one check is made once per session."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DEFAULT_STEPS = 20  # README command 1 runs the schema's total_steps


@pytest.fixture(scope="session")
def default_run(tiny_policy, tmp_path_factory) -> Path:
    """README command 1 as is (the default config, 20 steps), once: its output directory.

    test_default_run checks its reward rise; test_reliability takes its first steps as the
    uninterrupted run that every resumed or recovered run must reproduce (total_steps and the
    checkpoint cadence are settings a run may change without changing its steps)."""
    out = tmp_path_factory.mktemp("default_run")
    cmd = [sys.executable, "-m", "rlhf_dist.train", f"hydra.run.dir={out}", "logger.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(DEFAULT_STEPS))
    return out
