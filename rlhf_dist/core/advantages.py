"""Advantages by name: GAE and REINFORCE++ (per token), GRPO, Dr. GRPO and RLOO (group
baselines); the scores of dropped samples, DAPO's group filter and overlong penalty. Pure torch.

Per-token tensors are ``(B, T)`` over *response* positions; ``mask`` is ``(B, T)`` (float or
bool), 1 on real response tokens and 0 on the right padding after the response ends. Every row
must have at least one valid token (``experience.collate`` guarantees it). ``token_rewards``, which would otherwise write onto padding, raises
ValueError naming the empty rows. Group estimators take ``scores`` ``(B,)`` laid out as
``B = num_prompts * n`` with the ``n`` samples of prompt ``g`` contiguous, in rows ``[g * n, (g + 1) * n)``.
"""

import math

import torch

from rlhf_dist.core.stats import broadcast_to_tokens, check_response_tokens, masked_sum, masked_whiten, whiten_scores


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: the KL penalty on every valid token, the score on the last one.

    Every row needs a valid token (ValueError naming the rows otherwise): an empty row's "last
    valid index" would be -1, the last padding column.
    Shape: scores (B,), kl (B, T), mask (B, T) -> (B, T); 0 on padding.
    """
    # r_t = -kl_coef * kl_t * m_t  +  score * [t == last valid index]
    check_response_tokens(mask, "token_rewards")
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    # The last valid index; not (number of valid tokens - 1): a multi-turn response has masked
    # environment tokens between the model's turns.
    columns = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.bool(), columns, -1).max(dim=1).values
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype)
    return rewards


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; returns (advantages, returns).

    The steps are the valid tokens (mask 1): a masked token inside a response (an environment's
    observation between two model turns) is skipped, so the token before it bootstraps from the
    value of the next valid token, one discount step on. The episode ends at the last valid token,
    so the value after it counts as 0. Inputs are treated as constants: pass detached tensors.
    Shape: (B, T) each -> (B, T), (B, T), both zero on masked positions.
    """
    # Over the valid tokens t < t' (t' the next valid token after t):
    # delta_t = r_t + gamma * V_t' - V_t                (V_t' = 0 past the last valid token)
    # A_t     = delta_t + gamma * lam * A_t'
    # R_t     = A_t + V_t
    mask = mask.to(values.dtype)
    num_steps = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    advantages = []
    for t in reversed(range(num_steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages.append(adv)
        valid = mask[:, t].bool()  # a masked token passes the next valid token's value and advantage on
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
    advantages = torch.stack(advantages[::-1], dim=1) * mask
    returns = (advantages + values) * mask
    return advantages, returns


def _groups(scores: torch.Tensor, n: int, caller: str) -> torch.Tensor:
    """View ``scores`` (B,) as (num_prompts, n), checking the layout; row g is prompt g."""
    if scores.dim() != 1:
        raise ValueError(f"{caller}: scores must have shape (B,), got {tuple(scores.shape)}")
    # One sample has no group baseline (and no unbiased std): its advantage would be 0 or NaN.
    if n < 2:
        raise ValueError(f"{caller}: n={n} samples per prompt; group baselines need n >= 2")
    if scores.numel() % n != 0:
        raise ValueError(
            f"{caller}: B={scores.numel()} scores is not a multiple of n={n}; the batch must "
            "hold n contiguous samples for every prompt"
        )
    return scores.reshape(-1, n)


# Floor of the group std in GRPO. With 1e-6, scores that differ only by float noise (1e-6)
# were scaled up to advantages of -0.17 / +0.5; 1e-4 is TRL's epsilon. It is a floor, max(std,
# eps), rather than TRL's std + eps, so that a group whose std is above it is standardised exactly.
GROUP_STD_EPS = 1e-4


def grpo_advantages(scores: torch.Tensor, n: int, eps: float = GROUP_STD_EPS) -> torch.Tensor:
    """GRPO (DeepSeekMath) advantages: scores standardised within each prompt's group.

    The std is floored at ``eps`` (GROUP_STD_EPS = 1e-4), so a group whose scores differ by less
    than about eps gets advantages of at most |r_i - mean_g| / eps, and an all-equal group gets 0.
    Shape: (B,) -> (B,).
    """
    # A_i = (r_i - mean_g) / max(std_g, eps), std_g unbiased (divides by n - 1)
    grouped = _groups(scores, n, "grpo_advantages")
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)
    return ((grouped - mean) / torch.clamp(std, min=eps)).reshape(-1)


def dr_grpo_advantages(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025) advantages: GRPO without the std normalisation.

    Shape: (B,) -> (B,).
    """
    # A_i = r_i - mean_g
    grouped = _groups(scores, n, "dr_grpo_advantages")
    return (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, n: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024) advantages: each score minus the mean of the others in its group.

    Shape: (B,) -> (B,).
    """
    # A_i = r_i - (sum_g - r_i) / (n - 1)  ( = n / (n - 1) * (r_i - mean_g) )
    grouped = _groups(scores, n, "rloo_advantages")
    leave_one_out = (grouped.sum(dim=1, keepdim=True) - grouped) / (n - 1)
    return (grouped - leave_one_out).reshape(-1)


def reinforce_pp_advantages(
    rewards: torch.Tensor, mask: torch.Tensor, gamma: float
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025) advantages: discounted reward-to-go, whitened over the whole batch.

    ``rewards`` are per-token (e.g. ``token_rewards``: KL penalty on each token, score on the
    last). The batch needs at least 2 valid tokens (unbiased variance). Inputs are treated
    as constants: pass detached tensors. Shape: (B, T), (B, T) -> (B, T), zero on padding.
    """
    # Over the valid tokens t < t' (t' the next one): G_t = r_t + gamma * G_t', 0 past the last;
    # a masked token inside a response (an observation) is skipped. A = masked_whiten(G) * m
    mask = mask.to(rewards.dtype)
    next_return = torch.zeros_like(rewards[:, 0])
    returns = []
    for t in reversed(range(rewards.shape[1])):
        next_return = torch.where(mask[:, t].bool(), rewards[:, t] + gamma * next_return, next_return)
        returns.append(next_return)
    returns = torch.stack(returns[::-1], dim=1) * mask
    return masked_whiten(returns, mask) * mask


def _gae_whitened(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    # PPO: GAE advantages whitened over the batch's valid tokens (0 on padding), and the returns.
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    return masked_whiten(advantages, mask) * mask, returns


def _reinforce_pp(
    rewards: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, None]:
    return reinforce_pp_advantages(rewards, mask, gamma), None


# Estimators on per-token rewards (score on the last token, KL penalty on each):
# (rewards, values, mask, gamma, lam) -> (advantages (B, T), returns (B, T) or None).
TOKEN_ESTIMATORS = {"gae": _gae_whitened, "reinforce_pp": _reinforce_pp}


# Estimators on one reward per sequence, baselined within each prompt's group: (scores (B,), n) -> (B,).
GROUP_ESTIMATORS = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages, "rloo": rloo_advantages}


def estimate_advantages(
    estimator: str, scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None,
    n: int, kl_coef: float, gamma: float, lam: float, whiten_rewards: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Advantages (B, T), and the returns (B, T) for ``gae`` (None otherwise), by the estimator
    named ``estimator`` (a key of TOKEN_ESTIMATORS or GROUP_ESTIMATORS).

    ``kl_coef`` weighs the KL penalty in the reward: pass 0 when the KL is a loss term instead.
    Token estimators shape ``token_rewards(scores, kl, mask, kl_coef)`` (scores whitened over the
    batch first if ``whiten_rewards``); ``values`` (B, T) is read by ``gae`` only, ``lam`` too.
    Group estimators take one reward per sequence, with ``n`` samples per prompt, and put it on
    every valid token. Shape: scores (B,), kl, mask (B, T) -> (B, T), (B, T) or None.
    """
    # token:  r_t = -kl_coef * kl_t + score * [t == last];  A = estimator(r)
    # group:  r = score - kl_coef * sum_t m_t kl_t;  A_{b,t} = estimator(r, n)_b * m_{b,t}
    if estimator in TOKEN_ESTIMATORS:
        shaped = token_rewards(whiten_scores(scores) if whiten_rewards else scores, kl, mask, kl_coef)
        return TOKEN_ESTIMATORS[estimator](shaped, values, mask, gamma, lam)
    if estimator in GROUP_ESTIMATORS:
        sequence_rewards = scores - kl_coef * masked_sum(kl, mask, dim=-1)
        return broadcast_to_tokens(GROUP_ESTIMATORS[estimator](sequence_rewards, n), mask), None
    raise ValueError(
        f"unknown advantage estimator {estimator!r}; expected one of {(*TOKEN_ESTIMATORS, *GROUP_ESTIMATORS)}"
    )


def neutralise_dropped(scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill in the NaN scores of dropped samples so that baselines ignore them.

    Each NaN becomes the mean of its group's valid scores (the ``n`` contiguous samples of its
    prompt), or the batch's valid mean when the whole group was dropped; ValueError if every
    score is NaN. Returns (filled scores, mask of the kept samples).
    Shape: (B,) -> (B,), (B,) bool.
    """
    # kept_i = not isnan(s_i);  s_i <- mean_{j in g, kept_j} s_j  (or mean_{kept} s) where not kept_i
    kept = ~torch.isnan(scores)
    if not kept.any():
        raise ValueError("reward: every sample of the step was dropped as invalid")
    fill = scores[kept].mean()
    filled = scores.clone()
    for g in range(0, len(scores), n):
        group_kept = kept[g : g + n]
        filled[g : g + n][~group_kept] = scores[g : g + n][group_kept].mean() if group_kept.any() else fill
    return filled, kept


def informative_groups(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Which prompt groups carry a learning signal under a group baseline (DAPO's dynamic
    sampling keeps only those): at least two valid scores that are not all equal. A group whose
    valid scores are equal (all correct, all wrong) gets advantage 0 on every sample from
    grpo, dr_grpo and rloo alike. NaN marks a dropped sample (``neutralise_dropped``).
    Shape: (B,) -> (B / n,) bool.
    """
    # informative_g = #{valid in g} >= 2 and max_{valid in g} s > min_{valid in g} s
    grouped = _groups(scores, n, "informative_groups")
    valid = ~torch.isnan(grouped)
    high = torch.where(valid, grouped, -math.inf).max(dim=1).values
    low = torch.where(valid, grouped, math.inf).min(dim=1).values
    return (valid.sum(dim=1) >= 2) & (high > low)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), added to a response's score: 0 up
    to ``max_len - buffer`` tokens, then falling linearly to ``-factor`` at ``max_len`` (the
    generation budget, ``rollout.max_new_tokens``), ``-factor`` beyond it. ``buffer`` 0 is off.
    Shape: lengths (B,) -> (B,) float.
    """
    # R(l) = 0                          l <= L - C
    #      = ((L - C) - l) / C          L - C < l <= L
    #      = -1                         l > L          (all times factor; L = max_len, C = buffer)
    if not 0 <= buffer <= max_len:
        raise ValueError(f"overlong_penalty: buffer={buffer} must be in [0, max_len={max_len}]")
    lengths = lengths.to(torch.float32)
    if buffer == 0:
        return torch.zeros_like(lengths)
    soft = ((max_len - buffer) - lengths) / buffer
    return factor * torch.clamp(soft, min=-1.0, max=0.0)
