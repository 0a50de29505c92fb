"""The PPO controller: one iteration, top to bottom, in the algorithm's order.

generate -> score -> reference/old logprobs and values -> KL-shaped rewards ->
GAE -> PPO epochs on the trainer groups -> broadcast weights -> log.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from rlhf_dist import algorithms as A
from rlhf_dist.cluster import Roles
from rlhf_dist.config import Config
from rlhf_dist.data import PromptSampler, PromptSet
from rlhf_dist.experience import collate, pad_right
from rlhf_dist.run_logger import RunLogger


class Timer:
    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.times[f"time/{name}"] = time.perf_counter() - start


def sample_seeds(seed: int, step: int, n: int) -> list[int]:
    """Per-sample engine seeds: a run is reproducible whatever the engine count."""
    return [(seed * 1_000_003 + step * 65_537 + i) % 2**31 for i in range(n)]


def ppo_step(step: int, cfg: Config, roles: Roles, prompts: PromptSet, sampler: PromptSampler) -> dict[str, float]:
    """One PPO iteration; returns its metrics."""
    algo, timer = cfg.algo, Timer()
    step_start = time.perf_counter()
    idx = sampler.indices(step)
    prompt_ids = [prompts.token_ids[i] for i in idx]

    with timer("generate"):
        gens = roles.generation.generate_async(prompt_ids, sample_seeds(cfg.seed, step, len(idx))).result()
    exp = collate(prompt_ids, [g.response_ids for g in gens], pad_id=0)
    mask = exp.response_mask
    engine_logprobs = pad_right([g.response_logprobs for g in gens], mask.shape[1])

    with timer("reward"):
        scores = torch.tensor(roles.reward.score_async([prompts.texts[i] for i in idx], [g.text for g in gens]).result())
    with timer("reference"):
        ref_logprobs = roles.reference.logprobs_async(exp).result()
    with timer("values"):
        # Old policy logprobs and critic values come from different groups: run them together.
        old_pending, values_pending = roles.policy.logprobs_async(exp), roles.critic.values_async(exp)
        (old_logprobs, entropy), values = old_pending.result(), values_pending.result()

    kl = A.kl_k1(old_logprobs, ref_logprobs)
    shaped_scores = A.whiten_scores(scores) if algo.whiten_rewards else scores
    rewards = A.token_rewards(shaped_scores, kl, mask, algo.kl_coef)
    advantages, returns = A.gae(rewards, values, mask, algo.gamma, algo.lam)
    advantages = A.masked_whiten(advantages, mask)
    exp = exp.with_fields(old_logprobs=old_logprobs, old_values=values, advantages=advantages, returns=returns)

    with timer("train"):
        policy_pending = roles.policy.train_async(exp, algo.ppo_epochs)
        critic_pending = roles.critic.train_async(exp, algo.ppo_epochs)
        policy_stats, critic_stats = policy_pending.result(), critic_pending.result()
    with timer("weight_sync"):
        roles.weights.sync(version=step + 1)

    gen_tokens = float(mask.sum())
    step_time = time.perf_counter() - step_start
    return {
        "reward/mean": scores.mean().item(),
        "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl/mean": A.masked_sum(kl, mask).item() / len(idx),  # per-sequence KL summed over tokens
        "kl/token_mean": A.masked_mean(kl, mask).item(),
        "loss/policy": policy_stats["policy_loss"],
        "loss/value": critic_stats["value_loss"],
        "ppo/clipfrac": policy_stats["clipfrac"],
        "ppo/approx_kl": policy_stats["approx_kl"],
        "ppo/value_clipfrac": critic_stats["value_clipfrac"],
        "ppo/lr": policy_stats["lr"],
        "entropy/mean": A.masked_mean(entropy, mask).item(),
        "response_length/mean": mask.sum(-1).mean().item(),
        "logprob_gap/mean": A.masked_mean((engine_logprobs - old_logprobs).abs(), mask).item(),
        **timer.times,
        "time/step": step_time,
        "throughput/gen_tokens_per_s": gen_tokens / max(timer.times["time/generate"], 1e-9),
    }


def run_ppo(cfg: Config, roles: Roles, prompts: PromptSet, logger: RunLogger) -> None:
    """``cfg.total_steps`` PPO iterations, each logged as it finishes."""
    sampler = PromptSampler(len(prompts), cfg.rollout.batch_size, cfg.seed)
    for step in range(cfg.total_steps):
        logger.log(step, ppo_step(step, cfg, roles, prompts, sampler))
