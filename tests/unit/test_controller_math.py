"""The controller's pure parts: config -> algorithm arguments, the step's metrics, its timer (no actors).

The advantage and dropped-sample math itself is tested in test_algorithms.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from rlhf_dist.config import AlgoConfig
from rlhf_dist.controller import Timer, make_kl_controller
from rlhf_dist.driver.metrics import step_metrics
from rlhf_dist.driver.timeline import Timeline
from rlhf_dist.rollout.queue import sample_seeds
from rlhf_dist.rollout.scoring import advantages_for

NAN = math.nan
TOL = {"atol": 1e-6, "rtol": 0.0}

MASK = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
KL = torch.tensor([[0.1, 0.2], [0.3, 9.0], [0.0, 0.0], [0.5, 0.5]])  # 9.0 sits on padding


def test_grpo_with_kl_in_loss_ignores_kl():
    # kl_in=loss: the KL is a loss term, so the reward gets kl_coef 0 whatever kl_coef says.
    # scores [1, 3 | 2, 2], n=2: group means 2 and 2, unbiased stds sqrt(2) and 0.
    # advantages (1-2)/sqrt(2) = -0.7071068, +0.7071068, then 0, 0; broadcast over valid tokens.
    algo = AlgoConfig(estimator="grpo", kl_in="loss", kl_estimator="k3")
    adv, returns = advantages_for(algo, torch.tensor([1.0, 3.0, 2.0, 2.0]), KL, MASK, None, 2, kl_coef=0.5)
    a = 1 / math.sqrt(2)
    expected = torch.tensor([[-a, -a], [a, 0.0], [0.0, 0.0], [0.0, 0.0]])
    torch.testing.assert_close(adv, expected, **TOL)
    assert returns is None


def test_rloo_with_kl_in_reward_uses_sequence_kl():
    # kl_coef 0.5; sequence KL (valid tokens only) = [0.3, 0.3, 0.0, 1.0]
    # shaped = scores - 0.5 * kl = [1 - 0.15, 3 - 0.15, 2 - 0, 2 - 0.5] = [0.85, 2.85, 2.0, 1.5]
    # rloo, n=2: r_i - r_other -> [0.85 - 2.85, 2.85 - 0.85, 2.0 - 1.5, 1.5 - 2.0] = [-2, 2, 0.5, -0.5]
    algo = AlgoConfig(estimator="rloo", kl_in="reward")
    adv, _ = advantages_for(algo, torch.tensor([1.0, 3.0, 2.0, 2.0]), KL, MASK, None, 2, kl_coef=0.5)
    expected = torch.tensor([[-2.0, -2.0], [2.0, 0.0], [0.5, 0.5], [-0.5, -0.5]])
    torch.testing.assert_close(adv, expected, **TOL)


def test_gae_from_config_reads_gamma_and_lam():
    # gamma = lam = 1, values 0, kl_coef 0: returns = reward-to-go of the scores [1, 3, 2, 2]
    # placed on each row's last valid token = [[1, 1], [3, 0], [2, 2], [2, 2]]
    algo = AlgoConfig(estimator="gae", gamma=1.0, lam=1.0, kl_in="reward")
    _, returns = advantages_for(algo, torch.tensor([1.0, 3.0, 2.0, 2.0]), KL, MASK, torch.zeros(4, 2), 2, 0.0)
    torch.testing.assert_close(returns, torch.tensor([[1.0, 1.0], [3.0, 0.0], [2.0, 2.0], [2.0, 2.0]]), **TOL)


def test_kl_controllers_from_config():
    fixed = make_kl_controller(AlgoConfig(kl_coef=0.1))
    assert fixed.update(100.0, 64) == 0.1
    # adaptive: error = clip(2.0 / 1.0 - 1, -0.2, 0.2) = 0.2; value = 0.1 * (1 + 0.2 * 64 / 640) = 0.102
    adaptive = make_kl_controller(dataclasses.replace(AlgoConfig(kl_coef=0.1), kl_controller="adaptive",
                                                      kl_target=1.0, kl_horizon=640.0))
    assert adaptive.update(2.0, 64) == pytest.approx(0.102, abs=1e-12)


POLICY_STATS = {"policy_loss": 0.25, "clipfrac": 0.125, "approx_kl": 0.01, "lr": 1e-5}
METRIC_KEYS = [
    "reward/mean", "reward/std", "reward/dropped", "kl/mean", "kl/token_mean", "kl/coef", "loss/policy",
    "ppo/clipfrac", "ppo/approx_kl", "ppo/lr", "entropy/mean", "response_length/mean", "logprob_gap/mean",
    "time/generate", "time/reward", "time/step", "throughput/gen_tokens_per_s",
]


def metrics_of(policy_stats=POLICY_STATS, critic_stats=None):
    # 4 samples, the second dropped; mask rows hold 2, 1, 2, 2 valid tokens (7 in all)
    raw_scores = torch.tensor([1.0, NAN, 3.0, 5.0])
    kept = ~torch.isnan(raw_scores)
    sequence_kl = (KL * MASK).sum(-1)
    entropy = torch.full((4, 2), 2.0)
    old_logprobs = -2.0 * KL
    return step_metrics(
        raw_scores, kept, KL, sequence_kl, MASK, entropy, torch.zeros(4, 2), old_logprobs, 0.05,
        policy_stats, critic_stats, {"time/generate": 2.0, "time/reward": 0.5}, 4.0,
    )


def test_step_metrics_by_hand():
    m = metrics_of()
    assert list(m) == METRIC_KEYS
    # kept scores (1, 3, 5): mean 3; deviations (-2, 0, 2), unbiased var 8 / 2 = 4, std 2; one dropped
    assert m["reward/mean"] == pytest.approx(3.0, abs=1e-6)
    assert m["reward/std"] == pytest.approx(2.0, abs=1e-6)
    assert m["reward/dropped"] == 1.0
    # sequence KL over valid tokens (0.1 + 0.2, 0.3, 0 + 0, 0.5 + 0.5) = (0.3, 0.3, 0, 1): mean 1.6 / 4 = 0.4
    # token mean: 1.6 over 7 valid tokens (the 9.0 on padding left out)
    assert m["kl/mean"] == pytest.approx(0.4, abs=1e-6)
    assert m["kl/token_mean"] == pytest.approx(1.6 / 7, abs=1e-6)
    assert m["kl/coef"] == 0.05 and m["loss/policy"] == 0.25 and m["ppo/lr"] == 1e-5
    # entropy 2 everywhere; lengths (2 + 1 + 2 + 2) / 4 = 1.75
    assert m["entropy/mean"] == pytest.approx(2.0, abs=1e-6)
    assert m["response_length/mean"] == pytest.approx(1.75, abs=1e-6)
    # |engine 0 - old (-2 kl)| = 2 kl on valid tokens: 2 * 1.6 / 7
    assert m["logprob_gap/mean"] == pytest.approx(3.2 / 7, abs=1e-6)
    # 7 generated tokens in time/generate = 2 s: 3.5 tokens/s; time/step as given
    assert m["throughput/gen_tokens_per_s"] == pytest.approx(3.5, abs=1e-6)
    assert m["time/step"] == 4.0 and m["time/reward"] == 0.5


def test_step_metrics_kl_loss_and_critic():
    m = metrics_of({**POLICY_STATS, "kl_loss": 0.3}, {"value_loss": 0.7, "value_clipfrac": 0.2})
    assert list(m) == [*METRIC_KEYS, "loss/kl", "loss/value", "ppo/value_clipfrac"]
    assert (m["loss/kl"], m["loss/value"], m["ppo/value_clipfrac"]) == (0.3, 0.7, 0.2)
    assert "loss/value" not in metrics_of(critic_stats={})


def test_timer_records_each_phase_and_its_span():
    timeline = Timeline()
    timer = Timer(timeline)
    with timer("reference", track="reference"):
        pass
    with timer("train", track="policy"):
        pass
    assert list(timer.times) == ["time/reference", "time/train"]
    assert [(track, name) for track, name, *_ in timeline.spans()] == [("reference", "reference"), ("policy", "train")]
    assert all(start <= end for _, _, start, end, _ in timeline.spans())


def test_sample_seeds_distinct_and_reproducible():
    a = sample_seeds(seed=0, step=3, n=64)
    assert a == sample_seeds(seed=0, step=3, n=64)
    assert len(set(a)) == 64
    assert not set(a) & set(sample_seeds(seed=0, step=4, n=64))
    assert sample_seeds(seed=1, step=3, n=64) != a
