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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_dist.cli import entry_point
from rlhf_dist.config import Config, ConfigError, as_dict, validate_config
from rlhf_dist.core.stats import sequence_kl, win_rate

if TYPE_CHECKING:  # the heavy modules load only once the config is valid
    from rlhf_dist.driver.run_logger import RunLogger
    from rlhf_dist.evaluation import HeldOut
    from rlhf_dist.roles.generation import Generation
    from rlhf_dist.roles.groups import GenerationGroup

# Samples kept in eval.json (training keeps evaluation.EVAL_SAMPLES_SHOWN per evaluation in its table).
NUM_SAMPLES_SHOWN = 16


def validate(cfg: Config) -> None:
    validate_config(cfg)
    if not cfg.eval.policies:
        raise ConfigError("eval.policies={}: name the policies, e.g. +eval.policies.sft=DIR +eval.policies.ppo=DIR")
    if not cfg.data.eval_prompts:
        raise ConfigError("data.eval_prompts='': the evaluation needs held-out prompts")
    if cfg.rollout.env:
        raise ConfigError(f"rollout.env={cfg.rollout.env}: this command compares single-turn policies; a multi-turn "
                          "run reports its held-out reward and tool calls itself (eval.every_steps)")


def summarize_policy(
    gold: list[float] | None, baseline_gold: list[float] | None, rewards: list[float],
    logprobs: list[list[float]], baseline_logprobs: list[list[float]], lengths: list[int],
) -> dict[str, float]:
    """The evaluation arithmetic of one policy against the baseline (pure; unit-tested)."""
    out = {
        "reward_mean": statistics.fmean(rewards),
        "kl_to_baseline": sequence_kl(logprobs, baseline_logprobs),
        "response_length": statistics.fmean(lengths),
    }
    if gold is not None and baseline_gold is not None:
        out["gold_mean"] = statistics.fmean(gold)
        out["win_rate"] = win_rate(gold, baseline_gold)
    return out


def gold_function(cfg: Config) -> Callable[[str, str], float] | None:
    """The gold metric (``eval.gold_function``), its signature checked, and the reward function's
    checked too: both fail in a second, before any actor starts."""
    from rlhf_dist.registry import import_function
    from rlhf_dist.train import check_reward_function

    if cfg.reward.function_weight:
        check_reward_function(cfg.reward.function)
    if not cfg.eval.gold_function:
        return None
    check_reward_function(cfg.eval.gold_function, "eval.gold_function")
    return import_function(cfg.eval.gold_function, "eval.gold_function")


def load_held_out(cfg: Config, tokenizer_path: str) -> HeldOut:
    """The held-out prompts, tokenized with the baseline's tokenizer."""
    from transformers import AutoTokenizer

    from rlhf_dist.driver.data import load_prompts
    from rlhf_dist.evaluation import held_out

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    prompts = load_prompts(cfg.data.eval_prompts, cfg.data, tokenizer, cfg.model.max_prompt_len, cfg.seed, split="test")
    return held_out(cfg, prompts)


def response_logprobs(engine: GenerationGroup, gens: list[Generation]) -> list[list[float]]:
    """Raw (temperature 1) logprobs of the response tokens of ``gens`` under ``engine``'s model."""
    full = engine.sequence_logprobs_async([g.prompt_ids + g.response_ids for g in gens]).result()[0]
    return [lp[len(lp) - len(g.response_ids):] if g.response_ids else [] for lp, g in zip(full, gens)]


def write_report(
    cfg: Config, logger: RunLogger, held: HeldOut, baseline: str, paths: dict[str, str],
    results: dict[str, dict[str, float]], scored: dict[str, tuple[list[str], list[float], list[float] | None]],
) -> None:
    """``eval.json`` (results and the first samples), the W&B table and summary, one line per policy.
    ``scored``: each policy's (responses, rewards, gold scores or None)."""
    names, count = list(results), len(held.texts)
    samples = [
        {"prompt": held.texts[i], **{name: {"response": responses[i], "reward": rewards[i],
                                            **({"gold": gold[i]} if gold else {})}
                                     for name, (responses, rewards, gold) in scored.items()}}
        for i in range(min(NUM_SAMPLES_SHOWN, count))
    ]
    report = {"baseline": baseline, "num_prompts": count, "greedy": cfg.eval.greedy,
              "gold_function": cfg.eval.gold_function, "policies": results, "paths": paths, "samples": samples}
    (logger.out_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.log(0, {f"eval/{name}/{k}": v for name in names for k, v in results[name].items()})
    logger.table("eval/samples", ["prompt", "policy", "response", "reward", "gold"], step=0, rows=[
        [s["prompt"], name, s[name]["response"], s[name]["reward"], s[name].get("gold")]
        for s in samples for name in names
    ])
    logger.add_summary({f"eval/{name}/{k}": v for name in names for k, v in results[name].items()})
    for name in names:
        logger.message(f"rlhf_dist evaluate: {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()))


def run(cfg: Config, out_dir: Path, group: str) -> dict:
    from rlhf_dist.cluster.start import place_roles, stage_actors, start_engines, start_reward, wait_started
    from rlhf_dist.driver.preemption import PREEMPTION
    from rlhf_dist.driver.run_logger import RunLogger
    from rlhf_dist.evaluation import score_held_out
    from rlhf_dist.models.modeling import resolve_model_path

    validate(cfg)
    gold_fn = gold_function(cfg)
    names = list(cfg.eval.policies)
    baseline = cfg.eval.baseline or names[0]
    paths = {
        name: resolve_model_path(path, cfg.cache_dir, f"eval.policies.{name}")
        for name, path in cfg.eval.policies.items()
    }
    held = load_held_out(cfg, paths[baseline])
    logger = RunLogger(cfg.logger, out_dir, as_dict(cfg), 1, group, desc="evaluate", headline="", postfix=())
    logger.message(f"rlhf_dist evaluate: {', '.join(names)} on {len(held.texts)} held-out prompts, baseline {baseline}")
    with stage_actors(logger) as actors:
        slots = place_roles(cfg, {"generation": len(names), "reward": cfg.reward.num_actors})
        # One engine per policy, each alone in its group: rank 0 of 1, so all sample with the same seeds.
        engines = {name: start_engines(cfg, f"generation[{name}]", paths[name], slots["generation"][i : i + 1])
                   for i, name in enumerate(names)}
        reward = start_reward(cfg, slots["reward"])
        actors.extend([*engines.values(), reward])
        wait_started(cfg, [*engines.values(), reward])
        PREEMPTION.check("no evaluation written")  # a signal while the engines started

        greedy = cfg.eval.greedy
        pending = {name: e.generate_async(held.token_ids, held.seeds, greedy=greedy) for name, e in engines.items()}
        gens = {name: p.result() for name, p in pending.items()}
        responses = {name: [g.text for g in gens[name]] for name in names}
        scored = {name: (responses[name], *score_held_out(held, responses[name], reward, gold_fn)) for name in names}
        PREEMPTION.check("no evaluation written")

        results = {}
        for name in names:
            _, rewards, gold = scored[name]
            results[name] = summarize_policy(
                gold, scored[baseline][2], rewards, response_logprobs(engines[name], gens[name]),
                response_logprobs(engines[baseline], gens[name]), [len(g.response_ids) for g in gens[name]],
            )
        write_report(cfg, logger, held, baseline, paths, results, scored)
    return logger.finish("completed")


main = entry_point("evaluate", run, validate, objective="")

if __name__ == "__main__":
    main()
