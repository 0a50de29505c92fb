"""Hand-derived checks for the off-policy rollout correction (core.losses.rollout_correction) and for
the policy loss it weights; each expected number is worked out in a comment."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_dist import config
from rlhf_dist.core.losses import ROLLOUT_CORRECTIONS, actor_loss, policy_loss, rollout_correction

TOL = {"atol": 1e-6, "rtol": 0.0}
F64 = torch.float64
CAP = 2.0


def t64(data):
    return torch.tensor(data, dtype=F64)


# Trainer logprobs before the update (old) and the ratios rho = pi_old / pi_rollout we want; the
# engine logprobs are built from them: rollout = old - log rho. Row 1 t=2 is padding, with rho = 100
# so that a leak into the statistics would show (ratio_max 100, mean (6.5 + 100) / 6).
OLD = t64([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
RHO = [[1.5, 3.0, 0.4], [0.6, 1.0, 100.0]]
MASK = t64([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# cap 2: tis truncates 3 -> 2 and keeps the rest; mis keeps [1/2, 2] = [0.5, 2]: 1.5, 0.6 and 1 stay
# with their ratio, 3 (above) and 0.4 (below) are dropped; padding gets 0 in both.
W_TIS = [[1.5, 2.0, 0.4], [0.6, 1.0, 0.0]]
W_MIS = [[1.5, 0.0, 0.0], [0.6, 1.0, 0.0]]


def rollout_logprobs():
    return OLD - torch.log(t64(RHO))


def test_config_names_the_same_modes():
    # rlhf_dist.config (no torch) validates algo.rollout_correction against its own tuple
    assert config.ROLLOUT_CORRECTIONS == ROLLOUT_CORRECTIONS


def test_tis_truncates_one_token_at_the_cap():
    weights, stats = rollout_correction(OLD, rollout_logprobs(), MASK, "tis", CAP)
    # min(rho, 2) on valid tokens: (1.5, 2 [3 truncated], 0.4 | 0.6, 1, padding 0)
    assert_close(weights, t64(W_TIS), **TOL)
    # 1 of the 5 valid tokens has rho > 2
    assert_close(stats["rollout_corr/truncated_frac"], 0.2, **TOL)
    assert "rollout_corr/masked_frac" not in stats


def test_mis_drops_tokens_outside_the_band_on_both_sides():
    weights, stats = rollout_correction(OLD, rollout_logprobs(), MASK, "mis", CAP)
    # band [1/2, 2]: 3 > 2 and 0.4 < 0.5 get 0; the kept tokens keep their IS weight rho (IcePop's M(k) = k)
    assert_close(weights, t64(W_MIS), **TOL)
    # 2 of the 5 valid tokens dropped
    assert_close(stats["rollout_corr/masked_frac"], 0.4, **TOL)
    assert "rollout_corr/truncated_frac" not in stats


@pytest.mark.parametrize("mode", ["none", "tis", "mis"])
def test_stats_ignore_padding_and_give_the_mismatch_kl(mode):
    weights, stats = rollout_correction(OLD, rollout_logprobs(), MASK, mode, CAP)
    # valid rho: 1.5, 3, 0.4, 0.6, 1 (the padding 100 is not counted)
    # ratio_mean = 6.5 / 5 = 1.3; ratio_max = 3 (raw, before truncation)
    # k3 of KL(pi_rollout || pi_old), tokens sampled from pi_rollout: rho - 1 - log rho per token;
    # sum = (6.5 - 5) - log(1.5 * 3 * 0.4 * 0.6 * 1) = 1.5 - log 1.08; mean = (1.5 - log 1.08) / 5 = 0.284608
    assert_close(stats["rollout_corr/ratio_mean"], 1.3, **TOL)
    assert_close(stats["rollout_corr/ratio_max"], 3.0, **TOL)
    assert_close(stats["rollout_corr/mismatch_kl"], (1.5 - math.log(1.08)) / 5, **TOL)
    assert all(isinstance(v, float) for v in stats.values())
    if mode == "none":
        # no weights, so the loss path pays nothing; the mismatch is still reported
        assert weights is None
        assert list(stats) == ["rollout_corr/ratio_mean", "rollout_corr/ratio_max", "rollout_corr/mismatch_kl"]


def test_overflowing_ratio_gives_finite_weights():
    # log rho = 1000 on a valid token and on padding: rho = e^1000 = inf even in float64
    old = t64([[1000.0, 0.0], [0.0, 1000.0]])
    rollout = t64([[0.0, 0.0], [0.0, 0.0]])
    mask = t64([[1.0, 1.0], [1.0, 0.0]])
    tis, tis_stats = rollout_correction(old, rollout, mask, "tis", CAP)
    mis, _ = rollout_correction(old, rollout, mask, "mis", CAP)
    # tis: min(inf, 2) = 2; mis: inf is outside [0.5, 2] -> 0 (not inf * 0 = NaN); rho = 1 elsewhere
    assert_close(tis, t64([[2.0, 1.0], [1.0, 0.0]]), **TOL)
    assert_close(mis, t64([[0.0, 1.0], [1.0, 0.0]]), **TOL)
    # the raw ratio is reported as it is; the padding overflow does not reach the means
    assert tis_stats["rollout_corr/ratio_max"] == math.inf
    assert_close(tis_stats["rollout_corr/truncated_frac"], 1.0 / 3.0, **TOL)


def test_weights_carry_no_gradient():
    old = OLD.clone().requires_grad_(True)
    weights, _ = rollout_correction(old, rollout_logprobs(), MASK, "tis", CAP)
    assert not weights.requires_grad


@pytest.mark.parametrize(
    ("mode", "cap", "message"),
    [("is", CAP, "unknown rollout correction 'is'"), ("tis", 1.0, "must be > 1"), ("mis", 0.5, "must be > 1")],
)
def test_bad_mode_or_cap_is_refused(mode, cap, message):
    with pytest.raises(ValueError, match=message):
        rollout_correction(OLD, rollout_logprobs(), MASK, mode, cap)


def test_a_batch_without_response_tokens_is_refused():
    with pytest.raises(ValueError, match="no response token"):
        rollout_correction(OLD, rollout_logprobs(), torch.zeros_like(MASK), "none", CAP)


# ---------------------------------------------------------------- the weighted policy loss


def _policy_inputs():
    # as in test_algorithms: log ratios d = logp - old and advantages A; row 1 t=2 is padding
    d = t64([[0.1, 0.3, -0.5], [0.3, -0.5, 2.0]])
    logprobs = (OLD + d).requires_grad_(True)
    advantages = t64([[1.0, 1.0, 1.0], [-2.0, -2.0, 5.0]])
    return logprobs, OLD, advantages, MASK


# Per-token PPO losses at eps = 0.2 (derived in test_algorithms.test_policy_loss_clipping_and_stats):
# row 0: (-e^0.1, -1.2 [clipped], -e^-0.5); row 1: (2e^0.3, 1.6 [clipped], padding)
L = [[-math.exp(0.1), -1.2, -math.exp(-0.5)], [2 * math.exp(0.3), 1.6, 0.0]]
# d l / d logp where the unclipped term is active: -A * ratio; 0 where clipped
G = [[-math.exp(0.1), 0.0, -math.exp(-0.5)], [2 * math.exp(0.3), 0.0, 0.0]]


def _weighted(values, weights):
    return [[v * w for v, w in zip(vr, wr)] for vr, wr in zip(values, weights)]


@pytest.mark.parametrize(("mode", "w"), [("tis", W_TIS), ("mis", W_MIS)], ids=["tis", "mis"])
def test_policy_loss_with_weights_is_the_hand_weighted_loss(mode, w):
    logprobs, old, advantages, mask = _policy_inputs()
    weights, _ = rollout_correction(old, rollout_logprobs(), mask, mode, CAP)
    loss, stats = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, rollout_weights=weights)
    # token_mean: sum_t w_t l_t / 5, the denominator still the 5 valid tokens (mis: dropped ones count)
    # tis: (1.5 (-e^0.1) + 2 (-1.2) + 0.4 (-e^-0.5) + 0.6 (2e^0.3) + 1 (1.6)) / 5
    # mis: (1.5 (-e^0.1) + 0.6 (2e^0.3) + 1.6) / 5
    assert_close(loss, t64(sum(map(sum, _weighted(L, w))) / 5), **TOL)
    # the clip statistics do not depend on the weights (test_algorithms: clipfrac 2/5, approx_kl 0.069)
    assert_close(stats["clipfrac"], 0.4, **TOL)
    assert_close(stats["approx_kl"], 0.069, **TOL)
    loss.backward()
    # every token's gradient scaled by its weight: w_t * (-A_t ratio_t) / 5 where unclipped
    assert_close(logprobs.grad, t64(_weighted(G, w)) / 5, **TOL)


def test_dropped_tokens_keep_their_place_in_the_sequence_mean():
    logprobs, old, advantages, mask = _policy_inputs()
    loss, _ = policy_loss(
        logprobs, old, advantages, mask, clip_eps=0.2, agg="seq_mean_token_mean", rollout_weights=t64(W_MIS)
    )
    # row 0 keeps 1 of 3 tokens but is still divided by 3; row 1 keeps 2 of 2:
    # ((1.5 (-e^0.1)) / 3 + (0.6 (2e^0.3) + 1.6) / 2) / 2
    row0 = 1.5 * -math.exp(0.1) / 3
    row1 = (0.6 * 2 * math.exp(0.3) + 1.6) / 2
    assert_close(loss, t64((row0 + row1) / 2), **TOL)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean"])
def test_all_ones_weights_leave_the_policy_loss_unchanged(agg):
    logprobs, old, advantages, mask = _policy_inputs()
    plain, plain_stats = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2, agg=agg)
    ones, ones_stats = policy_loss(
        logprobs, old, advantages, mask, clip_eps=0.2, agg=agg, rollout_weights=torch.ones_like(mask)
    )
    # x * 1.0 is exact in floating point
    assert torch.equal(ones, plain)
    assert ones_stats == plain_stats


def test_actor_loss_weights_the_policy_term_only():
    logprobs, old, advantages, mask = _policy_inputs()
    # entropy and reference as in test_algorithms.test_actor_loss_adds_entropy_bonus_and_kl_term:
    # entropy token mean 3 -> bonus -0.01 * 3 = -0.03; k2 of d = logp - ref (1, 0, -1 | 2, 0) has
    # token mean 0.6 -> KL term 0.1 * 0.6 = +0.06. Neither is weighted.
    entropy = t64([[1.0, 2.0, 3.0], [4.0, 5.0, 100.0]]).requires_grad_(True)
    ref_gap = t64([[1.0, 0.0, -1.0], [2.0, 0.0, 30.0]])
    ref = logprobs.detach() - ref_gap
    loss, stats = actor_loss(
        logprobs, old, ref, advantages, entropy, mask, 0.2, clip_eps_high=None, dual_clip=None, agg="token_mean",
        max_len=None, rollout_weights=t64(W_MIS), entropy_coef=0.01, kl_coef=0.1, kl_estimator="k2",
    )
    # policy part (mis weights): (1.5 (-e^0.1) + 0.6 (2e^0.3) + 1.6) / 5
    policy = sum(map(sum, _weighted(L, W_MIS))) / 5
    assert_close(stats["policy_loss"], policy, **TOL)
    assert_close(stats["kl_loss"], 0.6, **TOL)
    assert_close(loss, t64(policy - 0.03 + 0.06), **TOL)
    loss.backward()
    # d/dlogp: weighted policy gradient + the unweighted KL gradient 0.1 * d / 5 = (0.02, 0, -0.02 | 0.04, 0)
    kl_grad = 0.1 * ref_gap * mask / 5
    assert_close(logprobs.grad, t64(_weighted(G, W_MIS)) / 5 + kl_grad, **TOL)
    # the entropy bonus keeps its gradient -0.01 / 5 on every valid token, dropped ones included
    assert_close(entropy.grad, -0.002 * mask, **TOL)
