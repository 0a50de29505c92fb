"""LoRA on the policy (rlhf_dist.models.lora, model.lora): the config's checks, the reference for free,
and what the engines receive from a model with adapters, against hand-computed numbers."""

import pytest
import torch
from torch import nn

from rlhf_dist.config import Config, ConfigError, LoraConfig, actor_counts, lora_summary, supervised_plan
from rlhf_dist.config import validate_config as validate
from rlhf_dist.models.lora import (
    PEFT_PREFIX,
    adapter_exports,
    adapter_parameters,
    add_adapters,
    engine_name,
    is_adapter_tensor,
    linear_names,
    merged_exports,
)


class TwoLayers(nn.Module):
    """Stands for a decoder block: a projection with a bias, one without, and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(3, 2, bias=True)
        self.down_proj = nn.Linear(2, 2, bias=False)
        self.norm = nn.LayerNorm(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.q_proj(self.norm(x)))


def adapted(rank: int = 1, alpha: float = 2.0, targets: str = "q_proj") -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    model = TwoLayers()
    return model, add_adapters(model, LoraConfig(rank=rank, alpha=alpha, target_modules=targets))


def test_engine_names_drop_the_base_layer_part_and_skip_the_adapters_own_tensors():
    assert engine_name("model.layers.0.self_attn.q_proj.base_layer.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert engine_name("model.layers.0.mlp.gate_up_proj.base_layer.bias") == "model.layers.0.mlp.gate_up_proj.bias"
    assert engine_name("model.norm.weight") == "model.norm.weight"
    assert is_adapter_tensor("model.layers.0.self_attn.q_proj.lora_A.default.weight")
    assert is_adapter_tensor("model.layers.0.self_attn.qkv_proj.lora_B.default.weight")
    assert not is_adapter_tensor("model.layers.0.self_attn.q_proj.base_layer.weight")


def test_the_engines_receive_the_base_weight_plus_the_scaled_adapter_product():
    # rank 1, alpha 2: scaling = alpha / rank = 2. W = [[1, 2, 3], [4, 5, 6]], A = [[1, 0, -1]], B = [[1], [2]]
    #   B @ A = [[1, 0, -1], [2, 0, -2]];  W + 2 * B @ A = [[3, 2, 1], [8, 5, 2]]
    model, _ = adapted()
    with torch.no_grad():
        model.q_proj.base_layer.weight.copy_(torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
        model.q_proj.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0, -1]]))
        model.q_proj.lora_B["default"].weight.copy_(torch.tensor([[1.0], [2.0]]))
    exports = {name: value() for name, _, value in merged_exports(model)}
    assert list(exports) == ["q_proj.weight", "q_proj.bias", "down_proj.weight", "norm.weight", "norm.bias"]
    assert torch.equal(exports["q_proj.weight"], torch.tensor([[3.0, 2, 1], [8, 5, 2]]))
    assert torch.equal(exports["q_proj.bias"], model.q_proj.base_layer.bias)
    # The merged weights compute what the adapted model computes.
    plain = TwoLayers()
    plain.load_state_dict(exports)
    x = torch.randn(4, 3)
    torch.testing.assert_close(plain(x), model(x))
    # The merged weight is computed from the base weight and both adapter matrices (gathered together).
    (_, params, _), *_ = merged_exports(model)
    assert [p.shape for p in params] == [(2, 3), (1, 3), (2, 1)]


def test_an_adapter_sync_sends_the_adapters_alone_under_the_names_peft_saves():
    model, peft = adapted(targets="q_proj,down_proj")
    exports = adapter_exports(model)
    assert [name for name, _, _ in exports] == [
        "base_model.model.q_proj.lora_A.weight", "base_model.model.q_proj.lora_B.weight",
        "base_model.model.down_proj.lora_A.weight", "base_model.model.down_proj.lora_B.weight"]
    assert all(value().data_ptr() == params[0].data_ptr() for _, params, value in exports)  # the tensors themselves
    # the names of peft's own adapter file, which vLLM's loader reads
    from peft import get_peft_model_state_dict

    assert [name for name, _, _ in exports] == list(get_peft_model_state_dict(peft))


def test_the_engines_are_asked_for_the_smallest_rank_vllm_accepts():
    from rlhf_dist.weight_sync.adapter import max_lora_rank

    assert [max_lora_rank(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(ValueError, match="^model.lora.rank=513: vLLM serves adapters of rank <= 512$"):
        max_lora_rank(513)


def test_only_the_adapters_train_and_disabling_them_gives_the_base_model():
    model, peft = adapted(rank=2, targets="all-linear")
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trained == ["q_proj.lora_A.default.weight", "q_proj.lora_B.default.weight",
                       "down_proj.lora_A.default.weight", "down_proj.lora_B.default.weight"]
    assert [name for name, _ in adapter_parameters(model)] == [PEFT_PREFIX + n for n in trained]
    with torch.no_grad():
        model.q_proj.lora_B["default"].weight.fill_(0.5)  # peft starts B at 0: make the adapter matter
    base = TwoLayers()
    base.load_state_dict({engine_name(n): p for n, p in model.state_dict().items() if not is_adapter_tensor(n)})
    x = torch.randn(4, 3)
    assert not torch.allclose(model(x), base(x))
    with peft.disable_adapter():
        torch.testing.assert_close(model(x), base(x))
    assert not torch.allclose(model(x), base(x))  # enabled again


def test_a_target_that_names_no_linear_layer_is_refused_listing_those_that_exist():
    assert linear_names(TwoLayers()) == ["down_proj", "q_proj"]
    with pytest.raises(ValueError, match=r"^model.lora.target_modules='q_proj,gate_proj': gate_proj names no linear "
                                         r"layer of TwoLayers; its linear layers: down_proj, q_proj$"):
        adapted(targets="q_proj,gate_proj")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("rank", -1, "model.lora.rank=-1: must be >= 0"),
    ("alpha", 0.0, "model.lora.alpha=0.0: must be > 0"),
    ("dropout", 1.0, r"model.lora.dropout=1.0: must be in \[0, 1\)"),
    ("target_modules", "q_proj,", "model.lora.target_modules='q_proj,': use all-linear or comma-separated"),
    ("sync", "files", "model.lora.sync='files': use one of adapter, merged"),
    ("rank", 1024, "model.lora.rank=1024: vLLM serves adapters of rank <= 512; use model.lora.sync=merged"),
])
def test_bad_lora_values_fail_in_one_line_naming_the_key(key, value, message):
    cfg = Config()
    cfg.model.lora.rank = 8
    setattr(cfg.model.lora, key, value)
    with pytest.raises(ConfigError, match=f"^{message}"):
        validate(cfg)


def test_a_lora_run_takes_its_reference_from_the_policy_ranks_unless_reference_path_is_set():
    cfg = Config()
    assert actor_counts(cfg)["reference"] == 1 and lora_summary(cfg) == ""
    cfg.model.lora.rank = 8
    validate(cfg)
    assert "reference" not in actor_counts(cfg)
    assert lora_summary(cfg) == (
        "rlhf_dist: LoRA rank 8 (alpha 32, target_modules all-linear), each sync sends the engines the adapters "
        "alone (they keep the base); the KL reference is the policy with its adapters disabled (no reference actor)")
    cfg.model.lora.sync = "merged"
    assert "each sync sends the engines full weights, the adapters merged;" in lora_summary(cfg)
    cfg.reference.path = "/some/other/model"
    assert actor_counts(cfg)["reference"] == 1
    assert lora_summary(cfg).endswith("the KL reference is reference.path='/some/other/model' on reference actors")


def test_a_critic_with_lora_trains_its_adapters_and_its_whole_value_head():
    from transformers import LlamaConfig, LlamaModel

    from rlhf_dist.models.modeling import CriticModel

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    critic = CriticModel(LlamaModel(config), 16)
    add_adapters(critic.backbone, LoraConfig(rank=2), key="model.critic_lora")
    trained = {name for name, p in critic.named_parameters() if p.requires_grad}
    head = {"value_head.weight", "value_head.bias"}
    assert head <= trained and all(is_adapter_tensor(name) for name in trained - head)
    adapted = {name.split(".lora_")[0].rsplit(".", 1)[1] for name in trained - head}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with pytest.raises(ValueError, match=r"^model.critic_lora.target_modules='score': score names no linear layer "):
        add_adapters(CriticModel(LlamaModel(config), 16).backbone, LoraConfig(rank=2, target_modules="score"),
                     key="model.critic_lora")
    cfg = Config()
    cfg.model.critic_lora.rank = 4
    validate(cfg)
    assert lora_summary(cfg) == ("rlhf_dist: the policy trains every weight; the critic: LoRA rank 4 (alpha 32, "
                                 "target_modules all-linear) on its backbone, its value head trained in full")
    cfg.model.critic_lora.rank = -1
    with pytest.raises(ConfigError, match=r"^model.critic_lora.rank=-1: must be >= 0"):
        validate(cfg)


def test_the_supervised_stages_refuse_lora():
    cfg = Config()
    cfg.model.lora.rank = 4
    with pytest.raises(ConfigError, match="^model.lora.rank=4: LoRA trains the PPO policy only; the sft stage"):
        supervised_plan(cfg, "sft")


def test_a_checkpoint_resumes_only_with_its_own_adapters():
    from rlhf_dist.checkpoint import CheckpointError, config_changes
    from rlhf_dist.config import as_dict

    saved = Config()
    saved.model.lora.rank = 8
    for key, value in (("rank", 0), ("rank", 16), ("target_modules", "q_proj,v_proj")):
        resumed = Config()
        resumed.model.lora.rank = 8
        setattr(resumed.model.lora, key, value)
        with pytest.raises(CheckpointError, match=f"^model.lora.{key}="):
            config_changes(as_dict(saved), as_dict(resumed))
    resumed = Config()
    resumed.model.lora.rank, resumed.model.lora.alpha = 8, 16.0  # the same tensors: resumed, with a warning
    assert config_changes(as_dict(saved), as_dict(resumed)) == ["model.lora.alpha: 32.0 -> 16.0"]
