"""How far the weight-sync verification's probe gap is from a stale engine, in float32 and bfloat16:
the tolerance (weight_sync.verify_tol; 0 = config.runtime.LOGPROB_TOLERANCE by model.dtype) must
sit above every correct sync's gap and below a stale engine's.

    .venv/bin/python scripts/bench_verify.py [--dtypes float32 bfloat16] [--steps 4] [--model DIR] [--out bench_out/verify]

For each dtype, the real stack in this process (``cluster.start.start_roles``, the default config
but ``model.dtype`` and ``total_steps``): the verification at start and after every sync of
``--steps`` GRPO steps gives the correct syncs' worst probe gaps (``weight_sync/probe_gap``); then
the policy takes ``--stale-updates`` more PPO updates on fresh samples (GRPO-like advantages: the
reward's z-score, the run's own learning rate) with no sync, and the gap of the engines that
still serve the old weights is measured after each: what a sync that silently did not happen
looks like. Writes ``<out>/verify.json`` and prints, per dtype, the largest correct gap, the
smallest stale gap and the tolerance in force.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_dist.config import register_configs, to_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return to_config(hydra_compose(config_name="config", overrides=overrides))


def stale_update(roles, prompts, cfg, pad_id: int, round_: int) -> None:
    """One PPO update of the policy on fresh samples, with no sync after it."""
    import torch

    from rlhf_dist.core.experience import collate

    count = cfg.algo.minibatch_size
    ids = prompts.token_ids[round_ * count : (round_ + 1) * count]
    gens = roles.generation.generate_async(ids, list(range(round_ * count, (round_ + 1) * count))).result()
    exp = collate(ids, [g.response_ids for g in gens], pad_id=pad_id)
    old, _ = roles.policy.logprobs_async(exp).result()
    scores = torch.tensor([float(len(set(g.text.split()))) for g in gens])  # any reward with a spread
    advantages = ((scores - scores.mean()) / (scores.std() + 1e-6))[:, None] * exp.response_mask
    exp = exp.with_fields(old_logprobs=old, ref_logprobs=old, advantages=advantages)
    roles.policy.train_async(exp, 1, cfg.algo, 0.0).result()


def measure(dtype: str, steps: int, stale_updates: int, out: Path, model: str = "") -> dict:
    from transformers import AutoTokenizer

    from rlhf_dist.cluster.start import shutdown_ray, start_roles
    from rlhf_dist.config import validate_config
    from rlhf_dist.controller import run_rl
    from rlhf_dist.driver.data import load_prompts
    from rlhf_dist.driver.run_logger import RunLogger
    from rlhf_dist.models.tiny import build_task_policy

    model = model or str(build_task_policy("reviews"))
    cfg = compose([f"model.dtype={dtype}", f"total_steps={steps}", "algo=grpo", "logger.progress_bar=false",
                   f"model.path={model}"])
    plan = validate_config(cfg)
    tokenizer = AutoTokenizer.from_pretrained(model)
    run_dir = out / f"{Path(model).name}-{dtype}"
    roles = start_roles(cfg, plan, model, model)
    try:
        correct = [roles.weights.probe_gap_of(0)]
        logger = RunLogger(cfg.logger, run_dir, {}, cfg.total_steps, "")
        prompts = load_prompts(cfg.data.prompts, cfg.data, tokenizer, cfg.model.max_prompt_len, cfg.seed)
        run_rl(cfg, roles, prompts, None, logger)
        logger.finish("completed")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        correct += [r["weight_sync/probe_gap"] for r in rows if "weight_sync/probe_gap" in r]
        correct.append(roles.weights.probe_gap_of(steps))  # the sync after the last step
        tolerance, roles.weights.tolerance = roles.weights.tolerance, float("inf")
        stale = []
        for k in range(stale_updates):
            stale_update(roles, prompts, cfg, tokenizer.pad_token_id, k)
            stale.append(roles.weights.verify())
    finally:
        roles.kill()
        shutdown_ray()
    return {"model": model, "dtype": dtype, "tolerance": tolerance, "correct": [g for g in correct if g is not None], "stale": stale}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--stale-updates", type=int, default=3)
    parser.add_argument("--model", default="", help="a model directory (default: the embedded tiny policy)")
    parser.add_argument("--out", type=Path, default=REPO / "bench_out" / "verify")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [measure(d, args.steps, args.stale_updates, args.out, args.model) for d in args.dtypes]
    (args.out / "verify.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n{'dtype':<10} {'correct syncs: max gap':>22} {'stale, after 1..n updates':>30} {'tolerance':>10}")
    for r in results:
        stale = " ".join(f"{g:.2e}" for g in r["stale"])
        print(f"{r['dtype']:<10} {max(r['correct']):>22.2e} {stale:>30} {r['tolerance']:>10g}")


if __name__ == "__main__":
    main()
