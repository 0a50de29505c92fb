"""The InstructGPT pipeline through the real stack, small: SFT and the reward model on a ZeRO-3
trainer group, PPO against the learned reward model; a second round whose samples people rank
(exported, ranked, imported), continuing the reward model and the policy; then the evaluation on
vLLM engines."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_dist.pipeline import stage_plan
from tests.conftest import REPO
from tests.wandb_reader import read_offline_run

pytestmark = pytest.mark.slow

SMALL = [
    "data.num_builtin_sft=256", "data.num_builtin_pairs=256", "sft.epochs=1", "rm.epochs=1", "total_steps=2",
    "eval.num_prompts=16", "eval.every_steps=1", "rollout.batch_size=32", "algo.minibatch_size=32",
    "trainer=zero3", "logger=wandb", "logger.mode=offline", "logger.progress_bar=false",
]


def _rank_as_a_person(export: Path, ranked: Path) -> int:
    """What a labeller does with a round's export: each row's responses best first (here by the
    hidden annotator's score, equal scores a tie); a row whose responses all tie is left out."""
    from rlhf_dist.tasks.reviews import annotator_score

    lines = []
    for row in map(json.loads, export.read_text().splitlines()):
        scores = {r: annotator_score(row["prompt"], r) for r in row["responses"]}
        best_first = sorted(row["responses"], key=lambda r: -scores[r])
        levels = sorted(set(scores.values()), reverse=True)
        if len(levels) > 1:
            lines.append(json.dumps({"id": row["id"], "responses": best_first,
                                     "ranks": [levels.index(scores[r]) for r in best_first]}))
    ranked.write_text("\n".join(lines) + "\n")
    return len(lines)


def test_pipeline_two_rounds_with_people_ranking_round_2_resumes_mid_round(tiny_policy, tmp_path):
    out = tmp_path / "pipeline"
    rounds = ["pipeline.rounds=2", "pipeline.labeller=human", "pipeline.label_prompts=48", "checkpoint.every_steps=1"]
    cmd = [sys.executable, "-m", "rlhf_dist.pipeline", f"hydra.run.dir={out}", *SMALL, *rounds]
    # 1. Round 1, then round 2's samples exported for people to rank: the pipeline pauses (exit 3)
    #    with one line saying how to go on; run again, it pauses at once.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=1500)
    assert proc.returncode == 3, proc.stderr[-3000:]
    label_dir = out / "round_2" / "label"
    (paused,) = [line for line in proc.stderr.splitlines() if line.startswith("rlhf_dist:")]
    assert paused.startswith(f"rlhf_dist: paused: {label_dir / 'to_rank.jsonl'} waits for its rankings")
    assert f"hydra.run.dir={label_dir} pipeline.import_rankings=FILE" in paused
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert again.returncode == 3 and again.stdout.count("already completed") == 3, again.stderr[-2000:]

    # 2. A person ranks them; the import checks them against the export and completes the stage.
    ranked = tmp_path / "ranked.jsonl"
    count = _rank_as_a_person(label_dir / "to_rank.jsonl", ranked)
    imported = subprocess.run([sys.executable, "-m", "rlhf_dist.label", f"hydra.run.dir={label_dir}",
                               f"pipeline.import_rankings={ranked}"], cwd=REPO, capture_output=True, text=True,
                              check=False, timeout=300)
    assert imported.returncode == 0, imported.stderr[-2000:]
    label = json.loads((label_dir / "summary.json").read_text())
    assert label["status"] == "completed" and label["label/rankings"] == count > 20
    rankings = [json.loads(line) for line in (label_dir / "rankings.jsonl").read_text().splitlines()]
    assert {p for r in rankings for p in r["policies"]} == {"policy", "sft"}  # each response's writer, kept

    # 3. The pipeline goes on with round 2; its driver is killed once round 2's PPO has checkpointed
    #    a step. Run again, that PPO resumes from the checkpoint (mid-round 2) and the evaluation follows.
    round_2_ppo = out / "round_2" / "ppo"
    with (tmp_path / "killed.log").open("w") as log:
        killed = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 1200
        while not (round_2_ppo / "checkpoints" / "step_000001").exists():
            assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.1)
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    newest = max(p for p in (round_2_ppo / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert not (round_2_ppo / "summary.json").exists() or json.loads((round_2_ppo / "summary.json").read_text())[
        "status"] != "completed"
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("already completed") == 5  # round 1's three stages, round 2's label and reward model

    stages = {where: json.loads((out / where / "summary.json").read_text()) for _, _, where in stage_plan(2)}
    assert all(s["status"] == "completed" for s in stages.values())
    assert stages["round_2/ppo"]["resumed_from"] == str(newest)
    # SFT learned the demonstrations: held-out loss went down
    assert stages["sft"]["sft/final_eval_loss"] < stages["sft"]["sft/initial_eval_loss"]
    # artifacts are Hugging Face directories with safetensors weights, nothing pickled
    for model_dir in (out / "sft" / "model", out / "reward_model" / "model", out / "ppo" / "policy",
                      out / "round_2" / "reward_model" / "model", round_2_ppo / "policy"):
        assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()
        assert (model_dir / "tokenizer.json").is_file() and not list(model_dir.glob("*.bin"))
    norm = json.loads((out / "reward_model" / "model" / "reward_normalization.json").read_text())
    assert norm["std"] > 0 and norm["source"] == "held-out"
    # Round 1's PPO: reward the learned reward model, start and reference the SFT model. Round 2's:
    # the imported rankings continued round 1's reward model, PPO continued from round 1's policy
    # against it, its KL still to SFT.
    # (round 2's PPO was killed and resumed: two offline runs, the resumed one last)
    runs = {where: read_offline_run(out / where / "wandb", last=where == "round_2/ppo") for where in stages}
    ppo_config, ppo2_config = runs["ppo"]["config"], runs["round_2/ppo"]["config"]
    assert ppo_config["reward"]["function_weight"] == 0 and ppo_config["reward"]["model_weight"] == 1
    assert ppo_config["reward"]["model_path"] == str(out / "reward_model" / "model")
    assert ppo_config["model"]["path"] == str(out / "sft" / "model")
    rm2_config = runs["round_2/reward_model"]["config"]
    assert rm2_config["rm"]["init_path"] == str(out / "reward_model" / "model")
    assert rm2_config["data"]["preferences"] == str(label_dir / "rankings.jsonl")
    assert ppo2_config["model"]["path"] == str(out / "ppo" / "policy")
    assert ppo2_config["reference"]["path"] == str(out / "sft" / "model")
    assert ppo2_config["reward"]["model_path"] == str(out / "round_2" / "reward_model" / "model")

    report = json.loads((out / "evaluate" / "eval.json").read_text())
    sft, round_1, ppo = (report["policies"][name] for name in ("sft", "round_1", "ppo"))
    assert report["baseline"] == "sft" and report["num_prompts"] == 16
    # the baseline against itself: same samples, so an even win rate and zero KL, exactly
    assert sft["win_rate"] == 0.5 and sft["kl_to_baseline"] == 0.0
    for policy in (round_1, ppo):  # PPO moved the policy in each round
        assert 0.0 <= policy["win_rate"] <= 1.0 and policy["kl_to_baseline"] != 0.0
        assert {"gold_mean", "reward_mean", "response_length"} <= set(policy)
    assert report["samples"] and {"prompt", "sft", "round_1", "ppo"} == set(report["samples"][0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/ppo/win_rate"] == ppo["win_rate"] and summary["rm/accuracy_ceiling"] == pytest.approx(0.9)
    assert summary["round_2/label/rankings"] == count and "round_2/rm/eval_accuracy" in summary

    # every stage is a W&B run of one group; the evaluation logged its sample table, and PPO one
    # per held-out evaluation (before training and after each of its 2 steps)
    assert len({r["group"] for r in runs.values()}) == 1
    for stage in ("evaluate", "ppo"):
        assert any(row.get("eval/samples._type") == "table-file" for row in runs[stage]["history"]), stage
    ppo_samples = [json.loads(line) for line in (out / "ppo" / "eval_samples.jsonl").read_text().splitlines()]
    assert sorted({s["after_steps"] for s in ppo_samples}) == [0, 1, 2]
    assert all(isinstance(s["gold"], float) and s["response"] is not None for s in ppo_samples)

    # the same command again continues: completed stages are reused, nothing is re-run
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already completed") == len(stages)
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
