"""RLHF math: masked statistics, advantages (GAE, GRPO,
Dr. GRPO, RLOO, REINFORCE++, chosen by name), dropped-sample scores, DAPO's group filter and
overlong shaping, clipped losses (token- or sequence-level ratios) and their aggregation,
off-policy rollout correction, LR schedule. The KL estimators and controllers are in
``rlhf_dist.kl``.

Pure functions over tensors and floats. Per-token tensors are ``(B, T)`` over *response*
positions; ``mask`` is ``(B, T)`` (float or bool), 1 on real response tokens and 0 on the
right padding after the response ends. Every row must have at least one valid token
(``experience.collate`` guarantees it); ``token_rewards`` and the ``seq_mean_*`` aggregations,
which would otherwise write onto padding or return NaN, raise ValueError naming the empty rows.
Group estimators take ``scores`` ``(B,)`` laid out as ``B = num_prompts * n`` with the ``n``
samples of prompt ``g`` contiguous, in rows ``[g * n, (g + 1) * n)``.
"""

import math

import torch

from rlhf_dist.kl import kl_estimate, kl_k3


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


def _check_response_tokens(mask: torch.Tensor, caller: str, every_row: bool = True) -> None:
    """Raise ValueError naming the rows of ``mask`` (B, T) with no valid token: if any row has
    none (``every_row``), else only if no row has one. Reads the mask on the host (a sync point)."""
    has_token = mask.bool().any(dim=1)
    ok = has_token.all() if every_row else has_token.any()
    if ok:
        return
    rows = (~has_token).nonzero().flatten().tolist()
    raise ValueError(
        f"{caller}: rows {rows} of the batch have no response token (their mask is all 0); every "
        "row needs at least one (experience.collate keeps one pad token for an empty response)"
    )


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: the KL penalty on every valid token, the score on the last one.

    Every row needs a valid token (ValueError naming the rows otherwise): an empty row's "last
    valid index" would be -1, the last padding column.
    Shape: scores (B,), kl (B, T), mask (B, T) -> (B, T); 0 on padding.
    """
    # r_t = -kl_coef * kl_t * m_t  +  score * [t == last valid index]
    _check_response_tokens(mask, "token_rewards")
    mask = mask.to(kl.dtype)
    rewards = -kl_coef * kl * mask
    # The last valid index; not (number of valid tokens - 1): a multi-turn response has masked
    # environment tokens between the model's turns.
    columns = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask.bool(), columns, -1).max(dim=1).values
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


def broadcast_to_tokens(seq_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each sequence's value on every valid token of its row, 0 on padding.

    Shape: seq_values (B,), mask (B, T) -> (B, T).
    """
    # out_{b,t} = v_b * m_{b,t}; where() rather than a product so a non-finite v stays off padding
    return torch.where(mask.bool(), seq_values.unsqueeze(1), seq_values.new_zeros(()))


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


_LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, agg: str, max_len: int | None = None, total: float | None = None
) -> torch.Tensor:
    """Reduce a per-token loss over valid tokens to a scalar.

    "token_mean": every valid token weighs the same (long responses weigh more).
    "seq_mean_token_mean": every sequence weighs the same (its tokens share 1 / B).
    "seq_mean_token_sum_norm" (Dr. GRPO): divide by the constant ``B * max_len``, e.g.
    ``max_len`` = the generation budget, so no length normalisation biases the gradient;
    ``max_len`` is read only by this mode.
    The seq_mean modes need a valid token in every row (an empty row's token mean is 0 / 0 = NaN;
    sum_norm would count it in B with nothing in it), token_mean in at least one (else 0 / 0);
    otherwise ValueError naming the empty rows.
    Also for the entropy bonus:
    ``loss = pg_loss - entropy_coef * aggregate_loss(entropy_from_logits(logits), mask, agg)``.
    ``total`` makes the rows one part of a larger batch (a micro-batch of a minibatch spread over
    micro-batches and ranks): it replaces the count the mean divides by (``loss_total``: valid
    tokens for token_mean, sequences for the seq modes) with the whole batch's, so the parts' losses
    add up to the batch's loss however it was cut. None: these rows are the whole batch.
    Shape: per_token, mask (B, T) -> scalar.
    """
    # token_mean:              sum_{b,t} m x / N        N = total or sum_{b,t} m
    # seq_mean_token_mean:     sum_b ( sum_t m x / sum_t m ) / S      S = total or B
    # seq_mean_token_sum_norm: sum_{b,t} m x / (S * max_len)
    if agg not in _LOSS_AGGS:
        raise ValueError(f"unknown loss agg {agg!r}; expected one of {_LOSS_AGGS}")
    if total is None or agg != "token_mean":  # a part of a batch may hold no token: it adds 0
        _check_response_tokens(mask, f"aggregate_loss(agg={agg!r})", every_row=agg != "token_mean")
    if total is None:
        total = loss_total(mask, agg)
    if total <= 0:
        raise ValueError(f"aggregate_loss(agg={agg!r}): total={total} must be > 0")
    if agg == "token_mean":
        return masked_sum(per_token, mask) / total
    if agg == "seq_mean_token_mean":
        return masked_mean(per_token, mask, dim=1).sum() / total
    if max_len is None or max_len <= 0:
        raise ValueError(
            f"agg='seq_mean_token_sum_norm' needs max_len > 0 (a constant such as the "
            f"generation budget), got max_len={max_len}"
        )
    return masked_sum(per_token, mask) / (total * max_len)


