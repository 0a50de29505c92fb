"""The mixture-of-experts families: their blocks found for DeepSpeed's ZeRO-3 leaf flag; the
routers' load-balancing loss equal to the model's own, packed or padded; routing replay (the
routing the model chooses, replayed, gives its logprobs bit for bit; another routing moves them)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlhf_dist.core.experience import Experience, collate
from rlhf_dist.core.packing import token_layout
from rlhf_dist.models.modeling import load_causal_lm, moe_block_classes, response_logprobs
from rlhf_dist.models.routing import layout_routing, own_routing, router_aux_coef
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


# --- training a mixture of experts: the routers' load-balancing loss and routing replay ---------------------------

def _rows(vocab: int) -> Experience:
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, vocab, (n,), generator=gen).tolist() for n in (9, 3, 14, 6)]
    return collate([r[:3] for r in rows], [r[3:] for r in rows], pad_id=0)


@pytest.fixture(scope="module")
def moe_model(tiny_policy, tmp_path_factory):
    models = {}

    def load(family: str):
        if family not in models:
            path = build_random_lm(tmp_path_factory.mktemp(family) / family, family, tiny_policy)
            models[family] = load_causal_lm(str(path), "float32").eval()
        return models[family]

    return load


@pytest.mark.parametrize("family", ["qwen3-moe", "olmoe"])
def test_replaying_the_routing_the_model_chooses_gives_its_logprobs_exactly(family, moe_model):
    model = moe_model(family)
    exp = _rows(300)
    routing = own_routing(model, exp)
    assert routing.shape == (4, 14, 2, 2)  # rows, columns, layers, k
    with torch.no_grad():
        for packed in (False, True):
            own, _ = response_logprobs(model, exp, 1.0, packed=packed)
            replayed, _ = response_logprobs(model, exp, 1.0, packed=packed, routing=routing)
            assert torch.equal(replayed, own)
            # tokens not recorded (-1) keep the routers' choice: here the whole prompt
            partial = routing.clone()
            partial[:, : exp.prompt_width] = -1
            assert torch.equal(response_logprobs(model, exp, 1.0, packed=packed, routing=partial)[0], own)
        # every token sent to the next two experts instead: the logprobs move; the next forward pass
        # without routing is the routers' own again (the routing is kept only until then)
        own, _ = response_logprobs(model, exp, 1.0)
        other, _ = response_logprobs(model, exp, 1.0, routing=(routing + 1) % 4)
        assert torch.equal(response_logprobs(model, exp, 1.0)[0], own)
    assert (other - own).abs().max() > 1e-3


def test_the_replay_counts_the_routings_it_changed_once_per_forward_pass(moe_model):
    model = moe_model("qwen3-moe")
    exp = _rows(300)
    routing = own_routing(model, exp)
    real = int(exp.attention_mask.sum()) * 2  # recorded (token, layer) routings: real tokens x 2 layers
    replay = model.routing_replay
    replay.take_counts()
    with torch.no_grad():
        response_logprobs(model, exp, 1.0, routing=routing.flip(-1))  # the same experts, in another order
        assert replay.take_counts() == (real, 0)
        moved = routing.clone()
        moved[0] = (moved[0] + 1) % 4  # row 0's tokens (9 real) to two other experts, in both layers
        response_logprobs(model, exp, 1.0, packed=True, routing=moved)
        assert replay.take_counts() == (real, 9 * 2)
        unrecorded = routing.clone()
        unrecorded[:, : exp.prompt_width] = -1  # prompts not recorded: not given, not counted
        response_logprobs(model, exp, 1.0, routing=unrecorded)
        assert replay.take_counts() == (real - 3 * 4 * 2, 0)
        response_logprobs(model, exp, 1.0)  # the routers' own choice: nothing given
        assert replay.take_counts() == (0, 0)


def test_replayed_routing_trains_the_router_through_its_weights(moe_model):
    model = moe_model("qwen3-moe")
    exp = _rows(300)
    routing = (own_routing(model, exp) + 1) % 4
    model.zero_grad()
    logprobs, _ = response_logprobs(model, exp, 1.0, routing=routing)
    logprobs.sum().backward()
    assert model.model.layers[0].mlp.gate.weight.grad.abs().max() > 0
    model.zero_grad()


def test_layout_routing_puts_each_tokens_experts_where_the_layout_put_the_token():
    # rows as _three_rows of test_packing: ids [[5, 6, 1, 2, 3], [0, 7, 4, 0, 0], [8, 9, 0, 0, 0]]
    exp = collate([[5, 6], [7], [8, 9]], [[1, 2, 3], [4], []], pad_id=0)
    routing = exp.input_ids[:, :, None, None].expand(3, 5, 1, 2).clone()  # each token "routed" to its own id
    routing[exp.attention_mask == 0] = -1
    for packed in (False, True):
        layout = token_layout(exp.input_ids, exp.attention_mask, exp.position_ids, exp.prompt_width, packed)
        laid = layout_routing(layout, routing, exp.attention_mask)
        flat = layout.input_ids.flatten()
        real = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, layout.tokens, True)
        assert torch.equal(laid[real, 0, 0], flat[real])  # a real token's experts came with it
        assert (laid[~real] == -1).all()  # padding and dummy sequences: the routers choose
        assert int(real.sum()) == int(exp.attention_mask.sum()) == 10  # the empty response is one real pad token


@pytest.mark.parametrize("family", ["qwen3-moe", "olmoe"])
def test_the_load_balancing_loss_is_the_models_own_packed_or_padded(family, moe_model):
    model = moe_model(family)
    exp = _rows(300)
    with torch.no_grad():
        expected = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=exp.position_ids,
                         output_router_logits=True, use_cache=False).aux_loss
        for packed, chunk in ((False, 0), (True, 0), (True, 5)):
            _, _, aux = response_logprobs(model, exp, 1.0, True, packed=packed, chunk_tokens=chunk, router_aux=True)
            torch.testing.assert_close(aux, expected, atol=1e-6, rtol=0)
    assert 2.0 <= expected <= 4.0  # k = 2 (balanced) to E = 4 (all on two experts)


def test_a_dense_model_has_no_routing_to_replay_or_balance(tiny_policy):
    model = load_causal_lm(tiny_policy, "float32")
    exp = _rows(300)
    with pytest.raises(ValueError, match="has no mixture-of-experts routers"):
        response_logprobs(model, exp, 1.0, router_aux=True)


def test_the_aux_coefficient_is_the_models_where_its_config_asks_for_the_loss():
    from transformers import LlamaConfig, Qwen3MoeConfig

    released = Qwen3MoeConfig(router_aux_loss_coef=0.001)  # Qwen3-30B-A3B's: output_router_logits false
    assert router_aux_coef(released, None) == 0.0
    assert router_aux_coef(Qwen3MoeConfig(router_aux_loss_coef=0.001, output_router_logits=True), None) == 0.001
    assert router_aux_coef(released, 0.02) == 0.02
    assert router_aux_coef(LlamaConfig(), None) == 0.0
