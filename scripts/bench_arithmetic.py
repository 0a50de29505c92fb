"""Benchmark: PPO (GAE + critic) vs GRPO on the verifiable arithmetic task, side by side.

Runs each algorithm as a normal training job (`python -m rlhf_dist.train task=arithmetic ...`),
one after the other on the same machine, and prints held-out exact-match accuracy (greedy
decoding) before and after training, the wall time of each job, and their ratio.

    .venv/bin/python scripts/bench_arithmetic.py [--steps 100] [--out bench_out]
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
ALGOS = {
    # Same prompts per step for both: PPO gets 64 prompts x 1 sample, GRPO 16 prompts x 4 samples.
    "ppo": ["algo=ppo", "rollout.batch_size=64", "rollout.n=1"],
    "grpo": ["algo=grpo", "rollout.batch_size=16", "rollout.n=4"],
}


def run(name: str, extra: list[str], steps: int, out: Path) -> dict:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own output of an earlier run
    cmd = [sys.executable, "-m", "rlhf_dist.train", "task=arithmetic", f"total_steps={steps}",
           "eval.num_prompts=256", "logger.progress_bar=false", f"hydra.run.dir={run_dir}", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"algo": name, "wall_s": wall, "acc_before": summary["eval/initial_reward_mean"],
            "acc_after": summary["eval/final_reward_mean"], "train_reward_last_fifth": summary["reward/last_fifth_mean"],
            "kl_final": summary["final"]["kl/mean"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=REPO / "bench_out")
    args = parser.parse_args()
    rows = [run(name, extra, args.steps, args.out) for name, extra in ALGOS.items()]
    print(f"\n{'algo':6} {'held-out acc before':>20} {'after':>7} {'train reward (last 1/5)':>24} "
          f"{'KL/seq':>7} {'wall s':>7}")
    for r in rows:
        print(f"{r['algo']:6} {r['acc_before']:>20.3f} {r['acc_after']:>7.3f} {r['train_reward_last_fifth']:>24.3f} "
              f"{r['kl_final']:>7.3f} {r['wall_s']:>7.0f}")
    print(f"wall-time ratio grpo/ppo: {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}")
    (args.out / "bench_arithmetic.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
