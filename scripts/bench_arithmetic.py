"""Benchmark: PPO (GAE + critic) vs GRPO vs overlapped GRPO on the verifiable arithmetic task.

Runs each algorithm as a normal training job (`python -m rlhf_dist.train task=arithmetic ...`),
one after the other on the same machine, and prints held-out exact-match accuracy (greedy
decoding) before and after training with its standard error, the wall time of each job, and the
ratios. ``grpo_overlap`` is GRPO one step off-policy (``rollout.max_staleness=1``, the engines
generate step k+1 while step k trains) with truncated importance sampling.

    .venv/bin/python scripts/bench_arithmetic.py [--steps 100] [--algos ppo,grpo,grpo_overlap] [--out bench_out]
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EVAL_PROMPTS = 256  # held-out problems, greedy: one standard error is sqrt(acc (1 - acc) / 256)
ALGOS = {
    # Same prompts per step for both: PPO gets 64 prompts x 1 sample, GRPO 16 prompts x 4 samples.
    "ppo": ["algo=ppo", "rollout.batch_size=64", "rollout.n=1"],
    "grpo": ["algo=grpo", "rollout.batch_size=16", "rollout.n=4"],
    "grpo_overlap": ["algo=grpo", "rollout.batch_size=16", "rollout.n=4", "rollout.max_staleness=1",
                     "algo.rollout_correction=tis"],
}


def run(name: str, extra: list[str], steps: int, out: Path) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own output of an earlier run
    cmd = [sys.executable, "-m", "rlhf_dist.train", "task=arithmetic", f"total_steps={steps}",
           f"eval.num_prompts={EVAL_PROMPTS}", "logger.progress_bar=false", f"hydra.run.dir={run_dir}", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    acc = summary["eval/final_reward_mean"]
    return {"algo": name, "wall_s": wall, "acc_before": summary["eval/initial_reward_mean"],
            "acc_after_se": math.sqrt(acc * (1 - acc) / EVAL_PROMPTS),
            "acc_after": summary["eval/final_reward_mean"], "train_reward_last_fifth": summary["reward/last_fifth_mean"],
            "kl_final": summary["final"]["kl/mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--algos", default=",".join(ALGOS), help=f"comma-separated, of {', '.join(ALGOS)}")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out")
    args = parser.parse_args()
    names = args.algos.split(",")
    if unknown := sorted(set(names) - set(ALGOS)):
        parser.error(f"--algos: unknown {', '.join(unknown)} (use {', '.join(ALGOS)})")
    rows = [run(name, ALGOS[name], args.steps, args.out) for name in names]
    print(f"\n{'algo':12} {'held-out acc before':>20} {'after':>7} {'± SE':>6} {'train reward (last 1/5)':>24} "
          f"{'KL/seq':>7} {'wall s':>7}")
    for r in rows:
        print(f"{r['algo']:12} {r['acc_before']:>20.3f} {r['acc_after']:>7.3f} {r['acc_after_se']:>6.3f} "
              f"{r['train_reward_last_fifth']:>24.3f} {r['kl_final']:>7.3f} {r['wall_s']:>7.0f}")
    walls = {r["algo"]: r["wall_s"] for r in rows}
    for a, b in (("grpo", "ppo"), ("grpo_overlap", "grpo")):
        if a in walls and b in walls:
            print(f"wall-time ratio {a}/{b}: {walls[a] / walls[b]:.2f}")
    (args.out / "bench_arithmetic.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
