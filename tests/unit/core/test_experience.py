"""rlhf_dist.core.experience: padding layout of a rollout batch, splitting across actors, ragged rows."""

import pytest
import torch
from torch.testing import assert_close

from rlhf_dist.core.experience import (
    Experience,
    collate,
    concat,
    minibatch_rows,
    pad_right,
    routing_grid,
    split_sizes,
)
from rlhf_dist.models.modeling import micro_batches

TOL = {"atol": 1e-6, "rtol": 0.0}


def long(data):
    return torch.tensor(data, dtype=torch.long)


def test_collate_layout():
    exp = collate([[5, 6], [7]], [[1, 2, 3], [4]], pad_id=0)
    # prompts left-padded to P=2, responses right-padded to T=3:
    #   row 0: [5 6 | 1 2 3]
    #   row 1: [0 7 | 4 0 0]
    assert exp.prompt_width == 2
    assert torch.equal(exp.input_ids, long([[5, 6, 1, 2, 3], [0, 7, 4, 0, 0]]))
    assert torch.equal(exp.attention_mask, long([[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]))
    # position_ids = clamp(cumsum(mask) - 1, min=0):
    #   row 0: cumsum [1 2 3 4 5] - 1 = [0 1 2 3 4]
    #   row 1: cumsum [0 1 2 2 2] - 1 = [-1 0 1 1 1] -> clamp -> [0 0 1 1 1]
    # The left pad gets 0 (a duplicate of the first token's) and the right pads repeat the last
    # position; that is harmless because attention_mask is 0 there and those logits are never
    # read (response_mask is 0 on them too).
    assert torch.equal(exp.position_ids, long([[0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]))
    assert exp.response_mask.dtype == torch.float32
    assert_close(exp.response_mask, torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]), **TOL)
    assert torch.equal(exp.response_ids, long([[1, 2, 3], [4, 0, 0]]))
    assert len(exp) == 2
    assert exp.old_logprobs is None and exp.advantages is None


def test_collate_empty_response_keeps_one_masked_in_pad():
    exp = collate([[5], [6, 7]], [[], [8]], pad_id=9)
    # T = max(0, 1) = 1; row 0's empty response becomes one pad token, attended and in the mask
    #   row 0: [9 5 | 9], mask [0 1 1], positions clamp([0 1 2] - 1) = [0 0 1]
    #   row 1: [6 7 | 8], mask [1 1 1], positions [0 1 2]
    assert exp.prompt_width == 2
    assert torch.equal(exp.input_ids, long([[9, 5, 9], [6, 7, 8]]))
    assert torch.equal(exp.attention_mask, long([[0, 1, 1], [1, 1, 1]]))
    assert torch.equal(exp.position_ids, long([[0, 0, 1], [0, 1, 2]]))
    assert_close(exp.response_mask, torch.tensor([[1.0], [1.0]]), **TOL)


def test_collated_empty_response_passes_the_math_guards_and_a_hand_made_one_does_not():
    from rlhf_dist.core.advantages import token_rewards
    from rlhf_dist.core.losses import aggregate_loss

    # collate gives the empty response one valid (pad) position, so the score has a token to sit on:
    # rows [[], [8]] -> T = 1, mask [[1], [1]]; kl 0 -> rewards = scores on column 0 = [[2], [3]]
    exp = collate([[5], [6, 7]], [[], [8]], pad_id=9)
    kl = torch.zeros(2, 1)
    rewards = token_rewards(torch.tensor([2.0, 3.0]), kl, exp.response_mask, kl_coef=0.1)
    assert_close(rewards, torch.tensor([[2.0], [3.0]]), **TOL)
    # seq_mean_token_mean of ones: each row's mean is 1 -> (1 + 1) / 2 = 1
    loss = aggregate_loss(torch.ones(2, 1), exp.response_mask, "seq_mean_token_mean")
    assert_close(loss, torch.tensor(1.0), **TOL)
    # the same batch with row 0's mask zeroed (not built by collate) is refused, naming row 0
    unguarded = exp.with_fields(response_mask=torch.tensor([[0.0], [1.0]]))
    with pytest.raises(ValueError, match=r"rows \[0\] of the batch have no response token"):
        token_rewards(torch.tensor([2.0, 3.0]), kl, unguarded.response_mask, kl_coef=0.1)
    with pytest.raises(ValueError, match=r"rows \[0\] of the batch have no response token"):
        aggregate_loss(torch.ones(2, 1), unguarded.response_mask, "seq_mean_token_mean")


def test_collate_all_responses_empty():
    exp = collate([[5]], [[]], pad_id=0)
    assert torch.equal(exp.input_ids, long([[5, 0]]))
    assert torch.equal(exp.response_ids, long([[0]]))
    assert_close(exp.response_mask, torch.tensor([[1.0]]), **TOL)


@pytest.mark.parametrize(("prompts", "responses"), [([[1], [2]], [[3]]), ([[1]], [[2], [3]]), ([], [])])
def test_collate_needs_equal_nonzero_counts(prompts, responses):
    with pytest.raises(ValueError, match="equal, non-zero numbers"):
        collate(prompts, responses, pad_id=0)


@pytest.mark.parametrize(
    ("n", "parts", "sizes"),
    [(5, 2, [3, 2]), (4, 2, [2, 2]), (7, 3, [3, 2, 2]), (2, 3, [1, 1, 0]), (0, 2, [0, 0])],
)
def test_split_sizes(n, parts, sizes):
    assert split_sizes(n, parts) == sizes


def test_split_sizes_needs_a_part():
    with pytest.raises(ValueError, match="parts must be > 0"):
        split_sizes(3, 0)


