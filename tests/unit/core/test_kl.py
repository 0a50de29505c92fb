"""Hand-derived checks for the KL estimators (k1, k2, k3, their clamps and expected gradients) and
the KL controllers (rlhf_dist.core.kl, rlhf_dist.core.schedule); each expected number is worked out in a comment."""

import math

import pytest
import torch
from torch.testing import assert_close

from rlhf_dist.core import kl as K
from rlhf_dist.core import schedule
from rlhf_dist.core.advantages import token_rewards

TOL = {"atol": 1e-6, "rtol": 0.0}
F64 = torch.float64


def t64(data):
    return torch.tensor(data, dtype=F64)


# ---------------------------------------------------------------- KL estimators


def test_kl_k1():
    # k1 = logp - ref: (-1 - -1.5, -2 - -1) = (0.5, -1)
    kl = K.kl_k1(t64([[-1.0, -2.0]]), t64([[-1.5, -1.0]]))
    assert_close(kl, t64([[0.5, -1.0]]), **TOL)


# d = logp - ref = (-1 - -1.5, -2 - -1, -0.3 - -0.3) = (0.5, -1, 0)
LOGP = t64([[-1.0, -2.0, -0.3]])
REF = t64([[-1.5, -1.0, -0.3]])


def test_kl_k2():
    # k2 = 0.5 d^2 = (0.5 * 0.25, 0.5 * 1, 0) = (0.125, 0.5, 0)
    assert_close(K.kl_k2(LOGP, REF), t64([[0.125, 0.5, 0.0]]), **TOL)


