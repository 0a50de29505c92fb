"""Hand-derived checks for rlhf_dist.core's stats, advantages, losses and schedule (KL estimators and controllers: test_kl.py): masked
statistics, rewards and advantages, the estimator table, losses and their options, LR schedule; each
expected number is worked out in a comment."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_dist import config
from rlhf_dist.core.advantages import (
    GROUP_ESTIMATORS,
    GROUP_STD_EPS,
    TOKEN_ESTIMATORS,
    dr_grpo_advantages,
    estimate_advantages,
    gae,
    grpo_advantages,
    neutralise_dropped,
    reinforce_pp_advantages,
    rloo_advantages,
    token_rewards,
)
from rlhf_dist.core.losses import actor_loss, aggregate_loss, policy_loss, value_loss
from rlhf_dist.core.schedule import lr_multiplier
from rlhf_dist.core.stats import (
    broadcast_to_tokens,
    entropy_from_logits,
    logprobs_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    whiten_scores,
)

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
    assert_close(masked_sum(X, MASK), t64(7.0), **TOL)
    assert_close(masked_mean(X, MASK), t64(7.0 / 3.0), **TOL)
    assert_close(masked_sum(X, MASK, dim=1), t64([3.0, 4.0]), **TOL)
    assert_close(masked_mean(X, MASK, dim=1), t64([1.5, 4.0]), **TOL)
    # a bool mask selects the same entries
    assert_close(masked_mean(X, MASK.bool()), t64(7.0 / 3.0), **TOL)


def test_masked_var():
    # valid 1, 2, 4; mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    # biased: 42/9 / 3 = 14/9; unbiased: 42/9 / 2 = 7/3
    assert_close(masked_var(X, MASK, unbiased=False), t64(14.0 / 9.0), **TOL)
    assert_close(masked_var(X, MASK, unbiased=True), t64(7.0 / 3.0), **TOL)


def test_masked_var_unbiased_needs_two_valid_positions():
    one_valid = t64([[1.0, 0.0]])
    with pytest.raises(ValueError, match="at least 2 valid positions"):
        masked_var(t64([[3.0, 9.0]]), one_valid, unbiased=True)
    # biased variance of a single value is 0
    assert_close(masked_var(t64([[3.0, 9.0]]), one_valid, unbiased=False), t64(0.0), **TOL)


def test_masked_whiten():
    x = t64([[1.0, 5.0, 40.0], [3.0, -9.0, 9.0]])
    mask = t64([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # valid 1, 5, 3; mean 3; deviations -2, 2, 0; squares sum 8; unbiased var 8/2 = 4; std 2
    # whitened valid: (-2/2, 2/2, 0/2) = (-1, 1, 0)
    # padding gets the same map: (40 - 3)/2 = 18.5, (-9 - 3)/2 = -6, (9 - 3)/2 = 3
    out = masked_whiten(x, mask, shift_mean=True, eps=0.0)
    assert_close(out, t64([[-1.0, 1.0, 18.5], [0.0, -6.0, 3.0]]), **TOL)
    # shift_mean=False adds the mean 3 back: valid (2, 4, 3)
    out = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    assert_close(out * mask, t64([[2.0, 4.0, 0.0], [3.0, 0.0, 0.0]]), **TOL)


def test_token_rewards_puts_score_at_last_valid_token():
    scores = t64([2.0, -1.0])
    kl = t64([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # penalty -0.5 * kl: row 0 (-0.05, -0.1, -0.15); row 1 (-0.2, -0.25, padding -> 0)
    # score at last valid token: row 0 index 2 -> -0.15 + 2 = 1.85; row 1 index 1 -> -0.25 - 1 = -1.25
    rewards = token_rewards(scores, kl, mask, kl_coef=0.5)
    assert_close(rewards, t64([[-0.05, -0.1, 1.85], [-0.2, -1.25, 0.0]]), **TOL)
    # same with a bool mask
    assert_close(token_rewards(scores, kl, mask.bool(), kl_coef=0.5), rewards, **TOL)


def test_token_rewards_refuses_rows_without_a_response_token():
    # row 1's "last valid index" would be 0 - 1 = -1: its score would land on the last padding column
    kl = t64([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    mask = t64([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match=r"^token_rewards: rows \[1\] of the batch have no response token"):
        token_rewards(t64([1.0, 2.0, 3.0]), kl, mask, kl_coef=0.5)
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        token_rewards(t64([1.0, 2.0, 3.0]), kl, mask.bool(), kl_coef=0.5)


def test_whiten_scores():
    # s = (1, 2, 3, 6); mean 3; deviations (-2, -1, 0, 3); squares sum 14; unbiased std sqrt(14/3)
    std = math.sqrt(14.0 / 3.0)
    out = whiten_scores(t64([1.0, 2.0, 3.0, 6.0]), eps=0.0)
    assert_close(out, t64([-2.0 / std, -1.0 / std, 0.0, 3.0 / std]), **TOL)


def test_whiten_scores_single_score_is_centered_not_nan():
    # B == 1: s - mean(s) = 5 - 5 = 0 (an unbiased std of one value would be NaN)
    assert_close(whiten_scores(t64([5.0])), t64([0.0]), **TOL)


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
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    assert_close(advantages, t64([[0.5575, 0.35, -1.0], [0.49, 1.8, 0.0]]), **TOL)
    assert_close(returns, t64([[1.0575, 1.35, 1.0], [1.49, 2.0, 0.0]]), **TOL)


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
        grpo_advantages(SCORES, n=3, eps=0.0),
        t64([-1.0, 0.0, 1.0, -1.0 / s3, -1.0 / s3, 2.0 / s3]),
        **TOL,
    )
    # default eps = GROUP_STD_EPS = 1e-4 is a floor, max(std, eps): both stds (1 and 4/sqrt(3))
    # are above it, so the default gives exactly the eps = 0 numbers
    std1 = 4.0 / s3
    expected = t64([-1.0, 0.0, 1.0, (-4 / 3) / std1, (-4 / 3) / std1, (8 / 3) / std1])
    assert_close(grpo_advantages(SCORES, n=3), expected, **TOL)


def test_grpo_advantages_equal_scores_give_zero_not_nan():
    # group 0 = (5, 5): deviations 0, std 0 -> 0 / max(0, 1e-4) = 0
    # group 1 = (1, 3): mean 2, deviations (-1, 1), unbiased var 2 / 1 = 2 -> (-1, 1) / max(sqrt(2), 1e-4)
    out = grpo_advantages(t64([5.0, 5.0, 1.0, 3.0]), n=2)
    d = math.sqrt(2.0)
    assert_close(out, t64([0.0, 0.0, -1.0 / d, 1.0 / d]), **TOL)


def test_grpo_advantages_do_not_amplify_float_noise():
    # group (0, 0, 0, 1e-6): mean 2.5e-7, deviations (-2.5e-7 x 3, 7.5e-7),
    #   squares 3 * 6.25e-14 + 5.625e-13 = 7.5e-13, unbiased var 7.5e-13 / 3 = 2.5e-13, std 5e-7
    #   std floored at 1e-4: (-2.5e-7, 7.5e-7) / 1e-4 = (-0.0025, 0.0075)
    #   (the old std + 1e-6 gave -2.5e-7 / 1.5e-6 = -0.1667 and 7.5e-7 / 1.5e-6 = +0.5)
    out = grpo_advantages(t64([0.0, 0.0, 0.0, 1e-6]), n=4)
    assert_close(out, t64([-0.0025, -0.0025, -0.0025, 0.0075]), **TOL)
    # the same in float32 around 0.5, where 0.5 + 1e-6 is itself rounded: all |A| < 0.01
    out32 = grpo_advantages(torch.tensor([0.5, 0.5, 0.5, 0.5 + 1e-6]), n=4)
    assert out32.abs().max().item() < 0.01, out32


def test_grpo_std_floor_only_acts_below_it():
    # group 0 = (0, 1e-4): mean 5e-5, deviations (-5e-5, 5e-5), std sqrt(2 * 2.5e-9 / 1) = 7.07e-5
    #   < 1e-4, so floored: (-5e-5, 5e-5) / 1e-4 = (-0.5, 0.5)
    # group 1 = (0, 1): mean 0.5, std sqrt(0.5) > 1e-4: (-0.5, 0.5) / sqrt(0.5) = (-1/sqrt(2), 1/sqrt(2))
    out = grpo_advantages(t64([0.0, 1e-4, 0.0, 1.0]), n=2)
    a = 1.0 / math.sqrt(2.0)
    assert_close(out, t64([-0.5, 0.5, -a, a]), **TOL)
    assert GROUP_STD_EPS == 1e-4


def test_group_estimators_validate_n():
    for fn in (grpo_advantages, dr_grpo_advantages, rloo_advantages):
        # one sample per prompt has no group baseline
        with pytest.raises(ValueError, match="n=1"):
            fn(SCORES, n=1)
        # B = 6 is not a multiple of 4
        with pytest.raises(ValueError, match="B=6 .* n=4"):
            fn(SCORES, n=4)


def test_dr_grpo_advantages():
    # r - mean_g, no std: group 0 mean 2 -> (-1, 0, 1); group 1 mean 4/3 -> (-4/3, -4/3, 8/3)
    out = dr_grpo_advantages(SCORES, n=3)
    assert_close(out, t64([-1.0, 0.0, 1.0, -4.0 / 3.0, -4.0 / 3.0, 8.0 / 3.0]), **TOL)


def test_rloo_advantages():
    # r_i - mean of the other two:
    # group 0: 1 - (2+3)/2 = -1.5;  2 - (1+3)/2 = 0;  3 - (1+2)/2 = 1.5
    # group 1: 0 - (0+4)/2 = -2;    0 - (0+4)/2 = -2; 4 - (0+0)/2 = 4
    # (check: n/(n-1) * (r - mean_g) = 1.5 * (-1, 0, 1) and 1.5 * (-4/3, -4/3, 8/3))
    out = rloo_advantages(SCORES, n=3)
    assert_close(out, t64([-1.5, 0.0, 1.5, -2.0, -2.0, 4.0]), **TOL)


def test_broadcast_to_tokens():
    mask = t64([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # row 0 gets 2 on its two valid tokens, row 1 gets -3 on its one; padding 0
    expected = t64([[2.0, 2.0, 0.0], [-3.0, 0.0, 0.0]])
    assert_close(broadcast_to_tokens(t64([2.0, -3.0]), mask), expected, **TOL)
    assert_close(broadcast_to_tokens(t64([2.0, -3.0]), mask.bool()), expected, **TOL)


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
    out = reinforce_pp_advantages(rewards, mask, gamma=gamma)
    assert_close(out, expected, **TOL)
    assert_close(reinforce_pp_advantages(rewards, mask.bool(), gamma=gamma), expected, **TOL)


# ---------------------------------------------------------------- the estimator table and dropped samples


def test_dropped_scores_take_their_group_mean():
    # n=2: group [1, nan] -> nan becomes 1 (mean of the kept 1); group [nan, nan] -> batch mean of
    # kept scores (1 + 3 + 5) / 3 = 3; group [3, 5] untouched.
    filled, kept = neutralise_dropped(torch.tensor([1.0, NAN, NAN, NAN, 3.0, 5.0]), n=2)
    assert_close(filled, torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0, 5.0]), **TOL)
    assert kept.tolist() == [True, False, False, False, True, True]


def test_all_dropped_is_an_error():
    with pytest.raises(ValueError, match="every sample of the step was dropped"):
        neutralise_dropped(torch.tensor([NAN, NAN]), n=1)


EST_MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
EST_KL = torch.tensor([[0.1, 0.2], [0.3, 9.0], [0.0, 0.0], [0.5, 0.5]])  # 9.0 sits on padding
EST_SCORES = torch.tensor([1.0, 3.0, 2.0, 2.0])


def estimate(estimator, kl_coef, values=None, gamma=1.0, lam=0.95):
    # EST_SCORES as 2 prompts x n=2 samples, scores not whitened
    return estimate_advantages(estimator, EST_SCORES, EST_KL, EST_MASK, values, 2, kl_coef, gamma, lam, False)


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
    adv, returns = estimate_advantages(
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
    assert set(config.ESTIMATORS) == set(TOKEN_ESTIMATORS) | set(GROUP_ESTIMATORS)
    assert set(config.GROUP_ESTIMATORS) == set(GROUP_ESTIMATORS)


def test_every_choice_list_of_config_is_the_math_s_own():
    # config validates a value against its tuple; the math raises on any other name: they must agree
    from rlhf_dist.core import kl, losses, schedule

    assert config.LOSS_AGGS == losses.LOSS_AGGS
    assert config.ROLLOUT_CORRECTIONS == losses.ROLLOUT_CORRECTIONS
    assert config.RATIO_LEVELS == losses.RATIO_LEVELS
    assert config.KL_ESTIMATORS == tuple(kl.KL_ESTIMATORS)
    assert config.LR_SCHEDULES == schedule.LR_SCHEDULES


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
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    assert_close(loss, t64(expected), **TOL)
    assert isinstance(stats["clipfrac"], float) and isinstance(stats["approx_kl"], float)
    assert_close(stats["clipfrac"], 0.4, **TOL)
    assert_close(stats["approx_kl"], 0.069, **TOL)


def test_policy_loss_gradient_is_zero_where_clipped():
    logprobs, old, advantages, mask = _policy_inputs()
    loss, _ = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
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
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.5)
    assert_close(loss, t64(0.975), **TOL)
    assert isinstance(stats["clipfrac"], float)
    assert_close(stats["clipfrac"], 0.4, **TOL)


def test_a_value_within_the_clip_range_is_not_counted_clipped_by_rounding():
    # float32: v - old = -0.0827 is within 0.2, but old + (v - old) rounds one ulp away from v and
    # its squared error from the return comes out larger: counted as clipped before.
    v, old, ret = (torch.tensor([[x]], dtype=torch.float32) for x in (0.036155786365270615, 0.11885771155357361,
                                                                     -0.4732849597930908))
    assert ((old + (v - old)) - ret) ** 2 > (v - ret) ** 2  # the rounding this guards against
    _, stats = value_loss(v, old, ret, torch.ones(1, 1), clip_eps=0.2)
    assert stats["clipfrac"] == 0.0


# ---------------------------------------------------------------- loss aggregation

AGG_X = t64([[1.0, 2.0, 100.0], [4.0, 6.0, 8.0]])  # 100 is padding
AGG_MASK = t64([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])


def test_aggregate_loss_modes():
    # valid: row 0 (1, 2), row 1 (4, 6, 8); total 21 over 5 tokens
    # token_mean: 21 / 5 = 4.2
    assert_close(aggregate_loss(AGG_X, AGG_MASK, "token_mean"), t64(4.2), **TOL)
    # seq_mean_token_mean: row means 3/2 = 1.5 and 18/3 = 6 -> (1.5 + 6) / 2 = 3.75
    assert_close(aggregate_loss(AGG_X, AGG_MASK, "seq_mean_token_mean"), t64(3.75), **TOL)
    # seq_mean_token_sum_norm, max_len 4: 21 / (B * max_len) = 21 / 8 = 2.625
    out = aggregate_loss(AGG_X, AGG_MASK, "seq_mean_token_sum_norm", max_len=4)
    assert_close(out, t64(2.625), **TOL)
    # a bool mask selects the same tokens
    assert_close(aggregate_loss(AGG_X, AGG_MASK.bool(), "seq_mean_token_mean"), t64(3.75), **TOL)


def test_aggregate_loss_errors():
    with pytest.raises(ValueError, match="unknown loss agg 'sum'"):
        aggregate_loss(AGG_X, AGG_MASK, "sum")
    with pytest.raises(ValueError, match="needs max_len"):
        aggregate_loss(AGG_X, AGG_MASK, "seq_mean_token_sum_norm")


# rows 1 and 3 have no response token
EMPTY_ROWS_MASK = t64([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
EMPTY_ROWS_X = t64([[1.0, 2.0, 100.0], [5.0, 6.0, 7.0], [4.0, 9.0, 9.0], [8.0, 8.0, 8.0]])


def test_seq_mean_aggregations_refuse_rows_without_a_response_token():
    # seq_mean_token_mean: row 1's mean would be 0 / 0 = NaN and make the whole loss NaN
    for agg, max_len in (("seq_mean_token_mean", None), ("seq_mean_token_sum_norm", 4)):
        with pytest.raises(ValueError, match=r"rows \[1, 3\] of the batch have no response token") as excinfo:
            aggregate_loss(EMPTY_ROWS_X, EMPTY_ROWS_MASK, agg, max_len)
        assert f"aggregate_loss(agg='{agg}')" in str(excinfo.value)
    # token_mean is well defined while some row has a token: (1 + 2 + 4) / 3 = 7/3
    out = aggregate_loss(EMPTY_ROWS_X, EMPTY_ROWS_MASK, "token_mean")
    assert_close(out, t64(7.0 / 3.0), **TOL)
    # ... and refused when none has (0 / 0)
    with pytest.raises(ValueError, match=r"rows \[0, 1\] of the batch have no response token"):
        aggregate_loss(AGG_X, torch.zeros_like(AGG_MASK), "token_mean")


def test_policy_loss_refuses_rows_without_a_response_token():
    logprobs, old, advantages, mask = _policy_inputs()
    mask = mask.clone()
    mask[1] = 0.0  # row 1 has no response token
    with pytest.raises(ValueError, match=r"rows \[1\] of the batch have no response token"):
        policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, agg="seq_mean_token_mean")


# ---------------------------------------------------------------- policy loss options

# per-token losses at eps = 0.2 (derived in test_policy_loss_clipping_and_stats):
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
        loss, stats = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, **kwargs)
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
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, clip_eps_high=0.4)
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
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, dual_clip=3.0)
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
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    assert_close(loss, t64(expected), **TOL)
    assert "dual_clipfrac" not in stats


def test_policy_loss_dual_clip_must_exceed_one():
    logprobs, old, advantages, mask = _dual_clip_inputs()
    for c in (1.0, 0.5):
        with pytest.raises(ValueError, match="dual_clip must be > 1"):
            policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, dual_clip=c)


def test_policy_loss_agg_modes():
    logprobs, old, advantages, mask = _policy_inputs()
    # seq_mean_token_mean: (mean(row 0 over 3) + mean(row 1 over 2)) / 2
    expected = (sum(ROW0) / 3 + sum(ROW1) / 2) / 2
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, agg="seq_mean_token_mean")
    assert_close(loss, t64(expected), **TOL)
    # stats stay token means over valid tokens whatever the agg
    assert_close(stats["clipfrac"], 0.4, **TOL)
    # seq_mean_token_sum_norm with max_len 4: sum of the 5 losses / (2 * 4)
    expected = (sum(ROW0) + sum(ROW1)) / 8
    loss, _ = policy_loss(
        logprobs, old, advantages, mask, clip_eps=0.2, agg="seq_mean_token_sum_norm", max_len=4
    )
    assert_close(loss, t64(expected), **TOL)
    with pytest.raises(ValueError, match="unknown loss agg 'mean'"):
        policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, agg="mean")


# ---------------------------------------------------------------- the actor loss (policy + entropy + KL)

# Entropy per token; padding (row 1 t=2) is 100 so a leak would show.
ENTROPY = [[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]]
# d = logp - ref per token; padding 30 (k2 would be capped at 10 there if counted).
REF_GAP = [[1.0, 0.0, -1.0], [2.0, 0.0, 30.0]]
ACTOR_OPTIONS = {
    "clip_eps_high": None, "dual_clip": None, "agg": "token_mean", "max_len": None, "rollout_weights": None,
}


def _actor_inputs():
    logprobs, old, advantages, mask = _policy_inputs()
    ref = logprobs.detach() - t64(REF_GAP)
    entropy = t64(ENTROPY).requires_grad_(True)
    return logprobs, old, ref, advantages, entropy, mask


def test_actor_loss_adds_entropy_bonus_and_kl_term():
    logprobs, old, ref, advantages, entropy, mask = _actor_inputs()
    # policy part (test_policy_loss_clipping_and_stats): P = (sum ROW0 + sum ROW1) / 5
    # entropy token mean: (1 + 2 + 3 + 4 + 5) / 5 = 3;            bonus -0.01 * 3 = -0.03
    # k2 = 0.5 d^2 = (0.5, 0, 0.5, 2, 0), token mean 3 / 5 = 0.6;  KL term 0.1 * 0.6 = +0.06
    # loss = P - 0.03 + 0.06
    policy = (sum(ROW0) + sum(ROW1)) / 5
    loss, stats = actor_loss(
        logprobs, old, ref, advantages, entropy, mask, 0.2, **ACTOR_OPTIONS,
        entropy_coef=0.01, kl_coef=0.1, kl_estimator="k2",
    )
    assert_close(loss, t64(policy - 0.03 + 0.06), **TOL)
    assert list(stats) == ["clipfrac", "approx_kl", "policy_loss", "kl_loss", "entropy"]
    assert_close(stats["policy_loss"], policy, **TOL)
    assert_close(stats["kl_loss"], 0.6, **TOL)
    assert_close(stats["entropy"], 3.0, **TOL)
    assert_close(stats["clipfrac"], 0.4, **TOL)
    loss.backward()
    # d loss / d logp = policy part (test_policy_loss_gradient_is_zero_where_clipped)
    #                   + 0.1 * d / 5 from the KL term (d k2 / d logp = d): (0.02, 0, -0.02 | 0.04, 0)
    # d loss / d entropy = -0.01 / 5 = -0.002 on every valid token, 0 on padding
    grad = t64([
        [-math.exp(0.1) / 5 + 0.02, 0.0, -math.exp(-0.5) / 5 - 0.02],
        [2 * math.exp(0.3) / 5 + 0.04, 0.0, 0.0],
    ])
    assert_close(logprobs.grad, grad, **TOL)
    assert_close(entropy.grad, -0.002 * mask, **TOL)


def test_actor_loss_without_bonus_or_kl_term_is_the_policy_loss():
    logprobs, old, _, advantages, entropy, mask = _actor_inputs()
    # entropy_coef 0 and kl_coef None: loss = P exactly; no reference logprobs needed; entropy is
    # still reported (token mean 3) but gets no gradient
    loss, stats = actor_loss(
        logprobs, old, None, advantages, entropy, mask, 0.2, **ACTOR_OPTIONS,
        entropy_coef=0.0, kl_coef=None, kl_estimator="k3",
    )
    policy, _ = policy_loss(logprobs, old, advantages, mask, 0.2)
    assert torch.equal(loss, policy)
    assert "kl_loss" not in stats
    assert_close(stats["entropy"], 3.0, **TOL)
    loss.backward()
    assert entropy.grad is None


def test_actor_loss_kl_coef_zero_still_reports_the_kl():
    logprobs, old, ref, advantages, entropy, mask = _actor_inputs()
    # kl_coef 0 (an adaptive controller may reach it): the term adds 0 * kl, kl_loss is still reported
    # k3 = e^-d - 1 + d: (e^-1, 0, e - 2, e^-2 + 1, 0), token mean (e^-1 + e + e^-2 - 1) / 5
    loss, stats = actor_loss(
        logprobs, old, ref, advantages, entropy, mask, 0.2, **ACTOR_OPTIONS,
        entropy_coef=0.0, kl_coef=0.0, kl_estimator="k3",
    )
    assert_close(loss, t64((sum(ROW0) + sum(ROW1)) / 5), **TOL)
    assert_close(stats["kl_loss"], (math.exp(-1) + math.e + math.exp(-2) - 1) / 5, **TOL)


def test_actor_loss_reduces_every_term_by_the_same_agg():
    logprobs, old, ref, advantages, entropy, mask = _actor_inputs()
    # seq_mean_token_mean: each term is (mean of row 0 over 3 + mean of row 1 over 2) / 2
    # policy (ROW0 / 3 + ROW1 / 2) / 2; entropy (6/3 + 9/2) / 2 = 3.25; k2 (1/3 + 2/2) / 2 = 2/3
    # loss = policy - 0.01 * 3.25 + 0.1 * 2/3; the reported entropy stays the token mean 3
    policy = (sum(ROW0) / 3 + sum(ROW1) / 2) / 2
    loss, stats = actor_loss(
        logprobs, old, ref, advantages, entropy, mask, 0.2, **{**ACTOR_OPTIONS, "agg": "seq_mean_token_mean"},
        entropy_coef=0.01, kl_coef=0.1, kl_estimator="k2",
    )
    assert_close(loss, t64(policy - 0.0325 + 0.1 * 2 / 3), **TOL)
    assert_close(stats["kl_loss"], 2 / 3, **TOL)
    assert_close(stats["entropy"], 3.0, **TOL)


def test_entropy_from_logits():
    logits = t64([[[5.0, 5.0, 5.0], [0.0, 0.0, math.log(2.0)]]])
    # (0,0) uniform over 3: H = ln 3 (the shift by 5 must not matter)
    # (0,1) p = (1/4, 1/4, 1/2): logsumexp = ln(1 + 1 + 2) = ln 4;
    #       sum p*l = 1/2 * ln 2; H = 2 ln 2 - 0.5 ln 2 = 1.5 ln 2
    expected = torch.tensor([[math.log(3.0), 1.5 * math.log(2.0)]], dtype=torch.float32)
    assert_close(entropy_from_logits(logits), expected, **TOL)


def test_logprobs_from_logits():
    logits = t64([[[0.0, 0.0, math.log(2.0)], [1.0, 2.0, 3.0]]])
    labels = torch.tensor([[2, 0]])
    # (0,0) label 2: p = 2 / (1 + 1 + 2) = 1/2 -> -ln 2
    # (0,1) label 0: 1 - logsumexp(1, 2, 3) = 1 - (3 + ln(1 + e^-1 + e^-2)) = -2 - ln(1 + e^-1 + e^-2)
    tail = -2.0 - math.log(1.0 + math.exp(-1.0) + math.exp(-2.0))
    expected = torch.tensor([[-math.log(2.0), tail]], dtype=torch.float32)
    assert_close(logprobs_from_logits(logits, labels), expected, **TOL)


def test_logprobs_from_logits_upcasts_bf16():
    # 1, 2, 3 are exact in bf16, so a float32 computation gives -2 - ln(1 + e^-1 + e^-2) = -2.407606
    # to 1e-6; a bf16 result (about 3 significant digits, wrong dtype) would fail
    logits = torch.tensor([[[1.0, 2.0, 3.0]]], dtype=torch.bfloat16)
    out = logprobs_from_logits(logits, torch.tensor([[0]]))
    tail = -2.0 - math.log(1.0 + math.exp(-1.0) + math.exp(-2.0))
    assert_close(out, torch.tensor([[tail]], dtype=torch.float32), **TOL)


def test_lr_multiplier_warmup():
    # warmup 4: (step + 1) / 4 -> 0.25, 0.5, 0.75, 1.0 for steps 0..3, for any schedule
    for schedule in ("constant", "linear", "cosine"):
        got = [lr_multiplier(s, 4, 12, schedule) for s in range(4)]
        assert_close(got, [0.25, 0.5, 0.75, 1.0], **TOL)
    # no warmup: step 0 is already past it
    assert_close(lr_multiplier(0, 0, 10, "constant"), 1.0, **TOL)


def test_lr_multiplier_decay():
    # warmup 4, total 12: progress = (step - 4) / 8, clamped to [0, 1]
    # constant: always 1
    assert_close(lr_multiplier(9, 4, 12, "constant"), 1.0, **TOL)
    assert_close(lr_multiplier(50, 4, 12, "constant"), 1.0, **TOL)
    # linear: 1 - progress; step 4 -> 1, step 6 -> 1 - 2/8 = 0.75, step 12 -> 0, step 20 -> 0
    got = [lr_multiplier(s, 4, 12, "linear") for s in (4, 6, 12, 20)]
    assert_close(got, [1.0, 0.75, 0.0, 0.0], **TOL)
    # cosine: 0.5 * (1 + cos(pi * progress));
    # step 4 -> 1; step 6 -> 0.5 * (1 + cos(pi/4)) = 0.5 + sqrt(2)/4 = 0.8535534;
    # step 8 -> 0.5 * (1 + cos(pi/2)) = 0.5; step 12 and 20 -> 0.5 * (1 + cos(pi)) = 0
    got = [lr_multiplier(s, 4, 12, "cosine") for s in (4, 6, 8, 12, 20)]
    assert_close(got, [1.0, 0.5 + math.sqrt(2.0) / 4, 0.5, 0.0, 0.0], **TOL)


def test_lr_multiplier_unknown_schedule_names_it():
    with pytest.raises(ValueError, match="unknown lr schedule 'exponential'"):
        lr_multiplier(0, 4, 12, "exponential")
