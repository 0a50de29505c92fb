"""rlhf_dist.weight_sync: the payloads sent to the engines (update and init info, merged IPC handles).
The verification probe and gap measure are tested in test_weight_verification.py."""

from __future__ import annotations

import pytest

from rlhf_dist.weight_sync import ParamSpec, bucket_bounds, engine_init_info, merge_ipc_handles, update_info


def test_weight_sync_payloads():
    specs = [ParamSpec("model.embed_tokens.weight", "float32", (512, 128)), ParamSpec("lm_head.weight", "bfloat16", (512, 128))]
    assert [s.nbytes for s in specs] == [512 * 128 * 4, 512 * 128 * 2]
    expected = {
        "names": ["model.embed_tokens.weight", "lm_head.weight"],
        "dtype_names": ["float32", "bfloat16"],
        "shapes": [[512, 128], [512, 128]],
    }
    assert update_info(specs, "nccl", 2**20) == expected
    assert update_info(specs, "gloo", 2**20) == {**expected, "bucket_bytes": 2**20}
    gloo = engine_init_info("gloo", "127.0.0.1", 1234, 3, 5, 60.0, 2**20)
    assert gloo == {"master_address": "127.0.0.1", "master_port": 1234, "rank_offset": 3, "world_size": 5, "timeout_s": 60.0}
    nccl = engine_init_info("nccl", "127.0.0.1", 1234, 3, 5, 60.0, 0)
    assert nccl["packed"] is False and "timeout_s" not in nccl
    packed = engine_init_info("nccl", "127.0.0.1", 1234, 3, 5, 60.0, 2**20)
    assert packed["packed"] is True and packed["packed_buffer_size_bytes"] == 2**20
    assert engine_init_info("ipc", "127.0.0.1", 1234, 3, 5, 60.0, 2**20) == {"packed": False}


def test_bucket_bounds_group_consecutive_tensors_up_to_the_bucket_size():
    # sizes 4, 4, 3, 9, 1, 1 in buckets of 8: 4 + 4 = 8 fits; 3 alone would fit with 9? no (12): [3];
    # 9 is larger than a bucket: alone; 1 + 1
    assert bucket_bounds([4, 4, 3, 9, 1, 1], 8) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert bucket_bounds([4, 4, 3], 0) == [(0, 1), (1, 2), (2, 3)]  # 0: one tensor each
    assert bucket_bounds([4, 4, 3], 100) == [(0, 3)]
    assert bucket_bounds([], 8) == []


def test_merge_ipc_handles_gives_every_gpu_its_handle_per_parameter():
    rank0 = [{"GPU-a": ("embed", 0)}, {"GPU-a": ("head", 0)}]
    rank1 = [{"GPU-b": ("embed", 1)}, {"GPU-b": ("head", 1)}]
    assert merge_ipc_handles([rank0, rank1]) == [
        {"GPU-a": ("embed", 0), "GPU-b": ("embed", 1)},
        {"GPU-a": ("head", 0), "GPU-b": ("head", 1)},
    ]
    with pytest.raises(ValueError, match=r"different parameter counts: \[2, 1\]"):
        merge_ipc_handles([rank0, rank1[:1]])
