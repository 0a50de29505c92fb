"""Hand-derived checks for rlhf_dist.algorithms; each expected number is worked out in a comment."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_dist import algorithms as alg
from rlhf_dist.config import ESTIMATORS, GROUP_ESTIMATORS

TOL = {"atol": 1e-6, "rtol": 0.0}
F64 = torch.float64
NAN = math.nan


def t64(data):
    return torch.tensor(data, dtype=F64)


# Padding values are large on purpose: if they leaked into a result it would be far off.
X = t64([[1.0, 2.0, 100.0], [4.0, -50.0, 70.0]])
MASK = t64([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def test_masked_sum_and_mean():
    # valid entries: 1, 2 (row 0) and 4 (row 1)
    # all: sum = 7, mean = 7 / 3; per row: sums [3, 4], means [3/2, 4/1]
    assert_close(alg.masked_sum(X, MASK), t64(7.0), **TOL)
    assert_close(alg.masked_mean(X, MASK), t64(7.0 / 3.0), **TOL)
    assert_close(alg.masked_sum(X, MASK, dim=1), t64([3.0, 4.0]), **TOL)
    assert_close(alg.masked_mean(X, MASK, dim=1), t64([1.5, 4.0]), **TOL)
    # a bool mask selects the same entries
    assert_close(alg.masked_mean(X, MASK.bool()), t64(7.0 / 3.0), **TOL)


def test_masked_var():
    # valid 1, 2, 4; mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    # biased: 42/9 / 3 = 14/9; unbiased: 42/9 / 2 = 7/3
    assert_close(alg.masked_var(X, MASK, unbiased=False), t64(14.0 / 9.0), **TOL)
    assert_close(alg.masked_var(X, MASK, unbiased=True), t64(7.0 / 3.0), **TOL)


def test_masked_var_unbiased_needs_two_valid_positions():
    one_valid = t64([[1.0, 0.0]])
    with pytest.raises(ValueError, match="at least 2 valid positions"):
        alg.masked_var(t64([[3.0, 9.0]]), one_valid, unbiased=True)
    # biased variance of a single value is 0
    assert_close(alg.masked_var(t64([[3.0, 9.0]]), one_valid, unbiased=False), t64(0.0), **TOL)


def test_masked_whiten():
    x = t64([[1.0, 5.0, 40.0], [3.0, -9.0, 9.0]])
    mask = t64([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # valid 1, 5, 3; mean 3; deviations -2, 2, 0; squares sum 8; unbiased var 8/2 = 4; std 2
    # whitened valid: (-2/2, 2/2, 0/2) = (-1, 1, 0)
    # padding gets the same map: (40 - 3)/2 = 18.5, (-9 - 3)/2 = -6, (9 - 3)/2 = 3
    out = alg.masked_whiten(x, mask, shift_mean=True, eps=0.0)
    assert_close(out, t64([[-1.0, 1.0, 18.5], [0.0, -6.0, 3.0]]), **TOL)
    # shift_mean=False adds the mean 3 back: valid (2, 4, 3)
    out = alg.masked_whiten(x, mask, shift_mean=False, eps=0.0)
    assert_close(out * mask, t64([[2.0, 4.0, 0.0], [3.0, 0.0, 0.0]]), **TOL)


def test_kl_k1():
    # k1 = logp - ref: (-1 - -1.5, -2 - -1) = (0.5, -1)
    kl = alg.kl_k1(t64([[-1.0, -2.0]]), t64([[-1.5, -1.0]]))
    assert_close(kl, t64([[0.5, -1.0]]), **TOL)


def test_token_rewards_puts_score_at_last_valid_token():
    scores = t64([2.0, -1.0])
    kl = t64([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # penalty -0.5 * kl: row 0 (-0.05, -0.1, -0.15); row 1 (-0.2, -0.25, padding -> 0)
    # score at last valid token: row 0 index 2 -> -0.15 + 2 = 1.85; row 1 index 1 -> -0.25 - 1 = -1.25
    rewards = alg.token_rewards(scores, kl, mask, kl_coef=0.5)
    assert_close(rewards, t64([[-0.05, -0.1, 1.85], [-0.2, -1.25, 0.0]]), **TOL)
    # same with a bool mask
    assert_close(alg.token_rewards(scores, kl, mask.bool(), kl_coef=0.5), rewards, **TOL)


def test_token_rewards_refuses_rows_without_a_response_token():
    # row 1's "last valid index" would be 0 - 1 = -1: its score would land on the last padding column
    kl = t64([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    mask = t64([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"^token_rewards: rows \[1\] of the batch have no response token"):
        alg.token_rewards(t64([1.0, 2.0, 3.0]), kl, mask, kl_coef=0.5)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        alg.token_rewards(t64([1.0, 2.0, 3.0]), kl, mask.bool(), kl_coef=0.5)


def test_whiten_scores():
    # s = (1, 2, 3, 6); mean 3; deviations (-2, -1, 0, 3); squares sum 14; unbiased std sqrt(14/3)
    std = math.sqrt(14.0 / 3.0)
    out = alg.whiten_scores(t64([1.0, 2.0, 3.0, 6.0]), eps=0.0)
    assert_close(out, t64([-2.0 / std, -1.0 / std, 0.0, 3.0 / std]), **TOL)


def test_whiten_scores_single_score_is_centered_not_nan():
    # B == 1: s - mean(s) = 5 - 5 = 0 (an unbiased std of one value would be NaN)
    assert_close(alg.whiten_scores(t64([5.0])), t64([0.0]), **TOL)


def test_gae_with_padding():
    gamma, lam = 0.9, 0.5  # gamma * lam = 0.45
    # row 1 is padded at t=2; its padding reward 3 and value 7 must not leak in
    rewards = t64([[0.0, 0.0, 1.0], [0.5, 2.0, 3.0]])
    values = t64([[0.5, 1.0, 2.0], [1.0, 0.2, 7.0]])
    mask = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # row 0 (all valid; V_3 = 0):
    #   delta_2 = 1 + 0 - 2.0 = -1.0                  A_2 = -1.0
    #   delta_1 = 0 + 0.9*2.0 - 1.0 = 0.8             A_1 = 0.8 + 0.45*(-1.0) = 0.35
    #   delta_0 = 0 + 0.9*1.0 - 0.5 = 0.4             A_0 = 0.4 + 0.45*0.35 = 0.5575
    #   returns = A + V = (1.0575, 1.35, 1.0)
    # row 1 (t=1 is the last valid token, so V_2 counts as 0):
    #   t=2 padding: A = 0, return = 0
    #   delta_1 = 2.0 + 0.9*7.0*0 - 0.2 = 1.8         A_1 = 1.8
    #   delta_0 = 0.5 + 0.9*0.2 - 1.0 = -0.32         A_0 = -0.32 + 0.45*1.8 = 0.49
    #   returns = (0.49 + 1.0, 1.8 + 0.2, 0) = (1.49, 2.0, 0)
    advantages, returns = alg.gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert_close(advantages, t64([[0.5575, 0.35, -1.0], [0.49, 1.8, 0.0]]), **TOL)
    assert_close(returns, t64([[1.0575, 1.35, 1.0], [1.49, 2.0, 0.0]]), **TOL)


# ---------------------------------------------------------------- the estimator table and dropped samples


def test_dropped_scores_take_their_group_mean():
    # n=2: group [1, nan] -> nan becomes 1 (mean of the kept 1); group [nan, nan] -> batch mean of
    # kept scores (1 + 3 + 5) / 3 = 3; group [3, 5] untouched.
    filled, kept = alg.neutralise_dropped(torch.tensor([1.0, NAN, NAN, NAN, 3.0, 5.0]), n=2)
    assert_close(filled, torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0, 5.0]), **TOL)
    assert kept.tolist() == [True, False, False, False, True, True]


def test_all_dropped_is_an_error():
    with pytest.raises(ValueError, match="every sample of the step was dropped"):
        alg.neutralise_dropped(torch.tensor([NAN, NAN]), n=1)


EST_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
EST_KL = torch.tensor([[0.1, 0.2], [0.3, 9.0], [0.0, 0.0], [0.5, 0.5]])  # 9.0 sits on padding
EST_SCORES = torch.tensor([1.0, 3.0, 2.0, 2.0])


def estimate(estimator, kl_coef, values=None, gamma=1.0, lam=0.95):
    # EST_SCORES as 2 prompts x n=2 samples, scores not whitened
    return alg.estimate_advantages(estimator, EST_SCORES, EST_KL, EST_MASK, values, 2, kl_coef, gamma, lam, False)


def test_grpo_with_kl_coef_zero_ignores_kl():
    # scores [1, 3 | 2, 2], n=2: group means 2 and 2, unbiased stds sqrt(2) and 0.
    # advantages (1-2)/sqrt(2) = -0.7071068, +0.7071068, then 0, 0; broadcast over valid tokens.
    adv, returns = estimate("grpo", kl_coef=0.0)
    a = 1 / math.sqrt(2)
    expected = torch.tensor([[-a, -a], [a, 0.0], [0.0, 0.0], [0.0, 0.0]])
    assert_close(adv, expected, **TOL)
    assert returns is None


def test_rloo_with_kl_coef_uses_sequence_kl():
    # kl_coef 0.5; sequence KL (valid tokens only) = [0.3, 0.3, 0.0, 1.0]
    # shaped = scores - 0.5 * kl = [1 - 0.15, 3 - 0.15, 2 - 0, 2 - 0.5] = [0.85, 2.85, 2.0, 1.5]
    # rloo, n=2: r_i - r_other -> [0.85 - 2.85, 2.85 - 0.85, 2.0 - 1.5, 1.5 - 2.0] = [-2, 2, 0.5, -0.5]
    adv, _ = estimate("rloo", kl_coef=0.5)
    expected = torch.tensor([[-2.0, -2.0], [2.0, 0.0], [0.5, 0.5], [-0.5, -0.5]])
    assert_close(adv, expected, **TOL)


def test_gae_returns_and_whitened_advantages_on_valid_tokens():
    values = torch.zeros(4, 2)
    # kl_coef 0: token rewards are the scores [1, 3, 2, 2] at each row's last valid token.
    # gamma = lam = 1 and values 0: returns = reward-to-go = [[1, 1], [3, 0], [2, 2], [2, 2]].
    adv, returns = estimate("gae", kl_coef=0.0, values=values, gamma=1.0, lam=1.0)
    assert_close(returns, torch.tensor([[1.0, 1.0], [3.0, 0.0], [2.0, 2.0], [2.0, 2.0]]), **TOL)
    # valid advantages [1, 1, 3, 2, 2, 2, 2]: mean 13/7, whitened; padding stays 0
    assert adv[1, 1] == 0.0
    valid = adv[EST_MASK.bool()]
    assert abs(valid.mean().item()) < 1e-6 and abs(valid.std().item() - 1.0) < 1e-5
    # deviations (-6/7, -6/7, 8/7, 1/7 x 4), squares (36 + 36 + 64 + 4) / 49 = 20/7,
    # unbiased var 20/7 / 6 = 10/21; each divided by sqrt(10/21 + 1e-8)
    std = math.sqrt(10 / 21 + 1e-8)
    expected = torch.tensor([[-6 / 7, -6 / 7], [8 / 7, 0.0], [1 / 7, 1 / 7], [1 / 7, 1 / 7]]) / std
    assert_close(adv, expected, **TOL)


def test_reinforce_pp_with_whitened_scores():
    # scores (1, 3) whitened: mean 2, unbiased std sqrt(2) -> (-a, a), a = 1/sqrt(2) (eps 1e-8 aside)
    # kl_coef 0, so token rewards: row 0 [0, -a] (2 valid tokens), row 1 [a, pad]
    # gamma 1 reward-to-go: row 0 [-a, -a], row 1 [a, pad]; valid (-a, -a, a): mean -a/3,
    # deviations (-2a/3, -2a/3, 4a/3), squares 24a^2/9 = 4/3, unbiased var 2/3, std sqrt(2/3)
    # whitened: (-2a/3) / sqrt(2/3) = -1/sqrt(3), (4a/3) / sqrt(2/3) = 2/sqrt(3); padding 0
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv, returns = alg.estimate_advantages(
        "reinforce_pp", torch.tensor([1.0, 3.0]), torch.zeros(2, 2), mask, None, 2, 0.0, 1.0, 0.95, True
    )
    r = 1 / math.sqrt(3)
    assert_close(adv, torch.tensor([[-r, -r], [2 * r, 0.0]]), **TOL)
    assert returns is None


def test_unknown_estimator_names_it():
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        estimate("ppo", kl_coef=0.0)


def test_estimator_table_holds_the_config_names():
    # rlhf_dist.config (no torch) validates algo.estimator against its own tuples: they must agree
    assert set(ESTIMATORS) == set(alg.TOKEN_ESTIMATORS) | set(alg.GROUP_ESTIMATORS)
    assert set(GROUP_ESTIMATORS) == set(alg.GROUP_ESTIMATORS)


def _policy_inputs():
    # log ratios d and advantages A; row 1 t=2 is padding (d=2, A=5 would dominate if it leaked)
    d = t64([[0.1, 0.3, -0.5], [0.3, -0.5, 2.0]])
    old = t64([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    logprobs = (old + d).requires_grad_(True)
    advantages = t64([[1.0, 1.0, 1.0], [-2.0, -2.0, 5.0]])
    mask = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return logprobs, old, advantages, mask


def test_policy_loss_clipping_and_stats():
    logprobs, old, advantages, mask = _policy_inputs()
    # eps = 0.2; ratio = e^d; clip range [0.8, 1.2]
    # (0,0) A=1,  ratio e^0.1 = 1.1052 (in range): -A*r = -A*clip = -e^0.1    -> -e^0.1, not clipped
    # (0,1) A=1,  ratio e^0.3 = 1.3499 -> 1.2:  -1.3499 vs -1.2               -> -1.2, clipped
    # (0,2) A=1,  ratio e^-0.5 = 0.6065 -> 0.8: -0.6065 vs -0.8               -> -e^-0.5, not clipped
    # (1,0) A=-2, ratio e^0.3 -> 1.2:  2e^0.3 = 2.6997 vs 2.4                 -> 2e^0.3, not clipped
    # (1,1) A=-2, ratio e^-0.5 -> 0.8: 2e^-0.5 = 1.2131 vs 1.6                -> 1.6, clipped
    # loss = (-e^0.1 - 1.2 - e^-0.5 + 2e^0.3 + 1.6) / 5 ; clipfrac = 2/5
    # approx_kl = 0.5 * (0.01 + 0.09 + 0.25 + 0.09 + 0.25) / 5 = 0.5 * 0.69 / 5 = 0.069
    expected = (-math.exp(0.1) - 1.2 - math.exp(-0.5) + 2 * math.exp(0.3) + 1.6) / 5
    loss, stats = alg.policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    assert_close(loss, t64(expected), **TOL)
    assert isinstance(stats["clipfrac"], float) and isinstance(stats["approx_kl"], float)
    assert_close(stats["clipfrac"], 0.4, **TOL)
    assert_close(stats["approx_kl"], 0.069, **TOL)


def test_policy_loss_gradient_is_zero_where_clipped():
    logprobs, old, advantages, mask = _policy_inputs()
    loss, _ = alg.policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    loss.backward()
    # where the unclipped term is active: d/dlogp (-A * e^(logp - old)) / 5 = -A * ratio / 5
    # (0,0): -e^0.1/5; (0,2): -e^-0.5/5; (1,0): 2e^0.3/5; clipped tokens and padding: 0
    expected = t64(
        [[-math.exp(0.1) / 5, 0.0, -math.exp(-0.5) / 5], [2 * math.exp(0.3) / 5, 0.0, 0.0]]
    )
    assert_close(logprobs.grad, expected, **TOL)


def test_value_loss_clipping():
    # eps = 0.5 (all numbers exact in binary); row 1 t=2 is padding (v=100 would dominate)
    values = t64([[2.0, 0.5, 0.0], [-1.0, 1.0, 100.0]])
    old = t64([[1.0, 0.25, 1.0], [0.0, 1.0, 0.0]])
    returns = t64([[3.0, 0.0, 2.0], [-2.0, 0.0, 0.0]])
    mask = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # (0,0) v-old = 1 -> 0.5, v_clip 1.5:  (2-3)^2 = 1    vs (1.5-3)^2 = 2.25  -> 2.25, clipped
    # (0,1) v-old = 0.25 in range, v_clip 0.5: 0.25 vs 0.25                   -> 0.25, not clipped
    # (0,2) v-old = -1 -> -0.5, v_clip 0.5: (0-2)^2 = 4 vs (0.5-2)^2 = 2.25    -> 4, not clipped
    # (1,0) v-old = -1 -> -0.5, v_clip -0.5: (-1+2)^2 = 1 vs (-0.5+2)^2 = 2.25 -> 2.25, clipped
    # (1,1) v-old = 0, v_clip 1.0: 1 vs 1                                     -> 1, not clipped
    # loss = 0.5 * (2.25 + 0.25 + 4 + 2.25 + 1) / 5 = 0.5 * 9.75 / 5 = 0.975; clipfrac = 2/5
    loss, stats = alg.value_loss(values, old, returns, mask, clip_eps=0.5)
    assert_close(loss, t64(0.975), **TOL)
    assert isinstance(stats["clipfrac"], float)
    assert_close(stats["clipfrac"], 0.4, **TOL)


def test_entropy_from_logits():
    logits = t64([[[5.0, 5.0, 5.0], [0.0, 0.0, math.log(2.0)]]])
    # (0,0) uniform over 3: H = ln 3 (the shift by 5 must not matter)
    # (0,1) p = (1/4, 1/4, 1/2): logsumexp = ln(1 + 1 + 2) = ln 4;
    #       sum p*l = 1/2 * ln 2; H = 2 ln 2 - 0.5 ln 2 = 1.5 ln 2
    expected = torch.tensor([[math.log(3.0), 1.5 * math.log(2.0)]], dtype=torch.float32)
    assert_close(alg.entropy_from_logits(logits), expected, **TOL)


def test_logprobs_from_logits():
    logits = t64([[[0.0, 0.0, math.log(2.0)], [1.0, 2.0, 3.0]]])
    labels = torch.tensor([[2, 0]])
    # (0,0) label 2: p = 2 / (1 + 1 + 2) = 1/2 -> -ln 2
    # (0,1) label 0: 1 - logsumexp(1, 2, 3) = 1 - (3 + ln(1 + e^-1 + e^-2)) = -2 - ln(1 + e^-1 + e^-2)
    tail = -2.0 - math.log(1.0 + math.exp(-1.0) + math.exp(-2.0))
    expected = torch.tensor([[-math.log(2.0), tail]], dtype=torch.float32)
    assert_close(alg.logprobs_from_logits(logits, labels), expected, **TOL)


def test_logprobs_from_logits_upcasts_bf16():
    # 1, 2, 3 are exact in bf16, so a float32 computation gives -2 - ln(1 + e^-1 + e^-2) = -2.407606
    # to 1e-6; a bf16 result (about 3 significant digits, wrong dtype) would fail
    logits = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.bfloat16)
    out = alg.logprobs_from_logits(logits, torch.tensor([[0]]))
    tail = -2.0 - math.log(1.0 + math.exp(-1.0) + math.exp(-2.0))
    assert_close(out, torch.tensor([[tail]], dtype=torch.float32), **TOL)


def test_lr_multiplier_warmup():
    # warmup 4: (step + 1) / 4 -> 0.25, 0.5, 0.75, 1.0 for steps 0..3, for any schedule
    for schedule in ("constant", "linear", "cosine"):
        got = [alg.lr_multiplier(s, 4, 12, schedule) for s in range(4)]
        assert_close(got, [0.25, 0.5, 0.75, 1.0], **TOL)
    # no warmup: step 0 is already past it
    assert_close(alg.lr_multiplier(0, 0, 10, "constant"), 1.0, **TOL)


def test_lr_multiplier_decay():
    # warmup 4, total 12: progress = (step - 4) / 8, clamped to [0, 1]
    # constant: always 1
    assert_close(alg.lr_multiplier(9, 4, 12, "constant"), 1.0, **TOL)
    assert_close(alg.lr_multiplier(50, 4, 12, "constant"), 1.0, **TOL)
    # linear: 1 - progress; step 4 -> 1, step 6 -> 1 - 2/8 = 0.75, step 12 -> 0, step 20 -> 0
    got = [alg.lr_multiplier(s, 4, 12, "linear") for s in (4, 6, 12, 20)]
    assert_close(got, [1.0, 0.75, 0.0, 0.0], **TOL)
    # cosine: 0.5 * (1 + cos(pi * progress));
    # step 4 -> 1; step 6 -> 0.5 * (1 + cos(pi/4)) = 0.5 + sqrt(2)/4 = 0.8535534;
    # step 8 -> 0.5 * (1 + cos(pi/2)) = 0.5; step 12 and 20 -> 0.5 * (1 + cos(pi)) = 0
    got = [alg.lr_multiplier(s, 4, 12, "cosine") for s in (4, 6, 8, 12, 20)]
    assert_close(got, [1.0, 0.5 + math.sqrt(2.0) / 4, 0.5, 0.0, 0.0], **TOL)


def test_lr_multiplier_unknown_schedule_names_it():
    with pytest.raises(ValueError, match="unknown lr schedule 'exponential'"):
        alg.lr_multiplier(0, 4, 12, "exponential")
