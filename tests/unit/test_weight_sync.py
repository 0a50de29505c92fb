"""rlhf_dist.weight_sync: the payloads sent to the engines (update and init info, merged IPC handles).
The verification probe and gap measure are tested in test_weight_verification.py."""

from __future__ import annotations

import pytest

from rlhf_dist.weight_sync import ParamSpec, engine_init_info, merge_ipc_handles, update_info


def test_weight_sync_payloads():
    specs = [ParamSpec("model.embed_tokens.weight", "float32", (512, 128)), ParamSpec("lm_head.weight", "bfloat16", (512, 128))]
    assert update_info(specs) == {
        "names": ["model.embed_tokens.weight", "lm_head.weight"],
        "dtype_names": ["float32", "bfloat16"],
        "shapes": [[512, 128], [512, 128]],
    }
    gloo = engine_init_info("gloo", "127.0.0.1", 1234, 3, 5, 60.0)
    assert gloo == {"master_address": "127.0.0.1", "master_port": 1234, "rank_offset": 3, "world_size": 5, "timeout_s": 60.0}
    nccl = engine_init_info("nccl", "127.0.0.1", 1234, 3, 5, 60.0)
    assert nccl["packed"] is False and "timeout_s" not in nccl
    assert engine_init_info("ipc", "127.0.0.1", 1234, 3, 5, 60.0) == {"packed": False}


def test_merge_ipc_handles_gives_every_gpu_its_handle_per_parameter():
    rank0 = [{"GPU-a": ("embed", 0)}, {"GPU-a": ("head", 0)}]
    rank1 = [{"GPU-b": ("embed", 1)}, {"GPU-b": ("head", 1)}]
    assert merge_ipc_handles([rank0, rank1]) == [
        {"GPU-a": ("embed", 0), "GPU-b": ("embed", 1)},
        {"GPU-a": ("head", 0), "GPU-b": ("head", 1)},
    ]
    with pytest.raises(ValueError, match=r"different parameter counts: \[2, 1\]"):
        merge_ipc_handles([rank0, rank1[:1]])
