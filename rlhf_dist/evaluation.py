"""Held-out evaluation: responses to fixed held-out prompts, scored by the reward actors and an
optional gold metric that is only reported, never optimised. The training loop evaluates every
``eval.every_steps``; ``rlhf_dist.evaluate`` compares saved policies with the same prompts and seeds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from rlhf_dist.cluster.start import Roles
from rlhf_dist.config import Config
from rlhf_dist.driver.data import PromptSet
from rlhf_dist.driver.metrics import env_metrics
from rlhf_dist.registry import import_function
from rlhf_dist.roles.agent_loop import env_rows
from rlhf_dist.roles.groups import RewardGroup
from rlhf_dist.rollout.queue import sample_seeds
from rlhf_dist.rollout.scoring import task_scores

EVAL_SEED_STEP = 2**20  # evaluation samples draw seeds no training step uses


EVAL_SAMPLES_SHOWN = 8  # held-out responses kept per evaluation (W&B table, eval_samples.jsonl)


EVAL_COLUMNS = ["after_steps", "prompt", "response", "reward", "gold"]


@dataclass(frozen=True)
class HeldOut:
    """The first ``eval.num_prompts`` held-out prompts and the engine seed of each: every
    evaluation, and every policy evaluated, samples its responses with the same seeds."""

    token_ids: list[list[int]]
    texts: list[str]
    metadata: list[dict]
    seeds: list[int]  # all 0 for greedy decoding (eval.greedy)


def held_out(cfg: Config, prompts: PromptSet) -> HeldOut:
    count = min(cfg.eval.num_prompts, len(prompts))
    seeds = [0] * count if cfg.eval.greedy else sample_seeds(cfg.seed, EVAL_SEED_STEP, count)
    return HeldOut(prompts.token_ids[:count], prompts.texts[:count], prompts.metadata[:count], seeds)


def score_held_out(
    held: HeldOut, responses: list[str], reward: RewardGroup, gold_fn: Callable[[str, str], float] | None
) -> tuple[list[float], list[float] | None]:
    """The reward actors' score of each response (NaN: dropped, reward.on_invalid=drop) and, with a
    gold function (``eval.gold_function``), its gold score (None without one)."""
    scores = reward.score_async(held.texts, responses, held.metadata).result()
    gold = [gold_fn(p, r) for p, r in zip(held.texts, responses)] if gold_fn else None
    return scores, gold


def held_out_rows(cfg: Config, held: HeldOut) -> list[dict] | None:
    """The rows the environments of multi-turn samples are made from (None: single-turn)."""
    return env_rows(held.texts, held.metadata) if cfg.rollout.env else None


def evaluate(cfg: Config, roles: Roles, eval_prompts: PromptSet) -> tuple[dict[str, float], list[list]]:
    """Responses to the held-out prompts (greedy, or sampled with fixed seeds: ``eval.greedy``),
    scored by the reward actors (for an exact-match reward, ``eval/reward_mean`` is the held-out
    accuracy) and, when ``eval.gold_function`` is set, by that gold metric (``eval/gold_mean``),
    which is only reported, never optimised. Returns the metrics and the first responses as rows
    of (prompt, response, reward, gold or None)."""
    held = held_out(cfg, eval_prompts)
    count = len(held.texts)
    gens = roles.generate(held.token_ids, held.seeds, greedy=cfg.eval.greedy, rows=held_out_rows(cfg, held))
    responses = [g.text for g in gens]
    gold_fn = import_function(cfg.eval.gold_function, "eval.gold_function") if cfg.eval.gold_function else None
    scores, gold = score_held_out(held, responses, roles.reward, gold_fn)
    scores = task_scores(scores, gens, cfg.reward.env_weight, "drop")  # a failed environment scores nothing
    finite = [s for s in scores if math.isfinite(s)]
    metrics = {"eval/reward_mean": sum(finite) / max(len(finite), 1), "eval/num_prompts": float(count)}
    if gold is not None:
        metrics["eval/gold_mean"] = sum(gold) / count
    if (env := env_metrics(gens)):
        metrics.update({"eval/tool_calls_mean": env["env/tool_calls_mean"], "eval/turns_mean": env["env/turns_mean"]})
    shown = gold or [None] * count
    rows = [[held.texts[i], gens[i].transcript or responses[i], scores[i], shown[i]]
            for i in range(min(EVAL_SAMPLES_SHOWN, count))]
    return metrics, rows


def eval_summary(when: str, metrics: dict[str, float]) -> dict[str, float]:
    """``eval/reward_mean`` -> ``eval/<when>_reward_mean`` (and the gold score, if any) for summary.json."""
    return {f"eval/{when}_{k.removeprefix('eval/')}": v for k, v in metrics.items()
            if k in ("eval/reward_mean", "eval/gold_mean", "eval/tool_calls_mean")}
