"""The controller's glue between rewards and advantages (pure tensor code, no actors)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlhf_dist.config import AlgoConfig
from rlhf_dist.controller import estimate_advantages, make_kl_controller, neutralise_dropped

NAN = math.nan


def test_dropped_scores_take_their_group_mean():
    # n=2: group [1, nan] -> nan becomes 1 (mean of the kept 1); group [nan, nan] -> batch mean of
    # kept scores (1 + 3 + 5) / 3 = 3; group [3, 5] untouched.
    filled, kept = neutralise_dropped(torch.tensor([1.0, NAN, NAN, NAN, 3.0, 5.0]), n=2)
    torch.testing.assert_close(filled, torch.tensor([1.0, 1.0, 3.0, 3.0, 3.0, 5.0]), atol=1e-6, rtol=0)
    assert kept.tolist() == [True, False, False, False, True, True]


def test_all_dropped_is_an_error():
    with pytest.raises(ValueError, match="every sample of the step was dropped"):
        neutralise_dropped(torch.tensor([NAN, NAN]), n=1)


MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
KL = torch.tensor([[0.1, 0.2], [0.3, 9.0], [0.0, 0.0], [0.5, 0.5]])  # 9.0 sits on padding


def test_grpo_with_kl_in_loss_ignores_kl():
    # scores [1, 3 | 2, 2], n=2: group means 2 and 2, unbiased stds sqrt(2) and 0.
    # advantages (1-2)/sqrt(2) = -0.7071068, +0.7071068, then 0, 0; broadcast over valid tokens.
    algo = AlgoConfig(estimator="grpo", kl_in="loss", kl_estimator="k3")
    adv, returns = estimate_advantages(algo, torch.tensor([1.0, 3.0, 2.0, 2.0]), KL, MASK, None, 2, kl_coef=0.5)
    a = 1 / math.sqrt(2)
    expected = torch.tensor([[-a, -a], [a, 0.0], [0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert returns is None


def test_rloo_with_kl_in_reward_uses_sequence_kl():
    # kl_coef 0.5; sequence KL (valid tokens only) = [0.3, 0.3, 0.0, 1.0]
    # shaped = scores - 0.5 * kl = [1 - 0.15, 3 - 0.15, 2 - 0, 2 - 0.5] = [0.85, 2.85, 2.0, 1.5]
    # rloo, n=2: r_i - r_other -> [0.85 - 2.85, 2.85 - 0.85, 2.0 - 1.5, 1.5 - 2.0] = [-2, 2, 0.5, -0.5]
    algo = AlgoConfig(estimator="rloo", kl_in="reward")
    adv, _ = estimate_advantages(algo, torch.tensor([1.0, 3.0, 2.0, 2.0]), KL, MASK, None, 2, kl_coef=0.5)
    expected = torch.tensor([[-2.0, -2.0], [2.0, 0.0], [0.5, 0.5], [-0.5, -0.5]])
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


def test_gae_returns_and_whitened_advantages_on_valid_tokens():
    algo = AlgoConfig(estimator="gae", gamma=1.0, lam=1.0, kl_in="reward")
    values = torch.zeros(4, 2)
    # kl_coef 0: token rewards are the scores [1, 3, 2, 2] at each row's last valid token.
    # gamma = lam = 1 and values 0: returns = reward-to-go = [[1, 1], [3, 0], [2, 2], [2, 2]].
    adv, returns = estimate_advantages(algo, torch.tensor([1.0, 3.0, 2.0, 2.0]), KL, MASK, values, 2, kl_coef=0.0)
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0], [3.0, 0.0], [2.0, 2.0], [2.0, 2.0]]), atol=1e-6, rtol=0)
    # valid advantages [1, 1, 3, 2, 2, 2, 2]: mean 13/7, whitened; padding stays 0
    assert adv[1, 1] == 0.0
    valid = adv[MASK.bool()]
    assert abs(valid.mean().item()) < 1e-6 and abs(valid.std().item() - 1.0) < 1e-5


def test_kl_controllers_from_config():
    fixed = make_kl_controller(AlgoConfig(kl_coef=0.1))
    assert fixed.update(100.0, 64) == 0.1
    # adaptive: error = clip(2.0 / 1.0 - 1, -0.2, 0.2) = 0.2; value = 0.1 * (1 + 0.2 * 64 / 640) = 0.102
    adaptive = make_kl_controller(dataclasses.replace(AlgoConfig(kl_coef=0.1), kl_controller="adaptive",
                                                      kl_target=1.0, kl_horizon=640.0))
    assert adaptive.update(2.0, 64) == pytest.approx(0.102, abs=1e-12)
