"""Hand-derived checks for the KL estimators, group advantages, policy-loss options and KL
controllers in rlhf_dist.algorithms; each expected number is worked out in a comment."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_dist import algorithms as alg
from tests.unit.test_algorithms import _policy_inputs  # the same hand-checked inputs (log ratios d, advantages A)

TOL = {"atol": 1e-6, "rtol": 0.0}
F64 = torch.float64


def t64(data):
    return torch.tensor(data, dtype=F64)


# ---------------------------------------------------------------- KL estimators

# d = logp - ref = (-1 - -1.5, -2 - -1, -0.3 - -0.3) = (0.5, -1, 0)
LOGP = t64([[-1.0, -2.0, -0.3]])
REF = t64([[-1.5, -1.0, -0.3]])


def test_kl_k2():
    # k2 = 0.5 d^2 = (0.5 * 0.25, 0.5 * 1, 0) = (0.125, 0.5, 0)
    assert_close(alg.kl_k2(LOGP, REF), t64([[0.125, 0.5, 0.0]]), **TOL)


def test_kl_k3():
    # k3 = e^-d - 1 + d:
    #   d = 0.5: e^-0.5 - 1 + 0.5 = e^-0.5 - 0.5 = 0.1065307
    #   d = -1:  e^1 - 1 - 1 = e - 2 = 0.7182818
    #   d = 0:   1 - 1 + 0 = 0
    expected = t64([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    assert_close(alg.kl_k3(LOGP, REF), expected, **TOL)


def test_kl_estimate_dispatches_by_kind():
    # same numbers as above, reached through the kind string
    assert_close(alg.kl_estimate(LOGP, REF, "k1"), t64([[0.5, -1.0, 0.0]]), **TOL)
    assert_close(alg.kl_estimate(LOGP, REF, "k2"), t64([[0.125, 0.5, 0.0]]), **TOL)
    expected_k3 = t64([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    assert_close(alg.kl_estimate(LOGP, REF, "k3"), expected_k3, **TOL)


def test_kl_estimate_unknown_kind_names_it():
    with pytest.raises(ValueError, match="unknown KL estimator kind 'k4'"):
        alg.kl_estimate(LOGP, REF, "k4")


# d = logp - ref over ref = 0: far below the reference, moderately off, and far above it
EXTREME_D = [-100.0, -15.0, -1.0, 0.5, 15.0, 25.0]


def test_kl_estimators_clamp_the_log_ratio_and_the_value():
    d = t64([EXTREME_D])
    ref = torch.zeros_like(d)
    # k1 = clamp(d, -20, 20): (-20, -15, -1, 0.5, 15, 20)
    assert_close(alg.kl_k1(d, ref), t64([[-20.0, -15.0, -1.0, 0.5, 15.0, 20.0]]), **TOL)
    # k2 = min(0.5 * clamp(d)^2, 10): 0.5 * 400 = 200 -> 10; 0.5 * 225 = 112.5 -> 10; 0.5; 0.125;
    #   112.5 -> 10; 200 -> 10
    assert_close(alg.kl_k2(d, ref), t64([[10.0, 10.0, 0.5, 0.125, 10.0, 10.0]]), **TOL)
    # k3 = min(e^-d - 1 + d, 10) on clamped d:
    #   d = -20: e^20 - 21 = 4.9e8 -> 10;  d = -15: e^15 - 16 = 3.3e6 -> 10 (unclamped it is 3.3e6)
    #   d = -1: e - 2;  d = 0.5: e^-0.5 - 0.5
    #   d = 15: e^-15 + 14 = 14.0000003 -> 10;  d = 25 -> 20: e^-20 + 19 -> 10
    expected = t64([[10.0, 10.0, math.e - 2.0, math.exp(-0.5) - 0.5, 10.0, 10.0]])
    assert_close(alg.kl_k3(d, ref), expected, **TOL)
    assert alg.KL_LOG_RATIO_CLAMP == 20.0 and alg.KL_VALUE_CLAMP == 10.0


def test_kl_estimators_are_finite_with_finite_gradients_in_float32():
    # d = -100 in float32: unclamped, k3 = e^100 - 101 overflows to inf (float32 max 3.4e38) and
    # its gradient 1 - e^100 is -inf; with the clamps every value and gradient is finite.
    logprobs = torch.tensor([EXTREME_D], requires_grad=True)
    ref = torch.zeros(1, len(EXTREME_D))
    # gradients d k / d logp where no clamp is active, 0 where one is:
    #   k1: 1 for |d| < 20, so (0, 1, 1, 1, 1, 0)
    #   k2: d for |d| < sqrt(20) = 4.47 (value below the cap), so (0, 0, -1, 0.5, 0, 0)
    #   k3: 1 - e^-d below the cap (d = -1: 1 - e = -1.7182818; d = 0.5: 1 - e^-0.5 = 0.3934693)
    expected_grads = {
        "k1": [0.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        "k2": [0.0, 0.0, -1.0, 0.5, 0.0, 0.0],
        "k3": [0.0, 0.0, 1.0 - math.e, 1.0 - math.exp(-0.5), 0.0, 0.0],
    }
    for kind, grad in expected_grads.items():
        logprobs.grad = None
        kl = alg.kl_estimate(logprobs, ref, kind)
        assert torch.isfinite(kl).all(), kind
        kl.sum().backward()
        assert torch.isfinite(logprobs.grad).all(), kind
        assert_close(logprobs.grad, torch.tensor([grad]), **TOL)


def test_k3_outlier_token_is_a_bounded_reward_penalty():
    # row 0: d = (-100, 0), score 1, kl_coef 0.05, float32; k3 = (10 [capped], 0)
    # rewards = (-0.05 * 10, -0.05 * 0 + 1) = (-0.5, 1.0)  (unclamped: (-inf, 1.0))
    kl = alg.kl_k3(torch.tensor([[-100.0, 0.0]]), torch.zeros(1, 2))
    rewards = alg.token_rewards(torch.tensor([1.0]), kl, torch.ones(1, 2), kl_coef=0.05)
    assert_close(rewards, torch.tensor([[-0.5, 1.0]]), **TOL)


def test_kl_estimator_expected_gradients_as_a_loss():
    # Exact expectations over a 3-token vocabulary, pi = softmax(theta), theta = (0, ln 2, ln 3):
    # pi = (1, 2, 3) / 6, ref = (1/2, 1/4, 1/4). E_pi[grad k] = sum_a pi_a * grad_theta k(a).
    theta = t64([0.0, math.log(2.0), math.log(3.0)]).requires_grad_(True)
    ref = t64([0.5, 0.25, 0.25]).log()

    def expected_grad(kind):
        logpi = torch.log_softmax(theta, dim=0)
        pi = logpi.exp().detach()
        (grads,) = torch.autograd.grad((pi * alg.kl_estimate(logpi, ref, kind)).sum(), theta)
        return grads

    def grad_of(kl_fn):
        (grads,) = torch.autograd.grad(kl_fn(torch.log_softmax(theta, dim=0)), theta)
        return grads

    # k1: E_pi[grad log pi] = sum_a grad pi_a = grad 1 = 0
    assert_close(expected_grad("k1"), t64([0.0, 0.0, 0.0]), **TOL)
    # k2: E_pi[d grad log pi] = grad KL(pi || ref) = grad sum_a pi_a (log pi_a - log ref_a)
    assert_close(expected_grad("k2"), grad_of(lambda lp: (lp.exp() * (lp - ref)).sum()), **TOL)
    # k3: E_pi[(1 - ref/pi) grad log pi] = -E_ref[grad log pi] = grad KL(ref || pi)
    #   = grad sum_a ref_a (log ref_a - log pi_a)
    assert_close(expected_grad("k3"), grad_of(lambda lp: (ref.exp() * (ref - lp)).sum()), **TOL)
    # by hand for k3: grad_theta log pi_a = e_a - pi, so -E_ref[e_a - pi] = pi - ref
    #   = (1/6 - 1/2, 2/6 - 1/4, 3/6 - 1/4) = (-1/3, 1/12, 1/4)
    assert_close(expected_grad("k3"), t64([-1.0 / 3.0, 1.0 / 12.0, 0.25]), **TOL)


# ---------------------------------------------------------------- group advantages

# two prompts, n = 3 contiguous samples each: group 0 = (1, 2, 3), group 1 = (0, 0, 4)
SCORES = t64([1.0, 2.0, 3.0, 0.0, 0.0, 4.0])


def test_grpo_advantages():
    # group 0: mean 2, deviations (-1, 0, 1), unbiased var (1 + 0 + 1) / 2 = 1, std 1
    #   -> (-1, 0, 1) / (1 + eps)
    # group 1: mean 4/3, deviations (-4/3, -4/3, 8/3), squares 16/9 + 16/9 + 64/9 = 96/9,
    #   unbiased var 96/9 / 2 = 16/3, std 4/sqrt(3)
    #   -> (-4/3, -4/3, 8/3) / (4/sqrt(3) + eps) = (-1/sqrt(3), -1/sqrt(3), 2/sqrt(3)) at eps = 0
    # (an interleaved layout would group (1, 3, 0) and (2, 0, 4) and give other numbers)
    s3 = math.sqrt(3.0)
    assert_close(
        alg.grpo_advantages(SCORES, n=3, eps=0.0),
        t64([-1.0, 0.0, 1.0, -1.0 / s3, -1.0 / s3, 2.0 / s3]),
        **TOL,
    )
    # default eps = GROUP_STD_EPS = 1e-4 is a floor, max(std, eps): both stds (1 and 4/sqrt(3))
    # are above it, so the default gives exactly the eps = 0 numbers
    std1 = 4.0 / s3
    expected = t64([-1.0, 0.0, 1.0, (-4 / 3) / std1, (-4 / 3) / std1, (8 / 3) / std1])
    assert_close(alg.grpo_advantages(SCORES, n=3), expected, **TOL)


def test_grpo_advantages_equal_scores_give_zero_not_nan():
    # group 0 = (5, 5): deviations 0, std 0 -> 0 / max(0, 1e-4) = 0
    # group 1 = (1, 3): mean 2, deviations (-1, 1), unbiased var 2 / 1 = 2 -> (-1, 1) / max(sqrt(2), 1e-4)
    out = alg.grpo_advantages(t64([5.0, 5.0, 1.0, 3.0]), n=2)
    d = math.sqrt(2.0)
    assert_close(out, t64([0.0, 0.0, -1.0 / d, 1.0 / d]), **TOL)


def test_grpo_advantages_do_not_amplify_float_noise():
    # group (0, 0, 0, 1e-6): mean 2.5e-7, deviations (-2.5e-7 x 3, 7.5e-7),
    #   squares 3 * 6.25e-14 + 5.625e-13 = 7.5e-13, unbiased var 7.5e-13 / 3 = 2.5e-13, std 5e-7
    #   std floored at 1e-4: (-2.5e-7, 7.5e-7) / 1e-4 = (-0.0025, 0.0075)
    #   (the old std + 1e-6 gave -2.5e-7 / 1.5e-6 = -0.1667 and 7.5e-7 / 1.5e-6 = +0.5)
    out = alg.grpo_advantages(t64([0.0, 0.0, 0.0, 1e-6]), n=4)
    assert_close(out, t64([-0.0025, -0.0025, -0.0025, 0.0075]), **TOL)
    # the same in float32 around 0.5, where 0.5 + 1e-6 is itself rounded: all |A| < 0.01
    out32 = alg.grpo_advantages(torch.tensor([0.5, 0.5, 0.5, 0.5 + 1e-6]), n=4)
    assert out32.abs().max().item() < 0.01, out32


def test_grpo_std_floor_only_acts_below_it():
    # group 0 = (0, 1e-4): mean 5e-5, deviations (-5e-5, 5e-5), std sqrt(2 * 2.5e-9 / 1) = 7.07e-5
    #   < 1e-4, so floored: (-5e-5, 5e-5) / 1e-4 = (-0.5, 0.5)
    # group 1 = (0, 1): mean 0.5, std sqrt(0.5) > 1e-4: (-0.5, 0.5) / sqrt(0.5) = (-1/sqrt(2), 1/sqrt(2))
    out = alg.grpo_advantages(t64([0.0, 1e-4, 0.0, 1.0]), n=2)
    a = 1.0 / math.sqrt(2.0)
    assert_close(out, t64([-0.5, 0.5, -a, a]), **TOL)
    assert alg.GROUP_STD_EPS == 1e-4


def test_group_estimators_validate_n():
    for fn in (alg.grpo_advantages, alg.dr_grpo_advantages, alg.rloo_advantages):
        # one sample per prompt has no group baseline
        with pytest.raises(ValueError, match="n=1"):
            fn(SCORES, n=1)
        # B = 6 is not a multiple of 4
        with pytest.raises(ValueError, match="B=6 .* n=4"):
            fn(SCORES, n=4)


def test_dr_grpo_advantages():
    # r - mean_g, no std: group 0 mean 2 -> (-1, 0, 1); group 1 mean 4/3 -> (-4/3, -4/3, 8/3)
    out = alg.dr_grpo_advantages(SCORES, n=3)
    assert_close(out, t64([-1.0, 0.0, 1.0, -4.0 / 3.0, -4.0 / 3.0, 8.0 / 3.0]), **TOL)


def test_rloo_advantages():
    # r_i - mean of the other two:
    # group 0: 1 - (2+3)/2 = -1.5;  2 - (1+3)/2 = 0;  3 - (1+2)/2 = 1.5
    # group 1: 0 - (0+4)/2 = -2;    0 - (0+4)/2 = -2; 4 - (0+0)/2 = 4
    # (check: n/(n-1) * (r - mean_g) = 1.5 * (-1, 0, 1) and 1.5 * (-4/3, -4/3, 8/3))
    out = alg.rloo_advantages(SCORES, n=3)
    assert_close(out, t64([-1.5, 0.0, 1.5, -2.0, -2.0, 4.0]), **TOL)


def test_broadcast_to_tokens():
    mask = t64([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # row 0 gets 2 on its two valid tokens, row 1 gets -3 on its one; padding 0
    expected = t64([[2.0, 2.0, 0.0], [-3.0, 0.0, 0.0]])
    assert_close(alg.broadcast_to_tokens(t64([2.0, -3.0]), mask), expected, **TOL)
    assert_close(alg.broadcast_to_tokens(t64([2.0, -3.0]), mask.bool()), expected, **TOL)


def test_reinforce_pp_advantages_with_padding():
    gamma = 0.5
    # row 1 is padded at t=2; its padding reward 9 must not leak into the returns or the stats
    rewards = t64([[0.0, 0.0, 1.0], [1.0, 2.0, 9.0]])
    mask = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # reward-to-go G_t = r_t + 0.5 * G_{t+1}:
    #   row 0: G_2 = 1, G_1 = 0 + 0.5*1 = 0.5, G_0 = 0 + 0.5*0.5 = 0.25
    #   row 1: G_2 = padding; G_1 = 2 (episode ends), G_0 = 1 + 0.5*2 = 2
    # valid G: 0.25, 0.5, 1, 2, 2; sum 5.75, mean 1.15
    # deviations -0.9, -0.65, -0.15, 0.85, 0.85; squares 0.81 + 0.4225 + 0.0225 + 0.7225 + 0.7225 = 2.7
    # unbiased var 2.7 / 4 = 0.675; masked_whiten divides by sqrt(0.675 + 1e-8); padding -> 0
    std = math.sqrt(0.675 + 1e-8)
    expected = t64([[-0.9 / std, -0.65 / std, -0.15 / std], [0.85 / std, 0.85 / std, 0.0]])
    out = alg.reinforce_pp_advantages(rewards, mask, gamma=gamma)
    assert_close(out, expected, **TOL)
    assert_close(alg.reinforce_pp_advantages(rewards, mask.bool(), gamma=gamma), expected, **TOL)


# ---------------------------------------------------------------- loss aggregation

AGG_X = t64([[1.0, 2.0, 100.0], [4.0, 6.0, 8.0]])  # 100 is padding
AGG_MASK = t64([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_aggregate_loss_modes():
    # valid: row 0 (1, 2), row 1 (4, 6, 8); total 21 over 5 tokens
    # token_mean: 21 / 5 = 4.2
    assert_close(alg.aggregate_loss(AGG_X, AGG_MASK, "token_mean"), t64(4.2), **TOL)
    # seq_mean_token_mean: row means 3/2 = 1.5 and 18/3 = 6 -> (1.5 + 6) / 2 = 3.75
    assert_close(alg.aggregate_loss(AGG_X, AGG_MASK, "seq_mean_token_mean"), t64(3.75), **TOL)
    # seq_mean_token_sum_norm, max_len 4: 21 / (B * max_len) = 21 / 8 = 2.625
    out = alg.aggregate_loss(AGG_X, AGG_MASK, "seq_mean_token_sum_norm", max_len=4)
    assert_close(out, t64(2.625), **TOL)
    # a bool mask selects the same tokens
    assert_close(alg.aggregate_loss(AGG_X, AGG_MASK.bool(), "seq_mean_token_mean"), t64(3.75), **TOL)


def test_aggregate_loss_errors():
    with pytest.raises(ValueError, match="unknown loss agg 'sum'"):
        alg.aggregate_loss(AGG_X, AGG_MASK, "sum")
    with pytest.raises(ValueError, match="needs max_len"):
        alg.aggregate_loss(AGG_X, AGG_MASK, "seq_mean_token_sum_norm")


# rows 1 and 3 have no response token
EMPTY_ROWS_MASK = t64([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
EMPTY_ROWS_X = t64([[1.0, 2.0, 100.0], [5.0, 6.0, 7.0], [4.0, 9.0, 9.0], [8.0, 8.0, 8.0]])


def test_seq_mean_aggregations_refuse_rows_without_a_response_token():
    # seq_mean_token_mean: row 1's mean would be 0 / 0 = NaN and make the whole loss NaN
    for agg, max_len in (("seq_mean_token_mean", None), ("seq_mean_token_sum_norm", 4)):
        with pytest.raises(ValueError, match=r"rows \[1, 3\] of the batch have no response token") as excinfo:
            alg.aggregate_loss(EMPTY_ROWS_X, EMPTY_ROWS_MASK, agg, max_len)
        assert f"aggregate_loss(agg='{agg}')" in str(excinfo.value)
    # token_mean is well defined while some row has a token: (1 + 2 + 4) / 3 = 7/3
    out = alg.aggregate_loss(EMPTY_ROWS_X, EMPTY_ROWS_MASK, "token_mean")
    assert_close(out, t64(7.0 / 3.0), **TOL)
    # ... and refused when none has (0 / 0)
    with pytest.raises(ValueError, match=r"rows \[0, 1\] of the batch have no response token"):
        alg.aggregate_loss(AGG_X, torch.zeros_like(AGG_MASK), "token_mean")


def test_policy_loss_refuses_rows_without_a_response_token():
    logprobs, old, advantages, mask = _policy_inputs()
    mask = mask.clone()
    mask[1] = 0.0  # row 1 has no response token
    with pytest.raises(ValueError, match=r"rows \[1\] of the batch have no response token"):
        alg.policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, agg="seq_mean_token_mean")


# ---------------------------------------------------------------- policy loss options




# per-token losses at eps = 0.2 (derived in test_algorithms.test_policy_loss_clipping_and_stats):
# row 0: (-e^0.1, -1.2 [clipped], -e^-0.5); row 1: (2e^0.3, 1.6 [clipped], padding)
ROW0 = [-math.exp(0.1), -1.2, -math.exp(-0.5)]
ROW1 = [2 * math.exp(0.3), 1.6]


def test_policy_loss_explicit_defaults_match_old_numbers():
    logprobs, old, advantages, mask = _policy_inputs()
    # old behaviour: token mean of the 5 valid per-token losses; clipfrac 2/5; approx_kl 0.069
    expected = (sum(ROW0) + sum(ROW1)) / 5
    for kwargs in (
        {},
        {"clip_eps_high": None, "dual_clip": None, "agg": "token_mean", "max_len": None},
        # an upper bound equal to clip_eps, and a cap no token reaches (largest loss 2e^0.3 = 2.70
        # < -A * c = 2 * 100), change nothing -- but dual_clip adds its stat
        {"clip_eps_high": 0.2, "dual_clip": 100.0},
    ):
        loss, stats = alg.policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, **kwargs)
        assert_close(loss, t64(expected), **TOL)
        assert_close(stats["clipfrac"], 0.4, **TOL)
        assert_close(stats["approx_kl"], 0.069, **TOL)
        assert ("dual_clipfrac" in stats) == (kwargs.get("dual_clip") is not None)


def test_policy_loss_clip_higher_changes_which_tokens_clip():
    logprobs, old, advantages, mask = _policy_inputs()
    # clip range [1 - 0.2, 1 + 0.4] = [0.8, 1.4]
    # (0,1) A=1, ratio e^0.3 = 1.3499 is now inside -> -e^0.3, no longer clipped
    # (1,1) A=-2, ratio e^-0.5 = 0.6065 -> 0.8 (low side unchanged): 2e^-0.5 = 1.2131 vs 1.6 -> 1.6, clipped
    #   (were the high eps used on the low side too, [0.6, 1.4] would leave it unclipped at 1.2131)
    # others as with eps = 0.2: -e^0.1, -e^-0.5, 2e^0.3
    # loss = (-e^0.1 - e^0.3 - e^-0.5 + 2e^0.3 + 1.6) / 5; clipfrac = 1/5
    expected = (-math.exp(0.1) - math.exp(0.3) - math.exp(-0.5) + 2 * math.exp(0.3) + 1.6) / 5
    loss, stats = alg.policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, clip_eps_high=0.4)
    assert_close(loss, t64(expected), **TOL)
    assert_close(stats["clipfrac"], 0.2, **TOL)
    loss.backward()
    # gradient -A * ratio / 5 on unclipped tokens; (0,1) now carries -e^0.3/5, (1,1) and padding 0
    grad = t64(
        [[-math.exp(0.1) / 5, -math.exp(0.3) / 5, -math.exp(-0.5) / 5], [2 * math.exp(0.3) / 5, 0.0, 0.0]]
    )
    assert_close(logprobs.grad, grad, **TOL)


def _dual_clip_inputs():
    # log ratios d, advantages A; row 1 t=2 is padding (A=-5, ratio e^3 would be capped if counted)
    d = t64([[2.0, 0.1, 2.0], [1.5, 0.5, 3.0]])
    old = t64([[-3.0, -1.0, -4.0], [-2.5, -1.0, -4.0]])
    logprobs = (old + d).requires_grad_(True)
    advantages = t64([[-1.0, -1.0, 1.0], [-2.0, -2.0, -5.0]])
    mask = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logprobs, old, advantages, mask


def test_policy_loss_dual_clip_caps_negative_advantage_tokens():
    logprobs, old, advantages, mask = _dual_clip_inputs()
    # eps = 0.2 (clip range [0.8, 1.2]), c = 3; cap = -A * 3 applies only where A < 0
    # (0,0) A=-1, ratio e^2 = 7.389: max(e^2, 1.2) = e^2 > cap 3      -> 3, capped
    # (0,1) A=-1, ratio e^0.1 in range: e^0.1 = 1.105 < 3              -> e^0.1
    # (0,2) A=+1, ratio e^2: max(-e^2, -1.2) = -1.2, PPO-clipped; no cap for A > 0
    #       (a cap there would give min(-1.2, -3) = -3)                -> -1.2
    # (1,0) A=-2, ratio e^1.5 = 4.482: max(2e^1.5, 2.4) = 8.963 > cap 6 -> 6, capped
    # (1,1) A=-2, ratio e^0.5 = 1.649: max(2e^0.5, 2.4) = 3.297 < cap 6 -> 2e^0.5
    # loss = (3 + e^0.1 - 1.2 + 6 + 2e^0.5) / 5; dual_clipfrac = 2/5; clipfrac = 1/5 ((0,2))
    # approx_kl = 0.5 * (4 + 0.01 + 4 + 2.25 + 0.25) / 5 = 0.5 * 10.51 / 5 = 1.051
    expected = (3.0 + math.exp(0.1) - 1.2 + 6.0 + 2 * math.exp(0.5)) / 5
    loss, stats = alg.policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, dual_clip=3.0)
    assert_close(loss, t64(expected), **TOL)
    assert isinstance(stats["dual_clipfrac"], float)
    assert_close(stats["dual_clipfrac"], 0.4, **TOL)
    assert_close(stats["clipfrac"], 0.2, **TOL)
    assert_close(stats["approx_kl"], 1.051, **TOL)
    loss.backward()
    # capped and clipped tokens get no gradient; (0,1): -A * e^0.1 / 5 = e^0.1/5; (1,1): 2e^0.5/5
    grad = t64([[0.0, math.exp(0.1) / 5, 0.0], [0.0, 2 * math.exp(0.5) / 5, 0.0]])
    assert_close(logprobs.grad, grad, **TOL)


def test_policy_loss_without_dual_clip_leaves_large_ratio_uncapped():
    logprobs, old, advantages, mask = _dual_clip_inputs()
    # same tokens without the cap: (0,0) e^2 and (1,0) 2e^1.5 stay
    expected = (math.exp(2.0) + math.exp(0.1) - 1.2 + 2 * math.exp(1.5) + 2 * math.exp(0.5)) / 5
    loss, stats = alg.policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    assert_close(loss, t64(expected), **TOL)
    assert "dual_clipfrac" not in stats


def test_policy_loss_dual_clip_must_exceed_one():
    logprobs, old, advantages, mask = _dual_clip_inputs()
    for c in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip must be > 1"):
            alg.policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, dual_clip=c)


def test_policy_loss_agg_modes():
    logprobs, old, advantages, mask = _policy_inputs()
    # seq_mean_token_mean: (mean(row 0 over 3) + mean(row 1 over 2)) / 2
    expected = (sum(ROW0) / 3 + sum(ROW1) / 2) / 2
    loss, stats = alg.policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, agg="seq_mean_token_mean")
    assert_close(loss, t64(expected), **TOL)
    # stats stay token means over valid tokens whatever the agg
    assert_close(stats["clipfrac"], 0.4, **TOL)
    # seq_mean_token_sum_norm with max_len 4: sum of the 5 losses / (2 * 4)
    expected = (sum(ROW0) + sum(ROW1)) / 8
    loss, _ = alg.policy_loss(
        logprobs, old, advantages, mask, clip_eps=0.2, agg="seq_mean_token_sum_norm", max_len=4
    )
    assert_close(loss, t64(expected), **TOL)
    with pytest.raises(ValueError, match="unknown loss agg 'mean'"):
        alg.policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, agg="mean")


# ---------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    ctl = alg.FixedKLController(0.05)
    # never moves, whatever the measured KL
    assert ctl.update(current_kl=100.0, n_steps=64) == 0.05
    assert ctl.update(current_kl=0.0, n_steps=64) == 0.05
    assert ctl.value == 0.05
    restored = alg.FixedKLController(1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == 0.05


def test_adaptive_kl_controller_updates():
    ctl = alg.AdaptiveKLController(init_value=0.1, target=6.0, horizon=100)
    # KL 9: e = 9/6 - 1 = 0.5 -> clipped to 0.2; value = 0.1 * (1 + 0.2 * 10/100) = 0.1 * 1.02 = 0.102
    assert_close(ctl.update(current_kl=9.0, n_steps=10), 0.102, **TOL)
    # KL 5.4: e = 0.9 - 1 = -0.1 (inside the clip); value = 0.102 * (1 - 0.1 * 20/100) = 0.102 * 0.98 = 0.09996
    assert_close(ctl.update(current_kl=5.4, n_steps=20), 0.09996, **TOL)
    assert_close(ctl.value, 0.09996, **TOL)
    # state round-trip, then KL 0: e = -1 -> clipped to -0.2; value = 0.09996 * (1 - 0.2 * 50/100) = 0.089964
    restored = alg.AdaptiveKLController(init_value=1.0, target=6.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert_close(restored.update(current_kl=0.0, n_steps=50), 0.089964, **TOL)


def test_adaptive_kl_controller_validates():
    with pytest.raises(ValueError, match="target must be > 0"):
        alg.AdaptiveKLController(init_value=0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError, match="horizon must be > 0"):
        alg.AdaptiveKLController(init_value=0.1, target=6.0, horizon=0)
