"""What the generation role asks of vLLM when it serves LoRA adapters (model.lora.sync=adapter)."""

import pytest

from rlhf_dist.roles.generation import _create, _extensions


class _NoLora:
    """Stands for vLLM's LLM on a model whose vLLM class has no LoRA support (its own message)."""

    def __init__(self, **kwargs):
        if kwargs.get("enable_lora"):
            raise ValueError("FooForCausalLM does not support LoRA yet.")
        self.kwargs = kwargs


def test_an_architecture_vllm_cannot_serve_with_adapters_is_refused_in_one_line():
    adapter = {"r": 8, "lora_alpha": 32.0}
    with pytest.raises(ValueError) as raised:
        _create(_NoLora, adapter, model="m", **_extensions(False, adapter))
    assert str(raised.value) == ("model.lora.sync=adapter: vLLM cannot serve LoRA adapters on this model "
                                 "(FooForCausalLM does not support LoRA yet.); use model.lora.sync=merged")
    assert _create(_NoLora, None, model="m", **_extensions(False, None)).kwargs == {"model": "m"}


def test_the_engine_serves_one_adapter_of_the_smallest_rank_vllm_accepts_through_the_receiver():
    assert _extensions(False, {"r": 12, "lora_alpha": 32.0}) == {
        "worker_extension_cls": "rlhf_dist.weight_sync.adapter.AdapterReceiver", "enable_lora": True,
        "max_loras": 1, "max_lora_rank": 16}
    assert _extensions(True, None)["enable_prefix_caching"] is False  # routing replay (never with adapters)
