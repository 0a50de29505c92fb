"""rlhf_dist.core.seeds: every derived seed, computed by hand. These numbers pin the multipliers: a
change here changes the prompts, samples and minibatch orders of every run (see the module)."""

import pytest

from rlhf_dist.core.seeds import (
    ENGINE_SAMPLE,
    EPOCH_ORDER,
    FEEDBACK,
    MINIBATCH_ORDER,
    REVIEW_PROMPTS,
    derive_seed,
    split_index,
)


def test_engine_sample_seed():
    # 1_000_003 * 1 + 65_537 * 2 + 3 = 1_000_003 + 131_074 + 3 = 1_131_080 (< 2**31)
    assert derive_seed(ENGINE_SAMPLE, 1, 2, 3) == 1_131_080
    # 2**31 * 1_000_003 is a multiple of 2**31, so only the index is left
    assert derive_seed(ENGINE_SAMPLE, 2**31, 0, 5) == 5


def test_minibatch_order_seed():
    # 1_000_003 * 2 + 7919 * 3 + 1009 * 4 = 2_000_006 + 23_757 + 4_036 = 2_027_799 (no rank: the
    # order is every rank's; it is the one rank 0 of the earlier per-rank orders had)
    assert derive_seed(MINIBATCH_ORDER, 2, 3, 4) == 2_027_799
    # 2**63 * 1_000_003 is a multiple of 2**63: epoch 1's 1009 is left
    assert derive_seed(MINIBATCH_ORDER, 2**63, 0, 1) == 1009


def test_epoch_order_seed():
    # 7919 * 3 + 2 = 23_759
    assert derive_seed(EPOCH_ORDER, 3, 2) == 23_759


def test_split_seeds():
    assert (split_index("train"), split_index("test")) == (0, 1)
    # reviews: 5 + 1_000_003 * split
    assert derive_seed(REVIEW_PROMPTS, 5, split_index("train")) == 5
    assert derive_seed(REVIEW_PROMPTS, 5, split_index("test")) == 1_000_008
    # feedback: 7919 * 1 + 1_000_003 * 1 + 11 = 1_007_933
    assert derive_seed(FEEDBACK, 1, split_index("test"), 11) == 1_007_933


def test_wrong_coordinates_and_split_are_errors():
    with pytest.raises(TypeError, match=r"\('step', 'index'\)"):
        derive_seed(ENGINE_SAMPLE, 0, 1)
    with pytest.raises(ValueError, match="split='eval'"):
        split_index("eval")
