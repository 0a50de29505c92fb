"""Benchmark: PPO (GAE + critic), GRPO, overlapped GRPO, DAPO and GSPO on the verifiable arithmetic task.

Runs each algorithm as a normal training job (`python -m rlhf_dist.train task=arithmetic ...`),
one after the other on the same machine, and prints held-out exact-match accuracy (greedy
decoding) before and after training with its standard error, the wall time of each job, and the
ratios. ``grpo_overlap`` is GRPO one step off-policy (``rollout.max_staleness=1``, the engines
generate step k+1 while step k trains) with truncated importance sampling. ``dapo`` and ``gspo``
are the presets (``algo=dapo``: dynamic sampling, clip-higher, overlong shaping, no KL;
``algo=gspo``: sequence-level ratios). ``grpo_bf16`` runs GRPO in bfloat16 end to end, ``grpo_bf16_tis`` /
``grpo_bf16_mis`` with the engine/trainer mismatch corrected by TIS / masked IS (IcePop); ``grpo_lora``
(``grpo_lora64``) trains rank-8 (rank-64) LoRA adapters at 10x the learning rate. Dynamic sampling draws more responses per step, so every
run also reports the responses it sampled and the held-out accuracy at the evaluation closest
below the sample budget of the first algorithm (``--budget-of``, default the first of ``--algos``).

    .venv/bin/python scripts/bench_arithmetic.py [--steps 100] [--algos ppo,grpo,grpo_overlap,dapo,gspo]
        [--seeds 0,1] [--eval-every 25] [--out bench_out]
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
    "dapo": ["algo=dapo", "rollout.batch_size=16", "rollout.n=4"],
    # The task's 4-token budget is exactly a 2-digit answer and its EOS, which DAPO's overlong
    # shaping (buffer: the last token) punishes: without the shaping, and with room beyond the answer.
    "dapo_no_overlong": ["algo=dapo", "rollout.batch_size=16", "rollout.n=4", "reward.overlong_buffer=0"],
    "dapo_8_tokens": ["algo=dapo", "rollout.batch_size=16", "rollout.n=4", "rollout.max_new_tokens=8"],
    "gspo": ["algo=gspo", "rollout.batch_size=16", "rollout.n=4"],
    # bfloat16 end to end (vLLM, DeepSpeed's bf16 mode, the sync): the engines' and the trainer's
    # kernels round differently, a real rollout/train mismatch, uncorrected or corrected
    "grpo_bf16": ["algo=grpo", "rollout.batch_size=16", "rollout.n=4", "model.dtype=bfloat16"],
    "grpo_bf16_tis": ["algo=grpo", "rollout.batch_size=16", "rollout.n=4", "model.dtype=bfloat16",
                      "algo.rollout_correction=tis"],
    "grpo_bf16_mis": ["algo=grpo", "rollout.batch_size=16", "rollout.n=4", "model.dtype=bfloat16",
                      "algo.rollout_correction=mis"],
    # LoRA rank 8 on every projection (model.lora), the learning rate 10x the task's full fine-tuning
    # 3e-5, as "LoRA Without Regret" (Thinking Machines, 2025) finds best for LoRA at alpha 32
    "grpo_lora": ["algo=grpo", "rollout.batch_size=16", "rollout.n=4", "model.lora.rank=8", "trainer.lr=3e-4"],
    # rank 64 at the same learning rate (alpha 32 fixed makes the best one nearly independent of the rank)
    "grpo_lora64": ["algo=grpo", "rollout.batch_size=16", "rollout.n=4", "model.lora.rank=64", "trainer.lr=3e-4"],
    # and at a third of it (rank 64 at 3e-4 drifted further from the base: KL/seq 0.11-0.25)
    "grpo_lora64_lr1e-4": ["algo=grpo", "rollout.batch_size=16", "rollout.n=4", "model.lora.rank=64",
                           "trainer.lr=1e-4"],
}


def accuracy_se(acc: float) -> float:
    return math.sqrt(acc * (1 - acc) / EVAL_PROMPTS)


def run(name: str, extra: list[str], steps: int, seed: int, eval_every: int, out: Path) -> dict:
    run_dir = out / f"{name}_seed{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own output of an earlier run
    cmd = [sys.executable, "-m", "rlhf_dist.train", "task=arithmetic", f"total_steps={steps}", f"seed={seed}",
           f"eval.num_prompts={EVAL_PROMPTS}", f"eval.every_steps={eval_every}", "logger.progress_bar=false",
           f"hydra.run.dir={run_dir}", *extra]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True)
    wall = time.perf_counter() - start
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sizes = dict(e.split("=") for e in extra if e.startswith(("rollout.batch_size=", "rollout.n=")))
    prompts, n = int(sizes["rollout.batch_size"]), int(sizes["rollout.n"])
    sampled, curve = 0, []  # (responses sampled so far, held-out accuracy) after each evaluated step
    for row in rows:  # dynamic sampling logs the prompts each step drew
        sampled += int(row["rollout/prompts_sampled"] if "rollout/prompts_sampled" in row else prompts) * n
        if "eval/reward_mean" in row:
            curve.append((sampled, row["eval/reward_mean"]))
    filtered = [r["rollout/filtered_groups"] / r["rollout/prompts_sampled"] for r in rows if "rollout/filtered_groups" in r]
    acc = summary["eval/final_reward_mean"]
    return {"algo": name, "seed": seed, "wall_s": wall, "acc_before": summary["eval/initial_reward_mean"],
            "acc_after": acc, "acc_after_se": accuracy_se(acc), "responses_sampled": sampled, "curve": curve,
            "train_reward_last_fifth": summary["reward/last_fifth_mean"],
            "kl_final": summary["final"].get("kl/mean", math.nan),  # a KL-free run starts no reference
            "filtered_share": sum(filtered) / len(filtered) if filtered else None,
            "clipfrac_mean": sum(r["ppo/clipfrac"] for r in rows) / len(rows), **mismatch(rows)}


def mismatch(rows: list[dict]) -> dict:
    """The engine/trainer mismatch over a run: means per step of the sampled tokens' logprob gap and,
    where a rollout correction ran, its KL and the share of tokens it truncated or masked; the
    median step time."""
    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return sum(values) / len(values) if values else None

    corrected = mean("rollout_corr/truncated_frac")
    return {"logprob_gap_mean": mean("logprob_gap/mean"), "mismatch_kl_mean": mean("rollout_corr/mismatch_kl"),
            "corrected_frac_mean": corrected if corrected is not None else mean("rollout_corr/masked_frac"),
            "step_s_median": sorted(r["time/step"] for r in rows)[len(rows) // 2]}


def fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def at_budget(curve: list[tuple[int, float]], budget: int) -> tuple[int, float] | None:
    """The last evaluation made within ``budget`` sampled responses."""
    within = [point for point in curve if point[0] <= budget]
    return within[-1] if within else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--algos", default="ppo,grpo,grpo_overlap", help=f"comma-separated, of {', '.join(ALGOS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated run seeds")
    parser.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    parser.add_argument("--budget-of", default="", help="the algorithm whose sampled responses set the budget")
    parser.add_argument("--budget", type=int, default=0, help="a budget of sampled responses instead (e.g. 6400: "
                        "GRPO's 100 steps x 16 prompts x 4)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out")
    args = parser.parse_args()
    names, seeds = args.algos.split(","), [int(s) for s in args.seeds.split(",")]
    if unknown := sorted(set(names) - set(ALGOS)):
        parser.error(f"--algos: unknown {', '.join(unknown)} (use {', '.join(ALGOS)})")
    rows = [run(name, ALGOS[name], args.steps, seed, args.eval_every, args.out) for seed in seeds for name in names]
    if args.budget:
        budget_of, budgets = str(args.budget), {seed: args.budget for seed in seeds}
    else:
        budget_of = args.budget_of or names[0]
        budgets = {r["seed"]: r["responses_sampled"] for r in rows if r["algo"] == budget_of}
    print(f"\n{'algo':16} {'seed':>4} {'acc before':>10} {'after':>6} {'± SE':>6} {'responses':>9} "
          f"{f'acc at {budget_of} budget':>22} {'filtered':>8} {'clipfrac':>8} {'KL/seq':>7} {'wall s':>7}")
    for r in rows:
        point = at_budget(r["curve"], budgets.get(r["seed"], r["responses_sampled"]))
        r["acc_at_budget"] = point
        shown = f"{point[1]:.3f} ({point[0]})" if point else "-"
        filtered = "-" if r["filtered_share"] is None else f"{r['filtered_share']:.2f}"
        print(f"{r['algo']:16} {r['seed']:>4} {r['acc_before']:>10.3f} {r['acc_after']:>6.3f} {r['acc_after_se']:>6.3f} "
              f"{r['responses_sampled']:>9} {shown:>22} {filtered:>8} {r['clipfrac_mean']:>8.3f} {r['kl_final']:>7.3f} "
              f"{r['wall_s']:>7.0f}")
    print(f"\n{'algo':16} {'seed':>4} {'logprob gap':>11} {'mismatch KL':>11} {'corrected':>9} {'step s':>6}")
    for r in rows:
        shown = [fmt(r["logprob_gap_mean"], ".2e"), fmt(r["mismatch_kl_mean"], ".2e"), fmt(r["corrected_frac_mean"], ".4f")]
        print(f"{r['algo']:16} {r['seed']:>4} {shown[0]:>11} {shown[1]:>11} {shown[2]:>9} {r['step_s_median']:>6.2f}")
    for seed in seeds:
        walls = {r["algo"]: r["wall_s"] for r in rows if r["seed"] == seed}
        for a, b in (("grpo", "ppo"), ("grpo_overlap", "grpo"), ("dapo", "grpo"), ("dapo_no_overlong", "grpo"),
                     ("dapo_8_tokens", "grpo"), ("gspo", "grpo"), ("grpo_bf16", "grpo"), ("grpo_bf16_tis", "grpo_bf16"),
                     ("grpo_bf16_mis", "grpo_bf16"), ("grpo_lora", "grpo"), ("grpo_lora64", "grpo")):
            if a in walls and b in walls:
                print(f"seed {seed}: wall-time ratio {a}/{b}: {walls[a] / walls[b]:.2f}")
    (args.out / "bench_arithmetic.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
