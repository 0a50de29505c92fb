"""Masked statistics, whitening, logprobs and entropies from logits, and the evaluation's
win rate and sequence KL. Pure torch.

Per-token tensors are ``(B, T)`` over *response* positions; ``mask`` is ``(B, T)`` (float or
bool), 1 on real response tokens and 0 on the right padding after the response ends. Every row
must have at least one valid token (``experience.collate`` guarantees it).
"""

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


def check_response_tokens(mask: torch.Tensor, caller: str, every_row: bool = True) -> None:
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


def whiten_scores(scores: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise sequence scores across the batch; with one score only the mean is removed.

    Shape: (B,) -> (B,).
    """
    # s' = (s - mean(s)) / (std(s, unbiased) + eps); B == 1: s' = s - mean(s)
    centered = scores - scores.mean()
    if scores.numel() == 1:
        return centered
    return centered / (scores.std(unbiased=True) + eps)


def broadcast_to_tokens(seq_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Put each sequence's value on every valid token of its row, 0 on padding.

    Shape: seq_values (B,), mask (B, T) -> (B, T).
    """
    # out_{b,t} = v_b * m_{b,t}; where() rather than a product so a non-finite v stays off padding
    return torch.where(mask.bool(), seq_values.unsqueeze(1), seq_values.new_zeros(()))


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
