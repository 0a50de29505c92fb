"""rlhf_dist.driver.run_logger: the run summary arithmetic, metrics.jsonl per step, refusing a used directory.
How a resumed run's logs continue is tested with the checkpoints (test_checkpoint.py)."""

from __future__ import annotations

import json

import pytest

from rlhf_dist.config import LoggerConfig
from rlhf_dist.driver.run_logger import RunLogger, summarize


def test_summarize_fifths():
    # 10 steps -> a fifth is 2 steps. Rewards 0..9: first fifth mean (0+1)/2 = 0.5,
    # last fifth mean (8+9)/2 = 8.5, improvement 8.0.
    history = [{"step": i, "reward/mean": float(i)} for i in range(10)]
    s = summarize(history)
    assert (s["steps"], s["reward/first_fifth_mean"], s["reward/last_fifth_mean"]) == (10, 0.5, 8.5)
    assert s["reward/improvement"] == 8.0
    assert s["final"] == {"step": 9, "reward/mean": 9.0}
    # 3 steps -> floor(3/5) = 0, so a "fifth" is at least one step: first 0.0, last 2.0.
    s = summarize(history[:3])
    assert (s["reward/first_fifth_mean"], s["reward/last_fifth_mean"]) == (0.0, 2.0)


def test_run_logger_writes_jsonl_per_step_and_summary(tmp_path):
    logger = RunLogger(LoggerConfig(progress_bar=False), tmp_path, {}, total_steps=2, group="")
    logger.log(0, {"reward/mean": 0.25, "kl/mean": 0.0})
    # Written (line-buffered) before the run ends: a crash keeps finished steps.
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 0, "reward/mean": 0.25, "kl/mean": 0.0}
    logger.log(1, {"reward/mean": 0.75, "kl/mean": 0.1})
    summary = logger.finish("failed", error="RoleError: x")
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert (summary["status"], summary["error"], summary["reward/improvement"]) == ("failed", "RoleError: x", 0.5)


def test_run_logger_refuses_a_directory_that_holds_a_run(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    with pytest.raises(FileExistsError, match="already holds a run: choose another hydra.run.dir"):
        RunLogger(LoggerConfig(progress_bar=False), tmp_path, {}, total_steps=1, group="")
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'  # untouched
