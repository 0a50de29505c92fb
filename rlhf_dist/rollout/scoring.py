"""Every change to a sample's score between the reward actors and the advantages, in the order
it is made:

1. ``task_scores``: the reward actors' score plus ``reward.env_weight`` times a multi-turn
   environment's return (a failed environment: the step fails, or the sample is dropped as NaN,
   ``reward.on_invalid``). This is the task's own verdict on a sample: DAPO's group filter
   (``rollout.dynamic_sampling``) keeps or drops a prompt group on it, so a group of answers
   that are all correct is dropped whatever their lengths, as in the DAPO paper (0 < #correct < G)
   and veRL's recipe (``metric=acc``).
2. ``shaped``: DAPO's overlong penalty (``reward.overlong_buffer``) added, by response length.
   The shaped score is what the batch carries (``RolloutBatch.scores``), is logged as the reward,
   and is what the advantages are computed from.
3. ``advantages_for``: dropped samples (NaN) take their group's mean, so no baseline sees them
   (``core.advantages.neutralise_dropped``), and with ``algo.kl_in == "reward"`` the KL penalty
   enters the reward; then ``algo.estimator``'s advantages.
"""

from __future__ import annotations

import torch

from rlhf_dist.config import AlgoConfig, Config
from rlhf_dist.core.advantages import estimate_advantages, overlong_penalty
from rlhf_dist.roles.agent_loop import EnvError


def task_scores(scores: list[float], generations: list, weight: float, on_invalid: str) -> list[float]:
    """Each sample's score plus ``weight`` times its environment's return (``reward.env_weight``).
    A trajectory whose environment raised or timed out fails the step (``reward.on_invalid=error``)
    naming the sample, or is dropped (NaN, ``drop``). Single-turn samples keep their score."""
    out = []
    for i, (score, g) in enumerate(zip(scores, generations)):
        if g.env is None:
            out.append(score)
        elif g.env["error"]:
            if on_invalid == "error":
                raise EnvError(f"generation.env: sample {i}: the environment failed ({g.env['error']}): "
                               f"{g.env['message']} (reward.on_invalid=drop skips such samples)")
            out.append(float("nan"))
        else:
            out.append(score + weight * g.env["return"])
    return out


def overlong(cfg: Config, generations: list) -> torch.Tensor | None:
    """Each response's overlong penalty (``reward.overlong_buffer``; None when it is off)."""
    reward = cfg.reward
    if not reward.overlong_buffer:
        return None
    lengths = torch.tensor([len(g.response_ids) for g in generations])
    return overlong_penalty(lengths, cfg.rollout.max_new_tokens, reward.overlong_buffer, reward.overlong_penalty)


def shaped(cfg: Config, generations: list, scores: list[float]) -> tuple[list[float], dict[str, float]]:
    """Task scores plus DAPO's overlong penalty (NaN stays NaN), and its statistics ({} when off)."""
    penalty = overlong(cfg, generations)
    if penalty is None:
        return scores, {}
    stats = {"reward/overlong_penalty_mean": penalty.mean().item(),
             "reward/overlong_frac": (penalty < 0).float().mean().item()}
    return [s + p for s, p in zip(scores, penalty.tolist())], stats


def advantages_for(
    algo: AlgoConfig, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
    values: torch.Tensor | None, n: int, kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``core.advantages.estimate_advantages`` with ``algo``'s estimator on scores without NaN
    (``core.advantages.neutralise_dropped``); the KL penalty enters the reward only when ``algo.kl_in == "reward"``
    (otherwise it is a loss term)."""
    beta = kl_coef if algo.kl_in == "reward" else 0.0
    return estimate_advantages(
        algo.estimator, scores, kl, mask, values, n, beta, algo.gamma, algo.lam, algo.whiten_rewards
    )

