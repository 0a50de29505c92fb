"""The command line as users run it: a Hydra multirun sweep over two KL coefficients, with
ZeRO-3 and W&B offline, each job in its own output dir and W&B run, grouped."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.wandb_reader import read_offline_run

pytestmark = pytest.mark.slow


def test_multirun_sweep_zero3_wandb_offline(tiny_policy, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [
        sys.executable, "-m", "rlhf_dist.train", "-m", "algo.kl_coef=0.0,0.2",
        "trainer=zero3", "logger=wandb", "logger.mode=offline", "total_steps=2",
        "rollout.batch_size=16", "algo.minibatch_size=8", "trainer.micro_batch_size=4",
        f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]

    groups = set()
    for job, kl_coef in ((0, 0.0), (1, 0.2)):
        out = sweep_dir / str(job)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [0, 1]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["steps"] == 2

        run = read_offline_run(out / "wandb")
        assert run["config"]["algo"]["kl_coef"] == kl_coef
        assert run["config"]["trainer"]["zero_stage"] == 3
        logged = [h for h in run["history"] if "reward/mean" in h]
        assert [h["_step"] for h in logged] == [0, 1]
        for h, r in zip(logged, rows):
            assert h["reward/mean"] == pytest.approx(r["reward/mean"], abs=1e-9)
            assert h["kl/mean"] == pytest.approx(r["kl/mean"], abs=1e-9)
        groups.add(run["group"])
    assert groups == {sweep_dir.name}  # both jobs in one W&B group
