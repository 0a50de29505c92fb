"""Benchmark: the InstructGPT pipeline on the embedded task, and PPO without a KL penalty.

1. ``python -m rlhf_dist.pipeline`` with its defaults (SFT -> reward model -> PPO with the KL
   penalty -> evaluation), timed: reward-model held-out accuracy against the noise ceiling, and
   the PPO policy's win rate against SFT judged by the hidden annotator, with its KL.
2. PPO from the same SFT model against the same reward model with ``algo.kl_coef=0`` for
   ``--kl0-steps`` steps, evaluated on held-out prompts every 10 steps: the reward-model score
   (the proxy) and the hidden annotator's score (the gold metric) over steps, next to the
   pipeline's PPO run, to show over-optimisation of the proxy.
3. ``python -m rlhf_dist.evaluate`` of SFT, PPO and PPO (KL 0) side by side.

    .venv/bin/python scripts/bench_pipeline.py [--kl0-steps 150] [--out bench_out/pipeline]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
QUIET = ["logger.progress_bar=false"]


def command(module: str, run_dir: Path, *overrides: str, config_name: str = "pipeline") -> float:
    """Run one of the project's commands as a user would; returns its wall time."""
    cmd = [sys.executable, "-m", module, "--config-name", config_name, f"hydra.run.dir={run_dir}", *QUIET, *overrides]
    print("+", " ".join(cmd[1:]), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    return time.perf_counter() - start


def eval_curve(run_dir: Path) -> list[tuple[int, float, float, float]]:
    """(steps done, held-out reward-model score, held-out gold score, training KL) per evaluation."""
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = [(0, summary["eval/initial_reward_mean"], summary["eval/initial_gold_mean"], 0.0)]
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/gold_mean" in row:
            curve.append((row["step"] + 1, row["eval/reward_mean"], row["eval/gold_mean"], row["kl/mean"]))
    return curve


def realised_ceiling(pipeline_dir: Path) -> float:
    """Fraction of the held-out preference labels that the annotator itself agrees with (the
    rest were flipped by the label noise); regenerated from the run's resolved config."""
    from omegaconf import OmegaConf

    from rlhf_dist.tasks.reviews.feedback import annotator_score, preference_rows

    cfg = OmegaConf.load(pipeline_dir / ".hydra" / "config.yaml")
    rows = preference_rows(max(1, cfg.data.num_builtin_pairs // 8), cfg.seed, cfg.data.annotator_noise, "test")
    agree = [annotator_score(r["prompt"], r["chosen"]) > annotator_score(r["prompt"], r["rejected"]) for r in rows]
    return sum(agree) / len(agree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kl0-steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "pipeline")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)  # this benchmark's own earlier output

    pipeline_dir = args.out / "pipeline"
    pipeline_wall = command("rlhf_dist.pipeline", pipeline_dir)
    report = json.loads((pipeline_dir / "summary.json").read_text())
    sft, rm = report["paths"]["sft"], report["paths"]["reward_model"]

    kl0_dir = args.out / "ppo_kl0"
    kl0_wall = command("rlhf_dist.train", kl0_dir, f"model.path={sft}", f"reward.model_path={rm}",
                       "algo.kl_coef=0", f"total_steps={args.kl0_steps}")
    eval_dir = args.out / "evaluate"
    command("rlhf_dist.evaluate", eval_dir, f"reward.model_path={rm}", f"+eval.policies.sft={sft}",
            f"+eval.policies.ppo={report['paths']['ppo']}", f"+eval.policies.ppo_kl0={kl0_dir / 'policy'}",
            "eval.baseline=sft")
    policies = json.loads((eval_dir / "eval.json").read_text())["policies"]

    print(f"\npipeline wall time: {pipeline_wall:.0f} s (SFT, reward model, PPO, evaluation; set-up excluded)")
    print(f"reward model held-out accuracy: {report['rm/eval_accuracy']:.3f} "
          f"(ceiling 1 - label noise = {report['rm/accuracy_ceiling']:.2f}; held-out labels that agree with the "
          f"annotator, i.e. the accuracy of a perfect model on this sample: {realised_ceiling(pipeline_dir):.3f})")
    print("\n| policy | gold score | win rate vs SFT (gold judge) | reward-model score | KL to SFT (nats/response) |")
    print("|---|---|---|---|---|")
    for name, m in policies.items():
        print(f"| {name} | {m['gold_mean']:.3f} | {m['win_rate']:.3f} | {m['reward_mean']:.3f} | "
              f"{m['kl_to_baseline']:.2f} |")
    print("\nHeld-out evaluation over PPO steps (reward-model score = the proxy PPO optimises; gold = hidden annotator)")
    print("\n| run | steps | reward-model score | gold score | training KL/seq |")
    print("|---|---|---|---|---|")
    for name, run_dir in (("PPO (pipeline)", pipeline_dir / "ppo"), ("PPO, kl_coef=0", kl0_dir)):
        for step, proxy, gold, kl in eval_curve(run_dir):
            print(f"| {name} | {step} | {proxy:.3f} | {gold:.3f} | {kl:.2f} |")
    print(f"\nwall time PPO kl_coef=0 ({args.kl0_steps} steps): {kl0_wall:.0f} s")
    (args.out / "bench_pipeline.json").write_text(json.dumps(
        {"pipeline": report, "pipeline_wall_s": pipeline_wall, "kl0_wall_s": kl0_wall, "evaluate": policies,
         "curves": {"ppo": eval_curve(pipeline_dir / "ppo"), "ppo_kl0": eval_curve(kl0_dir)}}, indent=2) + "\n")


if __name__ == "__main__":
    main()