def test_kl_k3():
    # k3 = e^-d - 1 + d:
    #   d = 0.5: e^-0.5 - 1 + 0.5 = e^-0.5 - 0.5 = 0.1065307
    #   d = -1:  e^1 - 1 - 1 = e - 2 = 0.7182818
    #   d = 0:   1 - 1 + 0 = 0
    expected = t64([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    assert_close(K.kl_k3(LOGP, REF), expected, **TOL)


def test_kl_estimate_dispatches_by_kind():
    # same numbers as above, reached through the kind string
    assert_close(K.kl_estimate(LOGP, REF, "k1"), t64([[0.5, -1.0, 0.0]]), **TOL)
    assert_close(K.kl_estimate(LOGP, REF, "k2"), t64([[0.125, 0.5, 0.0]]), **TOL)
    expected_k3 = t64([[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0]])
    assert_close(K.kl_estimate(LOGP, REF, "k3"), expected_k3, **TOL)


def test_kl_estimate_unknown_kind_names_it():
    with pytest.raises(ValueError, match="unknown KL estimator kind 'k4'"):
        K.kl_estimate(LOGP, REF, "k4")


# d = logp - ref over ref = 0: far below the reference, moderately off, and far above it
EXTREME_D = [-100.0, -15.0, -1.0, 0.5, 15.0, 25.0]


def test_kl_estimators_clamp_the_log_ratio_and_the_value():
    d = t64([EXTREME_D])
    ref = torch.zeros_like(d)
    # k1 = clamp(d, -20, 20): (-20, -15, -1, 0.5, 15, 20)
    assert_close(K.kl_k1(d, ref), t64([[-20.0, -15.0, -1.0, 0.5, 15.0, 20.0]]), **TOL)
    # k2 = min(0.5 * clamp(d)^2, 10): 0.5 * 400 = 200 -> 10; 0.5 * 225 = 112.5 -> 10; 0.5; 0.125;
    #   112.5 -> 10; 200 -> 10
    assert_close(K.kl_k2(d, ref), t64([[10.0, 10.0, 0.5, 0.125, 10.0, 10.0]]), **TOL)
    # k3 = min(e^-d - 1 + d, 10) on clamped d:
    #   d = -20: e^20 - 21 = 4.9e8 -> 10;  d = -15: e^15 - 16 = 3.3e6 -> 10 (unclamped it is 3.3e6)
    #   d = -1: e - 2;  d = 0.5: e^-0.5 - 0.5
    #   d = 15: e^-15 + 14 = 14.0000003 -> 10;  d = 25 -> 20: e^-20 + 19 -> 10
    expected = t64([[10.0, 10.0, math.e - 2.0, math.exp(-0.5) - 0.5, 10.0, 10.0]])
    assert_close(K.kl_k3(d, ref), expected, **TOL)
    assert K.KL_LOG_RATIO_CLAMP == 20.0 and K.KL_VALUE_CLAMP == 10.0


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
        kl = K.kl_estimate(logprobs, ref, kind)
        assert torch.isfinite(kl).all(), kind
        kl.sum().backward()
        assert torch.isfinite(logprobs.grad).all(), kind
        assert_close(logprobs.grad, torch.tensor([grad]), **TOL)


def test_k3_outlier_token_is_a_bounded_reward_penalty():
    # row 0: d = (-100, 0), score 1, kl_coef 0.05, float32; k3 = (10 [capped], 0)
    # rewards = (-0.05 * 10, -0.05 * 0 + 1) = (-0.5, 1.0)  (unclamped: (-inf, 1.0))
    kl = K.kl_k3(torch.tensor([[-100.0, 0.0]]), torch.zeros(1, 2))
    rewards = token_rewards(torch.tensor([1.0]), kl, torch.ones(1, 2), kl_coef=0.05)
    assert_close(rewards, torch.tensor([[-0.5, 1.0]]), **TOL)


def test_kl_estimator_expected_gradients_as_a_loss():
    # Exact expectations over a 3-token vocabulary, pi = softmax(theta), theta = (0, ln 2, ln 3):
    # pi = (1, 2, 3) / 6, ref = (1/2, 1/4, 1/4). E_pi[grad k] = sum_a pi_a * grad_theta k(a).
    theta = t64([0.0, math.log(2.0), math.log(3.0)]).requires_grad_(True)
    ref = t64([0.5, 0.25, 0.25]).log()

    def expected_grad(kind):
        logpi = torch.log_softmax(theta, dim=0)
        pi = logpi.exp().detach()
        (grads,) = torch.autograd.grad((pi * K.kl_estimate(logpi, ref, kind)).sum(), theta)
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


# ---------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    ctl = schedule.FixedKLController(0.05)
    # never moves, whatever the measured KL
    assert ctl.update(current_kl=100.0, n_steps=64) == 0.05
    assert ctl.update(current_kl=0.0, n_steps=64) == 0.05
    assert ctl.value == 0.05
    restored = schedule.FixedKLController(1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == 0.05


def test_adaptive_kl_controller_updates():
    ctl = schedule.AdaptiveKLController(init_value=0.1, target=6.0, horizon=100)
    # KL 9: e = 9/6 - 1 = 0.5 -> clipped to 0.2; value = 0.1 * (1 + 0.2 * 10/100) = 0.1 * 1.02 = 0.102
    assert_close(ctl.update(current_kl=9.0, n_steps=10), 0.102, **TOL)
    # KL 5.4: e = 0.9 - 1 = -0.1 (inside the clip); value = 0.102 * (1 - 0.1 * 20/100) = 0.102 * 0.98 = 0.09996
    assert_close(ctl.update(current_kl=5.4, n_steps=20), 0.09996, **TOL)
    assert_close(ctl.value, 0.09996, **TOL)
    # state round-trip, then KL 0: e = -1 -> clipped to -0.2; value = 0.09996 * (1 - 0.2 * 50/100) = 0.089964
    restored = schedule.AdaptiveKLController(init_value=1.0, target=6.0, horizon=100)
    restored.load_state_dict(ctl.state_dict())
    assert_close(restored.update(current_kl=0.0, n_steps=50), 0.089964, **TOL)


def test_adaptive_kl_controller_validates():
    with pytest.raises(ValueError, match="target must be > 0"):
        schedule.AdaptiveKLController(init_value=0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError, match="horizon must be > 0"):
        schedule.AdaptiveKLController(init_value=0.1, target=6.0, horizon=0)