def loss_total(mask: torch.Tensor, agg: str) -> float:
    """What ``aggregate_loss(agg)`` divides by for the rows of ``mask`` (B, T): their valid tokens
    (token_mean) or their number (seq modes). Summed over the parts of a batch, it is the batch's
    ``total``."""
    if agg not in _LOSS_AGGS:
        raise ValueError(f"unknown loss agg {agg!r}; expected one of {_LOSS_AGGS}")
    return float(mask.sum().item()) if agg == "token_mean" else float(mask.shape[0])


ROLLOUT_CORRECTIONS = ("none", "tis", "mis")
RATIO_LEVELS = ("token", "sequence")


def rollout_correction(
    old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor, mode: str, cap: float
) -> tuple[torch.Tensor | None, dict[str, float]]:
    """Per-token weights that correct the policy loss for tokens sampled by the engines
    (pi_rollout: vLLM's numerics, perhaps a policy version behind) rather than by the trainer's
    policy before the update (pi_old), and the mismatch statistics; ``cap`` > 1.

    With rho_t = pi_old(y_t) / pi_rollout(y_t) = exp(old_logprobs - rollout_logprobs):
    "none": no weights (None), the statistics only, so the mismatch is seen before it is corrected.
    "tis", truncated IS (Yao et al. 2025, "Your efficient RL framework secretly brings you
    off-policy RL training"): w_t = min(rho_t, cap).
    "mis", masked IS, the IcePop operator M(rho; 1/cap, cap) of Ring-1T (Ling Team 2025, "Every
    step evolves", arXiv 2510.18855), the two-sided form of Yao et al.'s follow-up token-level MIS:
    w_t = rho_t where 1/cap <= rho_t <= cap, else 0. A kept token keeps its IS weight (it is
    corrected, not just let through); a dropped one contributes nothing.
    The weights are constants, 0 on padding; ``policy_loss`` multiplies each token's PPO term by
    them and leaves the denominators as they are: a dropped token still counts among token_mean's
    tokens and in its row's length (IcePop's 1 / sum_i |y_i|), so dropping a token removes its
    term without scaling up the others, and a micro-batch whose tokens are all dropped adds 0, not 0 / 0.
    Stats, over valid tokens: ``rollout_corr/ratio_mean`` and ``ratio_max`` (rho before truncation),
    ``mismatch_kl`` (k3 estimate of KL(pi_rollout || pi_old), mean per token, ``kl_k3``'s clamps),
    and ``truncated_frac`` (tis: share with rho > cap) or ``masked_frac`` (mis: share with w = 0).
    Shape: (B, T) each -> (B, T) or None, stats.
    """
    # rho = exp(old - rollout);  tis: w = min(rho, cap);  mis: w = rho * [1/cap <= rho <= cap]
    # mismatch_kl = mean_valid(rho - 1 - log rho)  (k3, tokens sampled from pi_rollout)
    if mode not in ROLLOUT_CORRECTIONS:
        raise ValueError(f"unknown rollout correction {mode!r}; expected one of {ROLLOUT_CORRECTIONS}")
    if cap <= 1.0:
        raise ValueError(
            f"rollout correction cap must be > 1 (tis truncates rho at it, mis keeps [1/cap, cap]), got {cap}"
        )
    _check_response_tokens(mask, "rollout_correction", every_row=False)
    valid = mask.bool()
    with torch.no_grad():
        # Padding gets rho = 1 so that no overflow there can turn into NaN in the masked means.
        ratio = torch.exp(torch.where(valid, old_logprobs - rollout_logprobs, 0.0))
        stats = {
            "rollout_corr/ratio_mean": masked_mean(ratio, mask).item(),
            "rollout_corr/ratio_max": ratio[valid].max().item(),
            "rollout_corr/mismatch_kl": masked_mean(kl_k3(rollout_logprobs, old_logprobs), mask).item(),
        }
        if mode == "none":
            return None, stats
        if mode == "tis":
            weights = torch.clamp(ratio, max=cap)
            stats["rollout_corr/truncated_frac"] = masked_mean((ratio > cap).to(ratio.dtype), mask).item()
        else:
            kept = (ratio >= 1.0 / cap) & (ratio <= cap)
            weights = torch.where(kept, ratio, 0.0)  # where, not rho * kept: an overflowed rho is inf
            stats["rollout_corr/masked_frac"] = masked_mean((~kept).to(ratio.dtype), mask).item()
        return torch.where(valid, weights, 0.0), stats


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    *,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    agg: str = "token_mean",
    max_len: int | None = None,
    rollout_weights: torch.Tensor | None = None,
    ratio_level: str = "token",
    total: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss, reduced over valid tokens by ``aggregate_loss(agg, max_len, total)``.

    ``ratio_level`` "token" clips each token's ratio pi / pi_old (PPO, GRPO). "sequence" is GSPO
    (Zheng et al. 2025, "Group Sequence Policy Optimization"): the ratio is the sequence's
    length-normalised likelihood ratio s_i = exp(mean_t log(pi / pi_old)), clipped per sequence,
    in the paper's token form (GSPO-token, eq. 13) s_it = sg[s_i] * pi_t / sg[pi_t]: equal to
    s_i in value, with gradient s_i * grad log pi_t, so with advantages constant over a response
    and ``agg="seq_mean_token_mean"`` (1 / |y_i| per sequence) it is GSPO's objective and gradient.
    ``clip_eps_high`` (DAPO "clip-higher") sets the upper clip bound 1 + clip_eps_high
    (None: clip_eps). ``dual_clip`` = c > 1 (Ye et al. 2020) caps the loss of tokens with
    A < 0 at -A * c, so a huge ratio on a bad token cannot blow up the update.
    ``rollout_weights`` (B, T), from ``rollout_correction`` (None: no correction), multiply each
    token's term as constants (no gradient flows into them); the aggregation is unchanged, so a
    token of weight 0 still counts in the denominator.
    Shape: (B, T) each -> scalar loss. Stats, always means over valid tokens: ``clipfrac``
    (the clipped term is strictly the larger), ``approx_kl`` (0.5 * (logp - old)^2) and, when
    ``dual_clip`` is set, ``dual_clipfrac`` (the cap is active).
    """
    # ratio = exp(logp - old_logp)                                   (token)
    # ratio = exp(logp - sg[logp] + sg[mean_t (logp - old_logp)])    (sequence, GSPO-token)
    # l     = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps_high))
    # l     = min(l, -A * c)   where A < 0, if dual_clip
    # l     = w * l            if rollout_weights
    # loss  = aggregate_loss(l, mask, agg)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (the cap is -A * dual_clip), got {dual_clip}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; expected one of {RATIO_LEVELS}")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = logprobs - old_logprobs
    if ratio_level == "sequence":
        _check_response_tokens(mask, "policy_loss(ratio_level='sequence')")
        sequence = masked_mean(log_ratio, mask, dim=1).detach().unsqueeze(1)
        ratio = torch.exp(logprobs - logprobs.detach() + sequence)
    else:
        ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        cap = -advantages * dual_clip
        # The capped value does not depend on logprobs, so capped tokens get no gradient.
        capped = (advantages < 0) & (per_token > cap)
        per_token = torch.where(capped, cap, per_token)
    if rollout_weights is not None:
        per_token = per_token * rollout_weights.detach()
    loss = aggregate_loss(per_token, mask, agg, max_len, total)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask).item(),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
        }
        if dual_clip is not None:
            stats["dual_clipfrac"] = masked_mean(capped.to(ratio.dtype), mask).item()
    return loss, stats


def actor_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    entropy: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    *,
    clip_eps_high: float | None,
    dual_clip: float | None,
    agg: str,
    max_len: int | None,
    rollout_weights: torch.Tensor | None,
    ratio_level: str = "token",
    entropy_coef: float,
    kl_coef: float | None,
    kl_estimator: str,
    total: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The PPO actor's loss: ``policy_loss`` minus the entropy bonus plus the KL loss term.

    The options up to ``ratio_level`` are ``policy_loss``'s (the rollout weights multiply the
    clipped surrogate only, not the entropy bonus or the KL term); the entropy bonus and the KL term
    are reduced by the same ``aggregate_loss(agg, max_len, total)``. ``entropy_coef`` 0 adds no bonus;
    ``kl_coef`` None adds no KL term (the KL penalty is in the rewards, or off), and only then may
    ``ref_logprobs`` be None; ``kl_estimator`` names the per-token estimator (``kl_estimate``).
    Shape: (B, T) each -> scalar loss. Stats: ``policy_loss``'s, ``policy_loss`` (the clipped
    surrogate alone), ``kl_loss`` (the aggregated KL, with a KL term) and ``entropy`` (mean over
    valid tokens whatever the agg).
    """
    # loss = policy_loss(logp, old, A, rollout_weights)
    #        - entropy_coef * aggregate_loss(entropy)                   if entropy_coef
    #        + kl_coef * aggregate_loss(kl_estimate(logp, ref))         if kl_coef is not None
    loss, stats = policy_loss(
        logprobs, old_logprobs, advantages, mask, clip_eps,
        clip_eps_high=clip_eps_high, dual_clip=dual_clip, agg=agg, max_len=max_len,
        rollout_weights=rollout_weights, ratio_level=ratio_level, total=total,
    )
    stats["policy_loss"] = loss.item()
    if entropy_coef:
        loss = loss - entropy_coef * aggregate_loss(entropy, mask, agg, max_len, total)
    if kl_coef is not None:
        kl_loss = aggregate_loss(kl_estimate(logprobs, ref_logprobs, kl_estimator), mask, agg, max_len, total)
        loss = loss + kl_coef * kl_loss
        stats["kl_loss"] = kl_loss.item()
    stats["entropy"] = masked_mean(entropy.detach(), mask).item()
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    total: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss, averaged over valid tokens (``total``: the valid tokens of the whole
    batch these rows are part of, as in ``aggregate_loss``; None: these rows').

    Shape: (B, T) each -> scalar loss; stat ``clipfrac`` (share of valid tokens where the
    clipped error is strictly the larger).
    """
    # v_clip = old + clamp(v - old, -eps, eps)
    # loss   = 0.5 * mean_valid( max((v - R)^2, (v_clip - R)^2) )
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(err, err_clipped), mask, "token_mean", total=total)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).to(err.dtype), mask).item()}
    return loss, stats


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Supervised fine-tuning: negative log-likelihood per response token (token mean; ``total``
    as in ``aggregate_loss``)."""
    return -aggregate_loss(logprobs, mask, "token_mean", total=total)


def pairwise_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, total: float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry loss of a reward model on (B,) scores of the chosen and rejected responses:

        loss = sum(-log sigmoid(r_chosen - r_rejected)) / N,   N = total or B

    (Ouyang et al. 2022, eq. 1, with one pair per prompt; ``total``: the pairs of the whole batch
    these are part of). Stats: pairwise accuracy (ties count as wrong) and the mean margin.
    """
    margin = chosen.float() - rejected.float()
    loss = -torch.nn.functional.logsigmoid(margin).sum() / (len(margin) if total is None else total)
    stats = {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}
    return loss, stats


def win_rate(scores: list[float], baseline_scores: list[float]) -> float:
    """Fraction of prompts on which a response beats the baseline's response to the same
    prompt under a judge's scores; a tie counts one half."""
    if len(scores) != len(baseline_scores) or not scores:
        raise ValueError(f"need equal, non-zero numbers of scores: {len(scores)} vs {len(baseline_scores)}")
    wins = sum(1.0 if s > b else 0.5 if s == b else 0.0 for s, b in zip(scores, baseline_scores))
    return wins / len(scores)


def sequence_kl(logprobs: list[list[float]], baseline_logprobs: list[list[float]]) -> float:
    """Monte-Carlo KL(pi || pi_base) per sequence, from responses sampled from pi:
    mean over sequences of sum_t (log pi(y_t) - log pi_base(y_t)) (the k1 estimator)."""
    if len(logprobs) != len(baseline_logprobs) or not logprobs:
        raise ValueError(f"need equal, non-zero numbers of sequences: {len(logprobs)} vs {len(baseline_logprobs)}")
    total = 0.0
    for lp, base in zip(logprobs, baseline_logprobs):
        if len(lp) != len(base):
            raise ValueError(f"token counts differ: {len(lp)} vs {len(base)}")
        total += sum(a - b for a, b in zip(lp, base))
    return total / len(logprobs)


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
