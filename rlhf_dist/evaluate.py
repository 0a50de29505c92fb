"""Stage 4, evaluation: ``python -m rlhf_dist.evaluate +eval.policies.sft=DIR +eval.policies.ppo=DIR eval.baseline=sft``.

Every policy answers the same held-out prompts (``data.eval_prompts``, the first
``eval.num_prompts``) on its own vLLM engine, sampled at ``rollout.temperature`` with the same
per-prompt seeds (or greedily: ``eval.greedy=true``). For each policy it reports

* ``gold_mean``: the gold metric ``eval.gold_function`` (for the embedded task, the hidden
  annotator), when set;
* ``win_rate``: the fraction of prompts on which its response beats the baseline's under the
  gold metric (ties count one half);
* ``reward_mean``: the configured reward (e.g. the learned reward model, normalised);
* ``kl_to_baseline``: KL(policy || baseline) per response, the mean over its sampled responses
  of sum_t log pi(y_t) - log pi_base(y_t) (both at temperature 1, scored by the two engines);
  meaningful for samples at temperature 1, not for greedy decoding;
* ``response_length``: mean tokens per response.

Written to ``<output dir>/eval.json`` (with sample responses) and logged to W&B as a table.
The prompts are tokenized with the baseline's tokenizer: the policies must share it (as a
fine-tuned policy does its base model's), or neither the samples nor the KL compare.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rlhf_dist import algorithms as A
from rlhf_dist.cli import entry_point
from rlhf_dist.config import Config, ConfigError, as_dict, validate_config

NUM_SAMPLES_SHOWN = 16


def validate(cfg: Config) -> None:
    validate_config(cfg)
    if not cfg.eval.policies:
        raise ConfigError("eval.policies={}: name the policies, e.g. +eval.policies.sft=DIR +eval.policies.ppo=DIR")
    if not cfg.data.eval_prompts:
        raise ConfigError("data.eval_prompts='': the evaluation needs held-out prompts")


def summarize_policy(
    gold: list[float] | None, baseline_gold: list[float] | None, rewards: list[float],
    logprobs: list[list[float]], baseline_logprobs: list[list[float]], lengths: list[int],
) -> dict[str, float]:
    """The evaluation arithmetic of one policy against the baseline (pure; unit-tested)."""
    out = {
        "reward_mean": statistics.fmean(rewards),
        "kl_to_baseline": A.sequence_kl(logprobs, baseline_logprobs),
        "response_length": statistics.fmean(lengths),
    }
    if gold is not None and baseline_gold is not None:
        out["gold_mean"] = statistics.fmean(gold)
        out["win_rate"] = A.win_rate(gold, baseline_gold)
    return out


def run(cfg: Config, out_dir: Path, group: str) -> dict:
    from transformers import AutoTokenizer

    from rlhf_dist.cluster import stage_actors
    from rlhf_dist.controller import EVAL_SEED_STEP, sample_seeds
    from rlhf_dist.data import load_prompts
    from rlhf_dist.modeling import resolve_model_path
    from rlhf_dist.placement import actor_env, init_ray, place, spawn
    from rlhf_dist.preemption import PREEMPTION
    from rlhf_dist.roles.generation import GenerationEngine
    from rlhf_dist.roles.groups import GenerationGroup, RewardGroup
    from rlhf_dist.roles.reward import RewardScorer, import_function
    from rlhf_dist.run_logger import RunLogger
    from rlhf_dist.train import check_reward_function
    from rlhf_dist.worker_group import wait_all

    validate(cfg)
    if cfg.reward.function_weight:
        check_reward_function(cfg.reward.function)
    gold_fn = None
    if cfg.eval.gold_function:
        check_reward_function(cfg.eval.gold_function)
        gold_fn = import_function(cfg.eval.gold_function)
    names = list(cfg.eval.policies)
    baseline = cfg.eval.baseline or names[0]
    paths = {
        name: resolve_model_path(path, cfg.cache_dir, f"eval.policies.{name}")
        for name, path in cfg.eval.policies.items()
    }
    tokenizer = AutoTokenizer.from_pretrained(paths[baseline])
    prompts = load_prompts(cfg.data.eval_prompts, cfg.data, tokenizer, cfg.model.max_prompt_len, cfg.seed, split="test")
    count = min(cfg.eval.num_prompts, len(prompts))
    prompt_ids, texts, metadata = prompts.token_ids[:count], prompts.texts[:count], prompts.metadata[:count]
    seeds = [0] * count if cfg.eval.greedy else sample_seeds(cfg.seed, EVAL_SEED_STEP, count)

    logger = RunLogger(cfg.logger, out_dir, as_dict(cfg), 1, group, desc="evaluate", headline="", postfix=())
    logger.message(f"rlhf_dist evaluate: {', '.join(names)} on {count} held-out prompts, baseline {baseline}")
    engines: dict[str, GenerationGroup] = {}
    res, to = cfg.resources, cfg.timeouts
    with stage_actors(logger) as actors:
        init_ray(res, cfg.logger.actor_logs)
        slots = place(res, {"generation": len(names), "reward": cfg.reward.num_actors}, to.actor_start_s)
        env = actor_env(res)
        for i, name in enumerate(names):
            args = (paths[name], cfg.rollout, cfg.model.dtype, cfg.seed, res.weight_sync_backend, 0)
            engines[name] = GenerationGroup(f"generation[{name}]", spawn(
                GenerationEngine, slots["generation"][i : i + 1], res.generation, env,
                lambda _, a=args: (a, {"in_process": res.vllm_in_process}),
            ), to.generate_s)
        reward = RewardGroup("reward", spawn(
            RewardScorer, slots["reward"], res.reward, env,
            lambda _: ((cfg.reward, cfg.model.dtype, res.device), {"chat_template": cfg.data.chat_template}),
        ), to.inference_s)
        actors.extend([*engines.values(), reward])
        wait_all(*(g.call_async("pid", timeout_s=to.actor_start_s) for g in (*engines.values(), reward)))
        PREEMPTION.check("no evaluation written")  # a signal while the engines started

        pending = {name: g.generate_async(prompt_ids, seeds, greedy=cfg.eval.greedy) for name, g in engines.items()}
        gens = {name: p.result() for name, p in pending.items()}
        responses = {name: [g.text for g in gens[name]] for name in names}
        rewards = {name: reward.score_async(texts, responses[name], metadata).result() for name in names}
        gold = {name: [gold_fn(p, r) for p, r in zip(texts, responses[name])] for name in names} if gold_fn else None
        PREEMPTION.check("no evaluation written")

        def logprobs(engine: str, policy: str) -> list[list[float]]:
            # Raw (temperature 1) logprobs of `policy`'s responses under `engine`'s model.
            seqs = [g.prompt_ids + g.response_ids for g in gens[policy]]
            full = engines[engine].sequence_logprobs_async(seqs).result()[0]
            return [lp[len(lp) - len(g.response_ids):] if g.response_ids else [] for lp, g in zip(full, gens[policy])]

        results = {}
        for name in names:
            results[name] = summarize_policy(
                gold[name] if gold else None, gold[baseline] if gold else None, rewards[name],
                logprobs(name, name), logprobs(baseline, name), [len(g.response_ids) for g in gens[name]],
            )
        samples = [
            {"prompt": texts[i], **{name: {"response": responses[name][i], "reward": rewards[name][i],
                                           **({"gold": gold[name][i]} if gold else {})} for name in names}}
            for i in range(min(NUM_SAMPLES_SHOWN, count))
        ]
        report = {"baseline": baseline, "num_prompts": count, "greedy": cfg.eval.greedy,
                  "gold_function": cfg.eval.gold_function, "policies": results, "paths": paths, "samples": samples}
        (out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
        logger.log(0, {f"eval/{name}/{k}": v for name in names for k, v in results[name].items()})
        logger.table("eval/samples", ["prompt", "policy", "response", "reward", "gold"], step=0, rows=[
            [s["prompt"], name, s[name]["response"], s[name]["reward"], s[name].get("gold")]
            for s in samples for name in names
        ])
        logger.log_summary({f"eval/{name}/{k}": v for name in names for k, v in results[name].items()})
        for name in names:
            logger.message(f"rlhf_dist evaluate: {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()))
    return logger.finish("completed")


main = entry_point("evaluate", run, validate, objective="")

if __name__ == "__main__":
    main()
