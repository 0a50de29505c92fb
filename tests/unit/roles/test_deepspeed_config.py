"""The DeepSpeed config a trainer rank builds: precision and accumulation by dtype and ZeRO stage."""

from __future__ import annotations

import pytest

from rlhf_dist.config import TrainerConfig
from rlhf_dist.config.plan import TrainerPlan
from rlhf_dist.roles.zero_rank import deepspeed_config

PLAN = TrainerPlan(per_rank_minibatch=8, grad_accum_steps=4, optimizer_steps=10)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_bf16_adds_micro_batch_gradients_in_fp32_under_zero(stage):
    config = deepspeed_config(TrainerConfig(zero_stage=stage), PLAN, "bfloat16")
    assert config["bf16"] == {"enabled": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    assert config["gradient_accumulation_steps"] == 4 and config["train_micro_batch_size_per_gpu"] == 2


def test_zero0_bf16_and_float32_leave_the_accumulation_dtype_alone():
    zero0 = deepspeed_config(TrainerConfig(zero_stage=0), PLAN, "bfloat16")
    assert zero0["bf16"] == {"enabled": True} and "data_types" not in zero0  # DeepSpeed refuses the mix there
    fp32 = deepspeed_config(TrainerConfig(zero_stage=2), PLAN, "float32")
    assert fp32["bf16"] == {"enabled": False} and "data_types" not in fp32
