"""The reward-model loss on pairs, SFT loss and the evaluation arithmetic, against hand-computed numbers."""

import math

import pytest
import torch

from rlhf_dist.core.losses import ranking_loss, sft_loss
from rlhf_dist.core.stats import sequence_kl, win_rate
from rlhf_dist.evaluate import summarize_policy


def test_pairwise_loss_by_hand():
    chosen = torch.tensor([2.0, 0.0, -1.0])
    rejected = torch.tensor([0.0, 0.0, 1.0])
    loss, stats = ranking_loss(torch.stack([chosen, rejected], dim=1), torch.tensor([[0, 1]] * 3))
    # margins 2, 0, -2: -log sigmoid(m) = log(1 + e^-m)
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["accuracy"] == pytest.approx(1 / 3)  # the tie counts as wrong
    assert stats["margin"] == pytest.approx(0.0)


def test_pairwise_loss_gradient_pushes_the_margin_up():
    chosen = torch.tensor([0.5], requires_grad=True)
    rejected = torch.tensor([0.5], requires_grad=True)
    ranking_loss(torch.stack([chosen, rejected], dim=1), torch.tensor([[0, 1]]))[0].backward()
    # d/dm -log sigmoid(m) at m=0 is -1/2
    assert chosen.grad.item() == pytest.approx(-0.5) and rejected.grad.item() == pytest.approx(0.5)


def test_sft_loss_is_the_token_mean_nll():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-3.0, -9.0, -9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert sft_loss(logprobs, mask).item() == pytest.approx((1 + 2 + 3) / 3)


def test_win_rate_counts_ties_half():
    assert win_rate([2.0, 1.0, 0.0, -1.0], [1.0, 1.0, 1.0, -2.0]) == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_sequence_kl_by_hand():
    policy = [[-0.5, -1.0], [-0.2]]
    base = [[-1.0, -1.5], [-0.7]]
    # (0.5 + 0.5 + 0.5) summed per sequence: 1.0 and 0.5; mean 0.75
    assert sequence_kl(policy, base) == pytest.approx(0.75)
    assert sequence_kl(policy, policy) == 0.0
    with pytest.raises(ValueError, match="token counts"):
        sequence_kl([[-1.0]], [[-1.0, -2.0]])


def test_summarize_policy():
    out = summarize_policy(
        gold=[2.0, 0.0], baseline_gold=[1.0, 0.0], rewards=[0.5, -0.5],
        logprobs=[[-1.0], [-1.0, -1.0]], baseline_logprobs=[[-2.0], [-1.0, -1.5]], lengths=[1, 2],
    )
    assert out == pytest.approx(
        {"reward_mean": 0.0, "kl_to_baseline": (1.0 + 0.5) / 2, "response_length": 1.5, "gold_mean": 1.0,
         "win_rate": 0.75}
    )
    # without a gold metric there is no win rate
    assert "win_rate" not in summarize_policy(None, None, [1.0], [[-1.0]], [[-1.0]], [1])
