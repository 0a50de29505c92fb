"""rlhf_dist.modeling's row chunking: micro_batches and in_chunks."""

import torch

from rlhf_dist.core.experience import PairBatch
from rlhf_dist.modeling import in_chunks, micro_batches


def _pairs(rows: int) -> PairBatch:
    # row i holds the value i in every field, so a slice shows which rows it took
    ids = torch.arange(rows).unsqueeze(1).repeat(1, 3)
    return PairBatch(ids, ids.clone(), ids[:, :2].clone(), ids[:, :2].clone())


def test_micro_batches_are_consecutive_slices_in_order():
    # 5 rows in micro-batches of 2: rows (0, 1), (2, 3), (4,) -- the last is shorter
    chunks = list(micro_batches(_pairs(5), 2))
    assert [c.chosen_ids[:, 0].tolist() for c in chunks] == [[0, 1], [2, 3], [4]]
    assert [c.rejected_mask.shape for c in chunks] == [(2, 2), (2, 2), (1, 2)]
    assert all(isinstance(c, PairBatch) for c in chunks)


def test_micro_batches_of_the_whole_batch_or_more_is_one_batch():
    for size in (4, 10):
        (only,) = micro_batches(_pairs(4), size)
        assert only.chosen_ids[:, 0].tolist() == [0, 1, 2, 3]


def test_in_chunks_concatenates_in_row_order():
    # fn sees chunks of at most 2 rows and returns each row's value doubled: (0, 2, 4, 6, 8)
    seen = []

    def fn(chunk):
        seen.append(len(chunk))
        return chunk.chosen_ids[:, :1] * 2

    out = in_chunks(fn, _pairs(5), 2)
    assert seen == [2, 2, 1]
    assert out.squeeze(1).tolist() == [0, 2, 4, 6, 8]
