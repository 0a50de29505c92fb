"""README command 1's job, as is: the default config must visibly raise the reward."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

# The README promises: mean reward of the last fifth of the steps above the first fifth by > 0.3.
README_MARGIN = 0.3


def test_default_run_raises_reward(tiny_policy, tmp_path):
    cmd = [sys.executable, "-m", "rlhf_dist.train", f"hydra.run.dir={tmp_path}", "logger.progress_bar=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert summary["reward/improvement"] > README_MARGIN, summary
    assert summary["reward/last_fifth_mean"] - summary["reward/first_fifth_mean"] == pytest.approx(
        summary["reward/improvement"]
    )
