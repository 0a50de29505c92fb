"""The same short PPO run with engine and trainer variants, one after the other: rewards, the
engine/trainer logprob gap, and where the time goes (start-up, step, generate, train, weight sync).

    .venv/bin/python scripts/bench_variants.py [--steps 4] [--out bench_out/variants]

Step times are means over the steps after the first. Ratios are against the first (default) row.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

VARIANTS = {
    "default (ZeRO-2, 1 engine in process)": [],
    "TP=2 engine": ["rollout.tensor_parallel_size=2", "resources.vllm_in_process=false"],
    "ZeRO-3": ["trainer=zero3"],
    "ZeRO-3 + optimizer offload": ["trainer=zero3", "trainer.offload_optimizer=true"],
}


def run(out: Path, steps: int, overrides: list[str]) -> tuple[list[dict], float]:
    """The run's metrics rows and how long its roles took to start."""
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_dist.train", f"hydra.run.dir={out}", f"total_steps={steps}",
         "logger.progress_bar=false", "checkpoint.every_steps=0", *overrides],
        capture_output=True, text=True, check=False,
    )
    if proc.returncode:
        sys.exit(f"bench_variants: {overrides} failed:\n{proc.stderr[-2000:]}")
    roles_s = float(re.search(r"roles started in (\d+)s", proc.stderr + proc.stdout).group(1))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, roles_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path("bench_out/variants"))
    args = parser.parse_args()
    print(f"{'variant':<40} {'rewards':<32} {'max gap':>8} {'start s':>7} {'step s':>6} {'gen s':>6} "
          f"{'train s':>7} {'sync s':>6} {'step ratio':>10}")
    base_step = None
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        rows, roles_s = run(args.out / f"v{i}", args.steps, overrides)
        later = rows[1:] or rows

        def mean(key: str, later=later) -> float:
            return statistics.fmean(r[key] for r in later)

        step = mean("time/step")
        base_step = base_step or step
        rewards = ", ".join(f"{r['reward/mean']:.3f}" for r in rows)
        gap = max(r["logprob_gap/mean"] for r in rows)
        print(f"{name:<40} {rewards:<32} {gap:>8.1e} {roles_s:>7.0f} {step:>6.2f} {mean('time/generate'):>6.2f} "
              f"{mean('time/train'):>7.2f} {mean('time/weight_sync'):>6.3f} {step / base_step:>9.2f}x")


if __name__ == "__main__":
    main()
