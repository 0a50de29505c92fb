"""Losses: the clipped policy loss (token- or sequence-level ratios, dual clip), the actor loss
with entropy and KL terms, the clipped value loss, SFT, pairwise and ranking (Bradley-Terry) losses, their
aggregation over a batch, and off-policy rollout correction (TIS / MIS). Pure torch.

Per-token tensors are ``(B, T)`` over *response* positions; ``mask`` is ``(B, T)`` (float or
bool), 1 on real response tokens and 0 on the right padding after the response ends. Every row
must have at least one valid token (``experience.collate`` guarantees it). The ``seq_mean_*`` aggregations, which would otherwise return NaN, raise
ValueError naming the empty rows.
"""

import torch

from rlhf_dist.core.kl import kl_estimate, kl_k3
from rlhf_dist.core.stats import check_response_tokens, masked_mean, masked_sum

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


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
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss agg {agg!r}; expected one of {LOSS_AGGS}")
    if total is None or agg != "token_mean":  # a part of a batch may hold no token: it adds 0
        check_response_tokens(mask, f"aggregate_loss(agg={agg!r})", every_row=agg != "token_mean")
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
    if agg not in LOSS_AGGS:
        raise ValueError(f"unknown loss agg {agg!r}; expected one of {LOSS_AGGS}")
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
    check_response_tokens(mask, "rollout_correction", every_row=False)
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


def _ratio(logprobs: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor, ratio_level: str) -> torch.Tensor:
    """The ratio ``policy_loss`` clips, (B, T): per token exp(log_ratio), or GSPO-token's
    exp(logp - sg[logp] + sg[mean_t log_ratio]) (the sequence's ratio in value, per-token gradient)."""
    if ratio_level == "token":
        return torch.exp(log_ratio)
    check_response_tokens(mask, "policy_loss(ratio_level='sequence')")
    sequence = masked_mean(log_ratio, mask, dim=1).detach().unsqueeze(1)
    return torch.exp(logprobs - logprobs.detach() + sequence)


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
    ratio = _ratio(logprobs, log_ratio, mask, ratio_level)
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
    return loss, _clip_stats(clipped, unclipped, log_ratio, mask, capped if dual_clip is not None else None)


@torch.no_grad()
def _clip_stats(
    clipped: torch.Tensor, unclipped: torch.Tensor, log_ratio: torch.Tensor, mask: torch.Tensor,
    capped: torch.Tensor | None,
) -> dict[str, float]:
    """``policy_loss``'s stats, means over valid tokens (``dual_clipfrac`` only with a cap)."""
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).to(log_ratio.dtype), mask).item(),
        "approx_kl": masked_mean(0.5 * log_ratio**2, mask).item(),
    }
    if capped is not None:
        stats["dual_clipfrac"] = masked_mean(capped.to(log_ratio.dtype), mask).item()
    return stats


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

    Shape: (B, T) each -> scalar loss; stat ``clipfrac`` (share of valid tokens whose value moved
    beyond ``clip_eps`` and whose clipped error is the larger). Within the range ``old + (v - old)``
    can round one ulp away from ``v``, and about one in seven hundred float32 tokens would count as
    clipped by that alone (measured on random values): a clip fraction that moved with the
    rounding of the sums, not with the update.
    """
    # v_clip = old + clamp(v - old, -eps, eps)
    # loss   = 0.5 * mean_valid( max((v - R)^2, (v_clip - R)^2) )
    values_clipped = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
    err = (values - returns) ** 2
    err_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(err, err_clipped), mask, "token_mean", total=total)
    with torch.no_grad():
        clipped = ((values - old_values).abs() > clip_eps) & (err_clipped > err)
        stats = {"clipfrac": masked_mean(clipped.to(err.dtype), mask).item()}
    return loss, stats


def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor, total: float | None = None) -> torch.Tensor:
    """Supervised fine-tuning: negative log-likelihood per response token (token mean; ``total``
    as in ``aggregate_loss``)."""
    return -aggregate_loss(logprobs, mask, "token_mean", total=total)


def comparable_pairs(ranks: torch.Tensor) -> torch.Tensor:
    """better[b, i, j]: response i of prompt b is ranked better than its response j (a lower rank;
    equal ranks are a tie and empty slots, rank < 0, have none). Shape: ranks (B, K) -> (B, K, K) bool."""
    present = ranks >= 0
    return (ranks[:, :, None] < ranks[:, None, :]) & present[:, :, None] & present[:, None, :]


def ranking_loss(
    scores: torch.Tensor, ranks: torch.Tensor, total: float | None = None, comparisons: float | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reward-model loss on rankings of K responses per prompt, all C(K, 2) comparisons of a prompt
    one batch element (Ouyang et al. 2022, eq. 1), each response scored once:

        loss = sum_b [ sum_{(i, j) in P_b} -log sigmoid(r_bi - r_bj) / |P_b| ] / N,   N = total or B

    P_b: the comparable pairs of prompt b, i ranked better than j (``comparable_pairs``: ties and
    empty slots give none; every prompt needs one, else ValueError naming it). A pair (K = 2, ranks
    [0, 1]) is the pairwise Bradley-Terry loss exactly. ``total``: the prompts of the whole batch these are part of.
    Stats: accuracy (the share of comparable pairs scored in the right order; equal scores count as
    wrong) and the mean margin r_i - r_j over them, as parts of ``comparisons`` (the whole batch's
    comparable pairs; None: these rows'), so that the parts of a batch add up to its figures.
    Shape: scores (B, K) float, ranks (B, K) long -> scalar.
    """
    better = comparable_pairs(ranks)
    per_prompt = better.sum(dim=(1, 2))
    if not per_prompt.all():
        empty = (per_prompt == 0).nonzero().flatten().tolist()
        raise ValueError(f"ranking_loss: prompts {empty} have no comparable pair (all responses tied)")
    margin = scores.float()[:, :, None] - scores.float()[:, None, :]  # (B, K, K): r_i - r_j
    pair_loss = torch.where(better, -torch.nn.functional.logsigmoid(margin), 0.0)
    loss = (pair_loss.sum(dim=(1, 2)) / per_prompt).sum() / (len(scores) if total is None else total)
    n = better.sum().item() if comparisons is None else comparisons
    stats = {"accuracy": ((margin > 0) & better).sum().item() / n, "margin": margin[better].sum().item() / n}
    return loss, stats
