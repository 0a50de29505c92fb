"""README command 1's job in bfloat16, through the real stack: vLLM serving bf16 weights, DeepSpeed's
bf16 mode (float32 master weights and optimizer state), the reference in bf16, the sync sending bf16.

On a CPU without bfloat16 instructions (no AMX / AVX-512 BF16) the same path runs, emulated and
slower; the run then says so in one line at start (``cluster.hardware``), which this test checks
whichever CPU CI has. A bf16 run must verify its engines at the bf16 tolerance, show bf16's
engine/trainer gap (above float32's ~1e-7, below that tolerance), and resume exactly: the resumed
step equals the uninterrupted one, value for value.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from rlhf_dist.cluster.hardware import cpu_bf16
from rlhf_dist.config.runtime import LOGPROB_TOLERANCE
from tests.integration.test_reliability import deterministic, run_job
from tests.integration.test_reliability import rows as metric_rows

pytestmark = pytest.mark.slow

BF16 = ["model.dtype=bfloat16", "total_steps=3", "checkpoint.every_steps=2", "logger.progress_bar=false"]


def _train(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_job(out, *BF16, *overrides)


def test_default_job_in_bfloat16_verifies_its_engines_and_resumes_exactly(tiny_policy, tmp_path):
    whole = _train(tmp_path / "whole")
    rows = metric_rows(tmp_path / "whole")
    assert [r["step"] for r in rows] == [0, 1, 2]
    emulated = cpu_bf16().known and not cpu_bf16().native
    assert ("model.dtype=bfloat16 on a CPU with no bfloat16 instructions" in whole.stderr) == emulated, (
        cpu_bf16().describe())
    # every sync (before steps 1 and 2) was verified (weight_sync.verify_every=1) at bf16's tolerance,
    # and its gap logged
    tol = LOGPROB_TOLERANCE["bfloat16"]
    assert all(0.0 < r["weight_sync/probe_gap"] < tol for r in rows[1:]), [r.get("weight_sync/probe_gap") for r in rows]
    # the engines sample in bf16 and the trainer scores in bf16: a real gap, far above float32's ~1e-7
    gaps = [r["logprob_gap/mean"] for r in rows]
    assert all(1e-5 < g < tol for g in gaps), gaps
    policy = json.loads((tmp_path / "whole" / "policy" / "config.json").read_text())
    assert policy["dtype"] == "bfloat16"

    checkpoint = tmp_path / "whole" / "checkpoints" / "step_000002"
    _train(tmp_path / "resumed", f"resume={checkpoint}")
    resumed = metric_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [2]
    assert deterministic(resumed[0]) == deterministic(rows[2])
