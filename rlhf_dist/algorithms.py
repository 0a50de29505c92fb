"""PPO math for RLHF: masked statistics, KL penalty, GAE, clipped losses, LR schedule.

Pure functions over tensors and floats. Per-token tensors are ``(B, T)`` over *response*
positions; ``mask`` is ``(B, T)`` (float or bool), 1 on real response tokens and 0 on the
right padding after the response ends. Every row has at least one valid token.
"""

import math

import torch


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` over valid positions; over all elements when ``dim`` is None.

    Shape: x, mask (B, T) -> scalar, or x reduced along ``dim``.
    """
    # sum_i x_i * m_i
    masked = x * mask.to(x.dtype)
    return masked.sum() if dim is None else masked.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid positions; over all elements when ``dim`` is None.

    Shape: x, mask (B, T) -> scalar, or x reduced along ``dim``.
    """
    # sum_i x_i * m_i / sum_i m_i
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x), mask, dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over all valid positions (a scalar).

    Shape: x, mask (B, T) -> scalar.
    """
    # var = sum_i m_i (x_i - mean)^2 / n, times n / (n - 1) when unbiased; n = sum_i m_i
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask)
        # This reads the count on the host (a sync point); one valid token has no unbiased variance.
        if n.item() < 2:
            raise ValueError(
                f"masked_var(unbiased=True) needs at least 2 valid positions, got {n.item():g}; "
                "pass unbiased=False or a larger batch"
            )
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Normalise ``x`` to zero mean and unit (unbiased) variance over valid positions.

    With ``shift_mean=False`` the original mean is added back (only the scale changes).
    Padding positions get the same affine map as valid ones and are not re-zeroed: their
    values are meaningless, so keep applying ``mask`` downstream.
    Shape: x, mask (B, T) -> (B, T).
    """
    # w = (x - mean) / sqrt(var + eps)  [+ mean if not shift_mean]
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k1 (Schulman), unbiased but can be negative.

    Shape: (B, T), (B, T) -> (B, T).
    """
    # k1_t = log pi(a_t) - log ref(a_t)
    return logprobs - ref_logprobs


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: the KL penalty on every valid token, the score on the last one.

    Shape: scores (B,), kl (B, T), mask (B, T) -> (B, T); 0 on padding.
    """
    # r_t = -kl_coef * kl_t * m_t  +  score * [t == last valid index]
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    # Responses are right-padded, so the last valid index is (number of valid tokens - 1).
    last = mask.sum(dim=1).long() - 1
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def whiten_scores(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise sequence scores across the batch; with one score only the mean is removed.

    Shape: (B,) -> (B,).
    """
    # s' = (s - mean(s)) / (std(s, unbiased) + eps); B == 1: s' = s - mean(s)
    centered = scores - scores.mean()
    if scores.numel() == 1:
        return centered
    return centered / (scores.std(unbiased=True) + eps)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    The episode ends at the last valid token, so the value after it counts as 0. Inputs are
    treated as constants: pass detached tensors. Shape: (B, T) each -> (B, T), (B, T),
    both zero on padding.
    """
    # delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
    # A_t     = delta_t + gamma * lam * m_{t+1} * A_{t+1}
    # R_t     = A_t + V_t
    mask = mask.to(values.dtype)
    num_steps = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    next_mask = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(num_steps)):
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        adv = delta + gamma * lam * next_mask * next_adv
        advantages.append(adv)
        next_value, next_adv, next_mask = values[:, t], adv, mask[:, t]
    advantages = torch.stack(advantages[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss, averaged over valid tokens.

    Shape: (B, T) each -> scalar loss; stats ``clipfrac`` (share of valid tokens where the
    clipped term is strictly the larger) and ``approx_kl`` (mean of 0.5 * (logp - old)^2).
    """
    # ratio = exp(logp - old_logp)
    # loss  = mean_valid( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss, averaged over valid tokens.

    Shape: (B, T) each -> scalar loss; stat ``clipfrac`` (share of valid tokens where the
    clipped error is strictly the larger).
    """
    # v_clip = old + clamp(v - old, -eps, eps)
    # loss   = 0.5 * mean_valid( max((v - R)^2, (v_clip - R)^2) )
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).to(err.dtype), mask).item()}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position, computed in float32.

    Shape: (B, T, V) -> (B, T).
    """
    # H = logsumexp(l) - sum_v softmax(l)_v * l_v
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label token, computed in float32 (bf16 log_softmax is too coarse).

    Shape: logits (B, T, V), labels (B, T) -> (B, T).
    """
    # log p(y_t) = l_{t, y_t} - logsumexp(l_t)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return log_probs.gather(dim=-1, index=labels.long().unsqueeze(-1)).squeeze(-1)


_SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Factor applied to the base learning rate at optimizer step ``step`` (0-based).

    Warmup (step < warmup_steps): (step + 1) / warmup_steps, reaching 1.0 on the last warmup
    step. After it, with progress = (step - warmup_steps) / (total_steps - warmup_steps)
    clamped to [0, 1]: "constant" -> 1, "linear" -> 1 - progress,
    "cosine" -> 0.5 * (1 + cos(pi * progress)).
    """
    if schedule not in _SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {_SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    # max(1, ...) keeps a schedule with no decay phase (total <= warmup) from dividing by zero.
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