def five_rows():
    exp = collate([[1], [2, 3], [4], [5, 6], [7]], [[8, 9], [10], [11, 12], [13], [14]], pad_id=0)
    logprobs = torch.arange(10, dtype=torch.float32).reshape(5, 2)
    return exp.with_fields(old_logprobs=logprobs, advantages=-logprobs)


def test_split_shards_concatenate_back():
    exp = five_rows()
    shards = exp.split(2)
    assert [len(s) for s in shards] == [3, 2]
    assert all(s.prompt_width == exp.prompt_width for s in shards)
    assert all(s.old_values is None and s.returns is None for s in shards)
    for name in ("input_ids", "attention_mask", "position_ids", "response_mask", "old_logprobs", "advantages"):
        assert torch.equal(concat([getattr(s, name) for s in shards]), getattr(exp, name)), name
    # rank order: shard 0 holds rows 0-2
    assert torch.equal(shards[0].input_ids, exp.input_ids[:3])


def test_select_with_index_tensor_keeps_other_fields():
    exp = five_rows()
    picked = exp.select(torch.tensor([3, 0]))
    assert len(picked) == 2
    assert picked.prompt_width == exp.prompt_width
    assert picked.old_values is None and picked.returns is None
    assert torch.equal(picked.input_ids, exp.input_ids[[3, 0]])
    assert torch.equal(picked.position_ids, exp.position_ids[[3, 0]])
    # old_logprobs rows 3 and 0 of arange(10).reshape(5, 2): [6, 7] and [0, 1]
    assert_close(picked.old_logprobs, torch.tensor([[6.0, 7.0], [0.0, 1.0]]), **TOL)
    assert_close(picked.advantages, torch.tensor([[-6.0, -7.0], [-0.0, -1.0]]), **TOL)
    assert isinstance(picked, Experience)


def test_rollout_weights_travel_with_their_rows():
    exp = five_rows()
    assert exp.rollout_weights is None
    # weights 10 * row + column, so each row's weights are recognisable
    weights = torch.arange(5, dtype=torch.float32)[:, None] * 10 + torch.tensor([0.0, 1.0])
    exp = exp.with_fields(rollout_weights=weights)
    shards = exp.split(2)
    assert torch.equal(concat([s.rollout_weights for s in shards]), weights)
    # micro-batches of 2 rows (as the trainer forms them): rows 0-1, 2-3, 4
    micros = list(micro_batches(exp, 2))
    assert [m.rollout_weights.tolist() for m in micros] == [
        [[0.0, 1.0], [10.0, 11.0]], [[20.0, 21.0], [30.0, 31.0]], [[40.0, 41.0]]
    ]
    # a shuffled selection keeps each row's weights beside its logprobs
    picked = exp.select(torch.tensor([3, 0]))
    assert torch.equal(picked.rollout_weights, weights[[3, 0]])
    assert torch.equal(picked.old_logprobs, exp.old_logprobs[[3, 0]])


def test_pad_right():
    expected = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(pad_right([[1.0, 2.0], [3.0], []], 3), expected, **TOL)
    out = pad_right([[0.5], [1.5, 2.5]], 2, value=-1.0)
    assert out.dtype == torch.float32
    assert_close(out, torch.tensor([[0.5, -1.0], [1.5, 2.5]]), **TOL)


def test_routing_grid_puts_each_recorded_position_under_its_token():
    # rows [[5, 6 | 1, 2, 3], [_, 7 | 4, _, _], [8, 9 | _, _, _]] (prompt width 2, response width 3)
    exp = collate([[5, 6], [7], [8, 9]], [[1, 2, 3], [4], []], pad_id=0)
    # an engine records every fed token: the prompt and the response but its last token; (n, layers 1, k 2)
    routes = [torch.tensor([[[10, 11]], [[12, 13]], [[14, 15]], [[16, 17]]], dtype=torch.int16),  # 5, 6, 1, 2
              torch.tensor([[[20, 21]]], dtype=torch.int16),  # 7 (4 is the last token)
              None]  # not recorded
    grid = routing_grid(exp, routes)
    assert grid.dtype == torch.int16 and grid.shape == (3, 5, 1, 2)
    assert grid[:, :, 0, 0].tolist() == [[10, 12, 14, 16, -1], [-1, 20, -1, -1, -1], [-1] * 5]
    assert grid[0, :4, 0, 1].tolist() == [11, 13, 15, 17]
    with pytest.raises(ValueError, match="routing of 2 sequences for 3 rows"):
        routing_grid(exp, routes[:2])
    with pytest.raises(ValueError, match=r"row 1: routing of shape \(1, 2, 2\)"):
        routing_grid(exp, [routes[0], torch.zeros(1, 2, 2, dtype=torch.int16), None])


def test_minibatch_rows_are_the_same_minibatches_on_any_number_of_ranks():
    # 12 rows, minibatches of 4: the permutation cut in three, each dealt row by row.
    order = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    one = minibatch_rows(12, 4, 1, 0, torch.Generator().manual_seed(5))
    assert [m.tolist() for m in one] == [order[0:4].tolist(), order[4:8].tolist(), order[8:12].tolist()]
    for world in (2, 4):
        per_rank = [minibatch_rows(12, 4, world, r, torch.Generator().manual_seed(5)) for r in range(world)]
        for k, whole in enumerate(one):
            parts = [per_rank[r][k] for r in range(world)]
            assert [len(p) for p in parts] == [4 // world] * world
            assert sorted(torch.cat(parts).tolist()) == sorted(whole.tolist())  # the same rows, cut otherwise
        assert per_rank[1][0].tolist() == [order[1].item(), order[1 + world].item()][: 4 // world]
