"""Benchmark: one-pass against iterated RLHF on the embedded task, at equal total PPO steps and an
equal labelling budget, over several seeds (the InstructGPT recipe's rounds, pipeline.rounds).

    .venv/bin/python scripts/bench_rounds.py [--seeds 0 1] [--steps 60] [--rounds 3] [--out bench_out/rounds] \
        [--extra algo.kl_coef=0 ...]

Both arms are ``python -m rlhf_dist.pipeline`` (conf/pipeline.yaml: PPO with the KL penalty to SFT,
held-out evaluation every 10 steps) with the same SFT stage:

* ``one_pass``: a reward model on ``--pairs`` annotator-ranked pairs, then ``--steps`` PPO steps.
* ``iterated``: a first reward model on half those pairs, then ``--rounds`` rounds of
  ``--steps / --rounds`` PPO steps; each further round has the labeller (the hidden annotator, with
  the same noise) rank ``pipeline.ranking_k`` = 4 responses of the current policy and of SFT to
  ``--label-prompts`` fresh prompts, continues the reward model on them and PPO from the policy.

The budget is what the labeller reads: one pass 2 x pairs responses; iterated 2 x pairs / 2 + (rounds
- 1) x label prompts x 4 (the defaults: 8,192 each). The gold metric is the hidden annotator, which
PPO never sees. Writes ``<out>/rounds.json`` and two figures (matplotlib: ``pip install
matplotlib``, or the ``bench`` extra):

* ``rounds_gold.png``: the held-out gold score at every evaluation against the PPO steps done;
* ``rounds_overoptimisation.png``: the held-out gold score and the proxy (the score of the reward
  model that PPO was optimising then) against the KL to SFT.

``--wandb offline|online`` also logs the figures and the table to a W&B run of its own (project
rlhf_dist, group ``bench-rounds``), beside the pipelines' runs (``--extra logger=wandb`` makes
those W&B runs too).

Re-running continues: a pipeline that finished is reused (the pipeline's own resume).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_pipeline(run_dir: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "rlhf_dist.pipeline", f"hydra.run.dir={run_dir}", "logger.progress_bar=false",
           *overrides]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads((run_dir / "summary.json").read_text())


def curve(ppo_dir: Path, offset: int) -> list[dict]:
    """The held-out evaluations of one PPO stage: steps done (plus ``offset``, the earlier rounds'),
    gold score, proxy score (its reward model's), and the training KL to the reference (SFT)."""
    summary = json.loads((ppo_dir / "summary.json").read_text())
    points = [{"steps": offset, "gold": summary["eval/initial_gold_mean"], "proxy": summary["eval/initial_reward_mean"],
               "kl": None}]
    for line in (ppo_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "eval/gold_mean" in row:
            points.append({"steps": offset + row["step"] + 1, "gold": row["eval/gold_mean"],
                           "proxy": row["eval/reward_mean"], "kl": row["kl/mean"]})
    return points


def arm_result(run_dir: Path, rounds: int, steps_per_round: int) -> dict:
    report = json.loads((run_dir / "summary.json").read_text())
    ppo_dirs = [run_dir / "ppo"] + [run_dir / f"round_{r}" / "ppo" for r in range(2, rounds + 1)]
    points = [p for r, d in enumerate(ppo_dirs) for p in curve(d, r * steps_per_round)]
    rm = [report["rm/eval_accuracy"]] + [report.get(f"round_{r}/rm/eval_accuracy") for r in range(2, rounds + 1)]
    return {"final_gold": report["eval/ppo/gold_mean"], "win_rate": report["eval/ppo/win_rate"],
            "kl_to_sft": report["eval/ppo/kl_to_baseline"], "sft_gold": report["eval/sft/gold_mean"],
            "rm_eval_accuracy": rm, "curve": points,
            "rounds": {r: {k.split("/", 1)[1]: v for k, v in report.items() if k.startswith(f"round_{r}/")}
                       for r in range(2, rounds + 1)},
            "per_round": {name: report.get(f"eval/{name}/gold_mean") for name in
                          [f"round_{r}" for r in range(1, rounds)] + ["ppo"]}}


def plot(results: dict, out: Path, boundaries: list[int]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"one_pass": "tab:red", "iterated": "tab:blue"}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (arm, seed), res in results.items():
        pts = res["curve"]
        ax.plot([p["steps"] for p in pts], [p["gold"] for p in pts], marker="o", ms=3, color=colours[arm],
                alpha=0.9 if seed == min(s for _, s in results) else 0.55, label=f"{arm}, seed {seed}")
    for b in boundaries:
        ax.axvline(b, color="grey", ls=":", lw=1)
    ax.set_xlabel("PPO steps done (dotted: a new round's reward model)")
    ax.set_ylabel("held-out gold score (hidden annotator)")
    ax.set_title("One pass against iterated RLHF, equal steps and labelling budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    gold = out / "rounds_gold.png"
    fig.savefig(gold, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, arm in zip(axes, ("one_pass", "iterated")):
        for (a, seed), res in results.items():
            if a != arm:
                continue
            pts = [p for p in res["curve"] if p["kl"] is not None]
            kl = [p["kl"] for p in pts]
            shade = 1.0 if seed == min(s for _, s in results) else 0.5
            ax.scatter(kl, [p["gold"] for p in pts], marker="o", s=18, color="tab:green", alpha=shade,
                       label=f"gold, seed {seed}")
            ax.scatter(kl, [p["proxy"] for p in pts], marker="s", s=18, color="tab:orange", alpha=shade,
                       label=f"proxy (its reward model), seed {seed}")
        ax.set_title(arm)
        ax.set_xlabel("KL to SFT (nats per response, training samples)")
    axes[0].set_ylabel("held-out score")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    over = out / "rounds_overoptimisation.png"
    fig.savefig(over, dpi=110)
    plt.close(fig)
    return [gold, over]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60, help="PPO steps in all, each arm")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=4096, help="the one-pass reward model's annotator pairs")
    parser.add_argument("--label-prompts", type=int, default=512)
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "rounds")
    parser.add_argument("--extra", nargs="*", default=[], help="overrides for both arms, e.g. algo.kl_coef=0")
    parser.add_argument("--wandb", choices=["offline", "online"], default=None,
                        help="log the figures and the table to W&B")
    args = parser.parse_args()
    if args.steps % args.rounds:
        sys.exit(f"--steps {args.steps} must be a multiple of --rounds {args.rounds}")
    per_round = args.steps // args.rounds
    args.out.mkdir(parents=True, exist_ok=True)
    arms = {
        "one_pass": [f"total_steps={args.steps}", f"data.num_builtin_pairs={args.pairs}"],
        "iterated": [f"total_steps={per_round}", f"data.num_builtin_pairs={args.pairs // 2}",
                     f"pipeline.rounds={args.rounds}", f"pipeline.label_prompts={args.label_prompts}",
                     "pipeline.ranking_k=4"],
    }
    budget = {"one_pass": 2 * args.pairs, "iterated": args.pairs + (args.rounds - 1) * args.label_prompts * 4}
    results = {}
    for seed in args.seeds:
        for arm, overrides in arms.items():
            run_dir = args.out / f"seed{seed}" / arm
            run_pipeline(run_dir, [f"seed={seed}", *overrides, *args.extra])
            results[arm, seed] = arm_result(run_dir, args.rounds if arm == "iterated" else 1, per_round)
    figures = plot(results, args.out, [r * per_round for r in range(1, args.rounds)])
    (args.out / "rounds.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "responses_read": budget,
         "results": {f"{arm}/seed{seed}": res for (arm, seed), res in results.items()}}, indent=2) + "\n")
    print(f"\nresponses read by the labeller: one_pass {budget['one_pass']}, iterated {budget['iterated']}")
    print(f"{'arm':<10} {'seed':>4} {'gold':>7} {'win vs SFT':>10} {'KL':>6} {'SFT gold':>8}  RM held-out accuracy by round")
    for (arm, seed), res in results.items():
        accuracy = " ".join(f"{a:.3f}" if a is not None else "-" for a in res["rm_eval_accuracy"])
        print(f"{arm:<10} {seed:>4} {res['final_gold']:>7.3f} {res['win_rate']:>10.3f} {res['kl_to_sft']:>6.2f} "
              f"{res['sft_gold']:>8.3f}  {accuracy}")
    print("figures: " + ", ".join(str(f) for f in figures))
    if args.wandb:
        log_to_wandb(args, results, figures)


def log_to_wandb(args, results: dict, figures: list[Path]) -> None:
    import wandb

    run = wandb.init(project="rlhf_dist", group="bench-rounds", name=args.out.name, mode=args.wandb,
                     dir=str(args.out), config={k: str(v) for k, v in vars(args).items()})
    columns = ["arm", "seed", "final_gold", "win_rate", "kl_to_sft", "rm_eval_accuracy"]
    table = wandb.Table(columns=columns, data=[
        [arm, seed, r["final_gold"], r["win_rate"], r["kl_to_sft"], " ".join(f"{a}" for a in r["rm_eval_accuracy"])]
        for (arm, seed), r in results.items()])
    run.log({"rounds/results": table, **{f"rounds/{f.stem}": wandb.Image(str(f)) for f in figures}})
    run.finish()


if __name__ == "__main__":
    main()
