"""The InstructGPT pipeline through the real stack, small: SFT and the reward model on a ZeRO-3
trainer group, PPO against the learned reward model, then the evaluation on vLLM engines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from rlhf_dist.pipeline import STAGES
from tests.conftest import REPO
from tests.wandb_reader import read_offline_run

pytestmark = pytest.mark.slow

SMALL = [
    "data.num_builtin_sft=256", "data.num_builtin_pairs=256", "sft.epochs=1", "rm.epochs=1", "total_steps=2",
    "eval.num_prompts=16", "eval.every_steps=1", "rollout.batch_size=32", "algo.minibatch_size=32",
    "trainer=zero3", "logger=wandb", "logger.mode=offline", "logger.progress_bar=false",
]


def test_pipeline_runs_every_stage_and_resumes(tiny_policy, tmp_path):
    out = tmp_path / "pipeline"
    cmd = [sys.executable, "-m", "rlhf_dist.pipeline", f"hydra.run.dir={out}", *SMALL]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]

    stages = {s: json.loads((out / s / "summary.json").read_text()) for s in STAGES}
    assert all(s["status"] == "completed" for s in stages.values())
    # SFT learned the demonstrations: held-out loss went down
    assert stages["sft"]["sft/final_eval_loss"] < stages["sft"]["sft/initial_eval_loss"]
    # artifacts are Hugging Face directories with safetensors weights, nothing pickled
    for model_dir in (out / "sft" / "model", out / "reward_model" / "model", out / "ppo" / "policy"):
        assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
        assert (model_dir / "tokenizer.json").is_file() and not list(model_dir.glob("*.bin"))
    norm = json.loads((out / "reward_model" / "model" / "reward_normalization.json").read_text())
    assert norm["std"] > 0 and norm["source"] == "held-out"
    # PPO's reward was the learned reward model, and its start and reference were the SFT model
    ppo_config = read_offline_run(out / "ppo" / "wandb")["config"]
    assert ppo_config["reward"]["function_weight"] == 0 and ppo_config["reward"]["model_weight"] == 1
    assert ppo_config["reward"]["model_path"] == str(out / "reward_model" / "model")
    assert ppo_config["model"]["path"] == str(out / "sft" / "model")

    report = json.loads((out / "evaluate" / "eval.json").read_text())
    sft, ppo = report["policies"]["sft"], report["policies"]["ppo"]
    assert report["baseline"] == "sft" and report["num_prompts"] == 16
    # the baseline against itself: same samples, so an even win rate and zero KL, exactly
    assert sft["win_rate"] == 0.5 and sft["kl_to_baseline"] == 0.0
    assert 0.0 <= ppo["win_rate"] <= 1.0 and ppo["kl_to_baseline"] != 0.0  # PPO moved the policy
    assert {"gold_mean", "reward_mean", "response_length"} <= set(ppo)
    assert report["samples"] and {"prompt", "sft", "ppo"} == set(report["samples"][0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/ppo/win_rate"] == ppo["win_rate"] and summary["rm/accuracy_ceiling"] == pytest.approx(0.9)

    # every stage is a W&B run of one group; the evaluation logged its sample table, and PPO one
    # per held-out evaluation (before training and after each of its 2 steps)
    runs = {s: read_offline_run(out / s / "wandb") for s in STAGES}
    assert len({r["group"] for r in runs.values()}) == 1
    for stage in ("evaluate", "ppo"):
        assert any(row.get("eval/samples._type") == "table-file" for row in runs[stage]["history"]), stage
    ppo_samples = [json.loads(line) for line in (out / "ppo" / "eval_samples.jsonl").read_text().splitlines()]
    assert sorted({s["after_steps"] for s in ppo_samples}) == [0, 1, 2]
    assert all(isinstance(s["gold"], float) and s["response"] is not None for s in ppo_samples)

    # the same command again continues: completed stages are reused, nothing is re-run
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already completed") == len(STAGES)
    assert json.loads((out / "summary.json").read_text())["eval/ppo/win_rate"] == ppo["win_rate"]


def test_stage_errors_are_one_line(tmp_path):
    cases = [
        (["rlhf_dist.sft", "sft.batch_size=31"], 2, "sft.batch_size=31: must be divisible by trainer.world_size=2"),
        (["rlhf_dist.reward_model", f"data.preferences={tmp_path}/missing.jsonl"], 1,
         "data.preferences="),
        (["rlhf_dist.evaluate"], 2, "eval.policies={}: name the policies"),
        (["rlhf_dist.pipeline", "reward.model_weight=0", "reward.function_weight=1"], 2,
         "reward.model_weight=0.0: the pipeline's PPO optimises the learned reward model"),
    ]
    for i, (args, code, message) in enumerate(cases):
        proc = subprocess.run([sys.executable, "-m", *args, f"hydra.run.dir={tmp_path / str(i)}"], cwd=REPO,
                              capture_output=True, text=True, check=False, timeout=300)
        assert proc.returncode == code, (args, proc.stderr[-2000:])
        lines = [line for line in proc.stderr.splitlines() if line.startswith("rlhf_dist:")]
        assert len(lines) == 1 and message in lines[0], (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
