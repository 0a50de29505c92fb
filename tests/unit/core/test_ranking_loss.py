"""The reward-model loss over rankings of K responses (``ranking_loss``) and the batch that carries
them (``RankingBatch``), against hand-computed numbers and against the pairwise Bradley-Terry loss."""

import math

import pytest
import torch

from rlhf_dist.core.experience import NO_RESPONSE, collate_rankings
from rlhf_dist.core.losses import comparable_pairs, ranking_loss



def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, total: float | None = None):
    """The Bradley-Terry loss of (B,) pairs written out on its own, the reference a ranking of two
    must equal: sum(-log sigmoid(r_chosen - r_rejected)) / (total or B), with the pairwise accuracy
    (ties wrong) and mean margin."""
    margin = chosen.float() - rejected.float()
    loss = -torch.nn.functional.logsigmoid(margin).sum() / (len(margin) if total is None else total)
    return loss, {"accuracy": (margin > 0).float().mean().item(), "margin": margin.mean().item()}

def nll(margin: float) -> float:
    """-log sigmoid(m) = log(1 + e^-m)."""
    return math.log1p(math.exp(-margin))


def test_ranking_loss_by_hand():
    # Prompt 0: three responses ranked 0, 1, 2 (best first), scores 2, 0, 1. Its comparisons:
    #   (0 over 1): margin 2 - 0 = 2    right
    #   (0 over 2): margin 2 - 1 = 1    right
    #   (1 over 2): margin 0 - 1 = -1   wrong
    #   prompt loss = (nll(2) + nll(1) + nll(-1)) / 3
    # Prompt 1: ranks 0, 1, 1 (a tie) and an empty slot, scores 0, 0.5, -1 (the slot's 5 is ignored):
    #   (0 over 1): margin -0.5  wrong;  (0 over 2): margin 1  right;  1 and 2 tie: no comparison
    #   prompt loss = (nll(-0.5) + nll(1)) / 2
    # loss = mean of the two prompt losses; accuracy 3 right of 5 comparisons; margin (2+1-1-0.5+1)/5
    scores = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 0.5, -1.0, 5.0]])
    ranks = torch.tensor([[0, 1, 2, NO_RESPONSE], [0, 1, 1, NO_RESPONSE]])
    loss, stats = ranking_loss(scores, ranks)
    first = (nll(2) + nll(1) + nll(-1)) / 3
    second = (nll(-0.5) + nll(1)) / 2
    assert loss.item() == pytest.approx((first + second) / 2, abs=1e-6)
    assert stats["accuracy"] == pytest.approx(3 / 5, abs=1e-9)
    assert stats["margin"] == pytest.approx(2.5 / 5, abs=1e-6)


def test_ranking_loss_is_the_mean_over_prompts_of_the_mean_pairwise_bradley_terry_loss():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 5, generator=gen)
    ranks = torch.tensor([
        [0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [0, 0, 1, 1, 2], [2, 0, 1, NO_RESPONSE, NO_RESPONSE],
        [1, 0, NO_RESPONSE, NO_RESPONSE, NO_RESPONSE], [0, 3, 3, 1, 2],
    ])
    per_prompt = []
    for b in range(len(ranks)):
        pairs = [(i, j) for i in range(5) for j in range(5) if 0 <= ranks[b, i] < ranks[b, j]]
        better = torch.stack([scores[b, i] for i, _ in pairs])
        worse = torch.stack([scores[b, j] for _, j in pairs])
        per_prompt.append(pairwise_loss(better, worse)[0])
    loss, stats = ranking_loss(scores, ranks)
    torch.testing.assert_close(loss, torch.stack(per_prompt).mean(), rtol=0, atol=1e-6)
    pairs = comparable_pairs(ranks)
    right = sum(int(scores[b, i] > scores[b, j]) for b, i, j in pairs.nonzero().tolist())
    assert stats["accuracy"] == pytest.approx(right / len(pairs.nonzero()), abs=1e-9)


def test_a_pair_is_a_ranking_of_two_exactly():
    gen = torch.Generator().manual_seed(1)
    chosen = torch.randn(7, generator=gen, requires_grad=True)
    rejected = torch.randn(7, generator=gen, requires_grad=True)
    ranks = torch.tensor([[0, 1]] * 7)
    for total in (None, 11.0):  # alone, and as a part of a batch of 11 prompts
        expected, expected_stats = pairwise_loss(chosen, rejected, total)
        expected_grads = torch.autograd.grad(expected, (chosen, rejected))
        loss, stats = ranking_loss(torch.stack([chosen, rejected], dim=1), ranks, total)
        grads = torch.autograd.grad(loss, (chosen, rejected))
        assert torch.equal(loss, expected)  # bit for bit, and so are the gradients
        assert all(torch.equal(g, e) for g, e in zip(grads, expected_grads))
        assert stats == pytest.approx(expected_stats, abs=1e-6)


def test_the_parts_of_a_batch_add_up_to_its_loss_and_accuracy_however_it_is_cut():
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(8, 4, generator=gen)
    ranks = torch.tensor([[0, 1, 2, 3], [0, 0, 1, NO_RESPONSE], [1, 0, NO_RESPONSE, NO_RESPONSE], [3, 2, 1, 0]] * 2)
    whole, whole_stats = ranking_loss(scores, ranks)
    n = comparable_pairs(ranks).sum().item()  # 6 + 2 + 1 + 6 per four prompts: 30
    assert n == 30
    for cut in ([8], [1, 7], [3, 2, 3], [1] * 8):
        start, loss, accuracy = 0, 0.0, 0.0
        for size in cut:
            part, stats = ranking_loss(scores[start:start + size], ranks[start:start + size], total=8, comparisons=n)
            loss, accuracy, start = loss + part, accuracy + stats["accuracy"], start + size
        torch.testing.assert_close(loss, whole, rtol=0, atol=1e-6)
        assert accuracy == pytest.approx(whole_stats["accuracy"], abs=1e-9)


def test_a_prompt_without_a_comparison_is_refused():
    with pytest.raises(ValueError, match=r"prompts \[1\] have no comparable pair"):
        ranking_loss(torch.zeros(2, 2), torch.tensor([[0, 1], [0, 0]]))


def test_collate_rankings_layout():
    batch = collate_rankings([[[5, 6], [7], [8, 9, 4]], [[1], [2, 3]]], [[0, 1, 1], [1, 0]], pad_id=0)
    # K = 3 slots (the second prompt has an empty one), L = 3 tokens, right-padded
    assert batch.input_ids.tolist() == [[[5, 6, 0], [7, 0, 0], [8, 9, 4]], [[1, 0, 0], [2, 3, 0], [0, 0, 0]]]
    assert batch.attention_mask.sum(dim=2).tolist() == [[2, 1, 3], [1, 2, 0]]
    assert batch.ranks.tolist() == [[0, 1, 1], [1, 0, NO_RESPONSE]]
    assert len(batch) == 2 and batch.sequence_lengths() == [6, 3]
    assert batch.comparisons() == 2 + 1  # (0 over 1), (0 over 2); (1 over 0) in the second
    second = batch.select(torch.tensor([1]))
    assert second.ranks.tolist() == [[1, 0, NO_RESPONSE]] and second.comparisons() == 1
    assert [len(s) for s in batch.split(2)] == [1, 1]
    with pytest.raises(ValueError, match="ranking 0: 2 responses with ranks"):
        collate_rankings([[[1], [2]]], [[0]], pad_id=0)
