"""A step's logged metrics, and the watchers that warn once when one of them says the run is off.

Called by the loop (``controller.rl_step``, ``controller.run_rl``); pure arithmetic on the step's
tensors and the trainer groups' stats, apart from the warnings, which go through the run's logger.
"""

from __future__ import annotations

import math

import torch

from rlhf_dist.core.stats import masked_mean
from rlhf_dist.driver.run_logger import RunLogger


class GapWatch:
    """Warns once when ``logprob_gap/mean`` (engine vs trainer logprobs of the sampled tokens)
    exceeds ``threshold``, and keeps the largest gap for summary.json (``logprob_gap/max``)."""

    def __init__(self, threshold: float, logger: RunLogger) -> None:
        self.threshold, self.logger, self.warned = threshold, logger, False

    def observe(self, step: int, gap: float) -> None:
        if not self.warned and not gap <= self.threshold:
            self.warned = True
            self.logger.message(
                f"rlhf_dist: warning: step {step}: logprob_gap/mean {gap:.3g} > {self.threshold:g}: the engines "
                f"sample from another policy than the trainer's (weight_sync.gap_warn)"
            )
        largest = self.logger.extra_summary.get("logprob_gap/max", 0.0)
        self.logger.add_summary({"logprob_gap/max": gap if math.isnan(gap) else max(largest, gap)})


class OverlongWatch:
    """Warns once when DAPO's overlong shaping penalises most of a step's responses: the buffer
    (``reward.overlong_buffer``) then covers responses of the length the task needs, and the policy
    learns to answer short rather than right (docs/results.md: a 4-token budget)."""

    SHARE = 0.5

    def __init__(self, logger: RunLogger) -> None:
        self.logger, self.warned = logger, False

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        share = metrics.get("reward/overlong_frac", 0.0)
        if not self.warned and share > self.SHARE:
            self.warned = True
            self.logger.message(
                f"rlhf_dist: warning: step {step}: {share:.0%} of the responses got the overlong penalty "
                f"({metrics['response_length/truncated_frac']:.0%} were cut off): reward.overlong_buffer covers "
                "the lengths the task needs; raise rollout.max_new_tokens or lower reward.overlong_buffer"
            )


ROLLOUT_COLUMNS = ["step", "prompt", "response", "reward", "kl"]


def step_metrics(
    raw_scores: torch.Tensor, kept: torch.Tensor, kl: torch.Tensor, sequence_kl: torch.Tensor, mask: torch.Tensor,
    entropy: torch.Tensor, engine_logprobs: torch.Tensor, old_logprobs: torch.Tensor, kl_coef: float,
    policy_stats: dict[str, float], critic_stats: dict[str, float] | None, times: dict[str, float], step_s: float,
) -> dict[str, float]:
    """One iteration's logged metrics. ``raw_scores`` (B,) as scored (NaN where dropped), ``kept``
    (B,) bool, ``sequence_kl`` (B,) the per-token ``kl`` (B, T) summed over each response; ``entropy``,
    ``engine_logprobs`` and ``old_logprobs`` (B, T); ``times`` the ``time/*`` phases, ``step_s``
    the whole iteration; the trainer groups' stats (``critic_stats`` None or empty without a critic)."""
    valid = raw_scores[kept]
    metrics = {
        "reward/mean": valid.mean().item(),
        "reward/std": valid.std().item() if len(valid) > 1 else 0.0,
        "reward/dropped": float((~kept).sum()),
        "kl/mean": sequence_kl.mean().item(),  # per sequence, summed over tokens
        "kl/token_mean": masked_mean(kl, mask).item(),
        "kl/coef": kl_coef,
        "loss/policy": policy_stats["policy_loss"],
        "ppo/clipfrac": policy_stats["clipfrac"],
        "ppo/approx_kl": policy_stats["approx_kl"],
        "ppo/lr": policy_stats["lr"],
        "entropy/mean": masked_mean(entropy, mask).item(),
        "response_length/mean": mask.sum(-1).mean().item(),
        "logprob_gap/mean": masked_mean((engine_logprobs - old_logprobs).abs(), mask).item(),
        **times,
        "time/step": step_s,
        "throughput/gen_tokens_per_s": float(mask.sum()) / max(times["time/generate"], 1e-9),
    }
    if "kl_loss" in policy_stats:
        metrics["loss/kl"] = policy_stats["kl_loss"]
    if "aux_loss" in policy_stats:  # a mixture-of-experts policy's load-balancing loss (algo.router_aux_loss_coef)
        metrics["loss/aux"] = policy_stats["aux_loss"]
    if "routing/replay_changed" in policy_stats:  # algo.routing_replay
        metrics["routing/replay_changed"] = policy_stats["routing/replay_changed"]
    if critic_stats:
        metrics["loss/value"] = critic_stats["value_loss"]
        metrics["ppo/value_clipfrac"] = critic_stats["value_clipfrac"]
    return metrics


def sample_metrics(
    step: int, gens: list, kept: torch.Tensor, truncated: torch.Tensor, mask_truncated: bool
) -> dict[str, float]:
    """How old the step's samples are (policy updates between sampling and ``step``) and how many
    were cut off by the length budget (and, with ``algo.mask_truncated``, left out of the gradient)."""
    staleness = [step - g.version for g in gens]
    metrics = {
        "rollout/staleness_mean": sum(staleness) / len(staleness),
        "rollout/staleness_max": float(max(staleness)),
        "response_length/truncated_frac": truncated.float().mean().item(),
    }
    if mask_truncated:
        metrics["rollout/masked_truncated"] = float((kept & truncated).sum())
    return metrics


def env_metrics(generations: list) -> dict[str, float]:
    """``env/*`` of a step's multi-turn samples ({} for single-turn ones): turns and tool calls per
    sample, failed calls, and ``time/env``, the seconds spent in environment calls summed over the
    samples (they overlap generation and one another, so it can exceed the step)."""
    stats = [g.env for g in generations if g.env is not None]
    if not stats:
        return {}
    count = len(stats)
    return {
        "env/turns_mean": sum(s["turns"] for s in stats) / count,
        "env/tool_calls_mean": sum(s["tool_calls"] for s in stats) / count,
        "env/errors": float(sum(s["error"] == "error" for s in stats)),
        "env/timeouts": float(sum(s["error"] == "timeout" for s in stats)),
        "time/env": sum(s["seconds"] for s in stats),
    }
