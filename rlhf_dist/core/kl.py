"""KL penalties: the per-token estimators k1, k2, k3 of KL(pi || ref) (Schulman 2020), clamped.
The coefficient's controllers are in ``rlhf_dist.core.schedule``.

Pure functions over tensors and floats; per-token tensors are ``(B, T)`` over response positions.
"""

import torch

# Every estimator reads d = log pi - log ref clamped to [-20, 20] (as veRL): a token the
# reference all but rules out (ref logprob -100 in float32) would otherwise give k3 = e^100 = inf
# and NaN gradients. e^20 = 4.9e8 is already far past any ratio that carries information.
KL_LOG_RATIO_CLAMP = 20.0
# k2 and k3 (both >= 0) are capped at 10 nats per token (veRL's low_var_kl bound; OpenRLHF clamps
# to [-10, 10]). Unclamped, d = -15 gives k3 = e^15 = 3.3e6, so with the KL in the reward one token
# outweighs every score of the batch once the returns are whitened; at the cap a token costs at
# most kl_coef * 10 (0.5 at the default 0.05), while ordinary tokens (k3 well under 1) are untouched.
# A token at the cap gets no gradient from a KL loss term.
KL_VALUE_CLAMP = 10.0


def _clamped_log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    # Tokens past the clamp get no gradient (torch.clamp passes none outside its range).
    return torch.clamp(logprobs - ref_logprobs, -KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k1 (Schulman): the log-ratio, unbiased but can be negative.

    d = log pi - log ref is clamped to [-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP] = [-20, 20].
    As a loss term it is useless: with the token sampled from pi, E[grad k1] = E[grad log pi] = 0,
    so only its sampling noise reaches the update (``AlgoConfig.validate`` refuses k1 with
    kl_in=loss). Put it in the reward instead, where the policy gradient carries it.
    Shape: (B, T), (B, T) -> (B, T).
    """
    # k1_t = clamp(log pi(a_t) - log ref(a_t), -20, 20)
    return _clamped_log_ratio(logprobs, ref_logprobs)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k2 (Schulman): biased, non-negative, low variance.

    d is clamped to [-20, 20] and k2 to at most KL_VALUE_CLAMP = 10 (|d| > sqrt(20) = 4.47).
    As a loss term, at each state s with the token sampled from pi:
    E[grad k2] = E[d grad log pi] = grad KL(pi(.|s) || ref(.|s)), the reverse KL's gradient.
    Shape: (B, T), (B, T) -> (B, T).
    """
    # d = clamp(log pi - log ref, -20, 20);  k2_t = min(0.5 * d^2, 10)
    log_ratio = _clamped_log_ratio(logprobs, ref_logprobs)
    return torch.clamp(0.5 * log_ratio**2, max=KL_VALUE_CLAMP)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || ref) estimate k3 (Schulman): unbiased and non-negative.

    d is clamped to [-20, 20] and k3 to at most KL_VALUE_CLAMP = 10 (d < -2.611 or d > 10.99998).
    As a loss term (GRPO's), at each state s with the token sampled from pi:
    E[grad k3] = E[(1 - ref/pi) grad log pi] = -E_ref[grad log pi] = grad KL(ref(.|s) || pi(.|s)),
    the forward KL's gradient, not that of the KL(pi || ref) its value estimates.
    Shape: (B, T), (B, T) -> (B, T).
    """
    # d = clamp(log pi - log ref, -20, 20), r = ref / pi = e^-d
    # k3_t = min(r - 1 - log r, 10) = min(e^-d - 1 + d, 10)
    # expm1 keeps e^-d - 1 accurate when d is near 0, where most tokens are.
    log_ratio = _clamped_log_ratio(logprobs, ref_logprobs)
    return torch.clamp(torch.expm1(-log_ratio) + log_ratio, max=KL_VALUE_CLAMP)


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(pi || ref) with the estimator named by ``kind`` ("k1", "k2" or "k3").

    All clamp the log-ratio to [-20, 20]; k2 and k3 are capped at 10. Expected gradient as a
    loss, per state with the token sampled from pi: k1 0, k2 grad KL(pi || ref), k3 grad KL(ref || pi).
    Shape: (B, T), (B, T) -> (B, T).
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator kind {kind!r}; expected one of {tuple(KL_ESTIMATORS)}"
        )
    return KL_ESTIMATORS[kind](logprobs, ref_logprobs)
