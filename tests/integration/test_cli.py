"""The command line as users run it: Hydra sweeps (the basic sweeper over two KL coefficients
with ZeRO-3, and a two-trial Optuna search), W&B offline, each job in its own output dir and W&B
run, grouped, and a summary table of the trials at the end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

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

    summary_rows = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert sorted(r["job"] for r in summary_rows) == ["0", "1"]
    assert all(r["status"] == "completed" and r["objective"] == "reward/last_fifth_mean" for r in summary_rows)
    assert summary_rows[0]["value"] >= summary_rows[1]["value"]  # best first
    assert "algo.kl_coef=0.2" in (sweep_dir / "sweep_summary.md").read_text()


def test_optuna_sweep_two_trials(tiny_policy, tmp_path):
    sweep_dir = tmp_path / "optuna"
    cmd = [
        sys.executable, "-m", "rlhf_dist.train", "-m", "+sweep=optuna_ppo", "hydra.sweeper.n_trials=2",
        "total_steps=2", "rollout.batch_size=16", "algo.minibatch_size=8", "trainer.micro_batch_size=4",
        "logger=wandb", "logger.mode=offline", "logger.progress_bar=false",
        f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]

    values, groups, searched = {}, set(), set()
    for job in ("0", "1"):
        summary = json.loads((sweep_dir / job / "summary.json").read_text())
        assert summary["status"] == "completed"
        values[job] = summary["reward/last_fifth_mean"]
        run = read_offline_run(sweep_dir / job / "wandb")
        groups.add(run["group"])
        searched.add((run["config"]["algo"]["kl_coef"], run["config"]["trainer"]["lr"]))
        assert 0.0 <= run["config"]["algo"]["kl_coef"] <= 0.2 and 1e-4 <= run["config"]["trainer"]["lr"] <= 2e-3
    assert len(searched) == 2 and groups == {sweep_dir.name}  # two different trials, one W&B group
    # Optuna received each trial's objective and reports the best one
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(values.values()))
    rows = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [r["value"] for r in rows] == pytest.approx(sorted(values.values(), reverse=True))
