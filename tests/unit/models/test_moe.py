"""The mixture-of-experts families: their blocks found for DeepSpeed's ZeRO-3 leaf flag."""

from __future__ import annotations

import pytest
from torch import nn

from rlhf_dist.models.modeling import moe_block_classes
from rlhf_dist.models.tiny import build_random_lm


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


class _OtherBlock(_Block):
    pass


def test_moe_blocks_are_the_modules_holding_experts_each_class_once_in_order():
    model = nn.Sequential(nn.Linear(4, 4), _Block(), _OtherBlock(), _Block())
    # the expert list and the experts in it are not blocks: only the modules with a child "experts"
    assert moe_block_classes(model) == [_Block, _OtherBlock]
    assert moe_block_classes(nn.Sequential(nn.Linear(4, 4), nn.ReLU())) == []


@pytest.mark.parametrize(("family", "block"), [("qwen3-moe", "Qwen3MoeSparseMoeBlock"),
                                               ("olmoe", "OlmoeSparseMoeBlock"), ("llama", None)])
def test_the_tiny_families_blocks(family, block, tiny_policy, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_random_lm(tmp_path / family, family, tiny_policy))
    assert [c.__name__ for c in moe_block_classes(model)] == ([block] if block else [])
    if block:  # 4 experts, 2 per token: each layer's experts are stacked, (experts, 2 x intermediate, hidden)
        config = model.config
        assert (config.num_experts, config.num_experts_per_tok) == (4, 2)
        assert model.model.layers[0].mlp.experts.gate_up_proj.shape[0] == 4
