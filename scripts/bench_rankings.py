"""Benchmark: a reward model from rankings of K responses (InstructGPT section 3.5) at an equal
labelling budget.

For each K, ``python -m rlhf_dist.reward_model`` on the embedded task with ``data.ranking_k=K``:
the simulated annotator ranks K responses per prompt (label noise ``data.annotator_noise`` per
comparison, correlated within a ranking), and the loss takes all C(K, 2) comparisons of a prompt
as one batch element, each response scored once. The budget is the responses the labellers
read: ``--responses`` of them, i.e. ``responses / K`` prompts, so a ranking of 9 yields about 4
times as many comparisons per response read as pairs do. Every setting trains on the same number
of responses per optimizer step (``--per-step``, one micro-batch per rank), so the steps and the
forward rows per epoch are equal too, and is scored on the same held-out pairs: ``--eval-pairs``
pairs of the test split labelled by the annotator without noise (a file, ``data.eval_preferences``),
so the accuracy is agreement with the annotator's true preferences (against labels flipped at
rate n it would be n + (1 - 2n) x this).

Then, once (first seed), the largest K's rankings cut into their comparisons as separate pairs
(``--expand``, a JSONL file of ``chosen``/``rejected`` rows: the same labels), as many optimizer
steps: what scoring 2 C(K, 2) rows per prompt instead of K costs, and what one batch element per
prompt changes.

    .venv/bin/python scripts/bench_rankings.py [--ks 2 4 9] [--responses 2304] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORLD = 2  # trainer.world_size (the default): the per-step batch is split over 2 ranks


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def held_out_pairs(path: Path, num: int, seed: int) -> Path:
    """``num`` noise-free pairs of the embedded task's test split."""
    from rlhf_dist.tasks.reviews.feedback import preference_rows

    return write_jsonl(path, preference_rows(num, seed, 0.0, "test"))


def expanded_pairs(path: Path, k: int, prompts: int, seed: int) -> Path:
    """The training rankings the stage generates for ``data.ranking_k=k`` (same seed, size and
    noise), each comparison a ``chosen``/``rejected`` row of its own."""
    from rlhf_dist.config import DataConfig
    from rlhf_dist.tasks.reviews.feedback import ranking_rows

    rows = []
    for r in ranking_rows(prompts, seed, DataConfig().annotator_noise, k, "train"):
        ranked = list(zip(r["responses"], r["ranks"]))
        rows += [{"prompt": r["prompt"], "chosen": a, "rejected": b}
                 for a, rank_a in ranked for b, rank_b in ranked if rank_a < rank_b]
    return write_jsonl(path, rows)


def reward_model(run_dir: Path, label: str, width: int, batch: int, seed: int, epochs: int, *overrides: str) -> dict:
    """One reward-model stage, as a user runs it (``batch`` rows of ``width`` responses per step):
    its figures from summary.json."""
    cmd = [sys.executable, "-m", "rlhf_dist.reward_model", f"hydra.run.dir={run_dir}", "logger.progress_bar=false",
           f"seed={seed}", f"rm.batch_size={batch}", f"rm.epochs={epochs}", f"trainer.micro_batch_size={batch // WORLD}",
           *overrides]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"label": label, "seed": seed, "rows": summary["rm/train_prompts"], "forward_rows": batch * width,
            "comparisons": summary["rm/train_comparisons"], "steps": summary["steps"],
            "eval_accuracy": summary["rm/eval_accuracy"], "epoch_s": summary["time/epoch_s"]}


def table(results: list[dict], responses: int) -> str:
    """One row per setting: the mean over seeds of comparisons and accuracy (accuracy per seed in
    brackets), the median of the epoch times (2 shared cores: single runs vary by 2x), ratios to
    the first setting."""
    by_label: dict[str, list[dict]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    mean = {label: {"comparisons": statistics.fmean(r["comparisons"] for r in runs),
                    "eval_accuracy": statistics.fmean(r["eval_accuracy"] for r in runs),
                    "epoch_s": statistics.median(r["epoch_s"] for r in runs)} for label, runs in by_label.items()}
    base = mean[results[0]["label"]]
    header = ("| setting | rows (prompts or pairs) | responses read | comparisons | forward rows per step | steps | "
              "held-out pairwise accuracy (gold; per seed) | vs pairs | time per epoch (s, median) | vs pairs | "
              "comparisons per second |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, runs in by_label.items():
        m, first = mean[label], runs[0]
        per_seed = ", ".join(f"{r['eval_accuracy']:.3f}" for r in runs)
        lines.append(
            f"| {label} | {first['rows']} | {responses} | {m['comparisons']:.0f} | {first['forward_rows']} | {first['steps']} | "
            f"{m['eval_accuracy']:.3f} ({per_seed}) | {m['eval_accuracy'] / base['eval_accuracy']:.3f} | "
            f"{m['epoch_s']:.1f} | {m['epoch_s'] / base['epoch_s']:.2f} | {m['comparisons'] / m['epoch_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 4, 9])
    parser.add_argument("--responses", type=int, default=2304, help="responses read per setting (the budget)")
    parser.add_argument("--per-step", type=int, default=72, help="responses per optimizer step")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--eval-pairs", type=int, default=1024)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="a run per K and seed (data and init)")
    parser.add_argument("--no-expand", dest="expand", action="store_false", help="skip the expanded-pairs run")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "rankings")
    args = parser.parse_args()
    for k in args.ks:
        if args.per_step % (k * WORLD) or args.responses % k:
            parser.error(f"K={k}: --per-step must be a multiple of K x {WORLD}, --responses of K")
    shutil.rmtree(args.out, ignore_errors=True)  # this benchmark's own earlier output
    started, results = time.perf_counter(), []
    steps_per_epoch = args.responses // args.per_step
    held_out = {seed: held_out_pairs(args.out / f"held_out_pairs_seed{seed}.jsonl", args.eval_pairs, seed)
                for seed in args.seeds}
    for seed in args.seeds:
        for k in args.ks:
            results.append(reward_model(
                args.out / f"seed{seed}" / f"k{k}", "pairs (K=2)" if k == 2 else f"rankings of K={k}", k,
                args.per_step // k, seed, args.epochs, f"data.ranking_k={k}",
                f"data.num_builtin_pairs={args.responses // k}", f"data.eval_preferences={held_out[seed]}"))
    if args.expand:  # the largest K's comparisons as separate pairs, as many steps: a batch of pairs per step
        k, seed = max(args.ks), args.seeds[0]
        pairs = expanded_pairs(args.out / f"expanded_k{k}.jsonl", k, args.responses // k, seed)
        batch = len(pairs.read_text().splitlines()) // steps_per_epoch // WORLD * WORLD
        results.append(reward_model(
            args.out / f"seed{seed}" / f"k{k}_as_pairs", f"K={k} rankings as separate pairs", 2, batch, seed,
            args.epochs, f"data.preferences={pairs}", f"data.eval_preferences={held_out[seed]}"))
    print(f"\nbudget: {args.responses} responses read per setting; {args.per_step} responses per optimizer step "
          f"({steps_per_epoch} steps per epoch); {args.epochs} epochs; held out: {args.eval_pairs} noise-free pairs; "
          f"seeds {args.seeds}; {time.perf_counter() - started:.0f} s in all\n")
    print(table(results, args.responses))
    (args.out / "bench_rankings.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
