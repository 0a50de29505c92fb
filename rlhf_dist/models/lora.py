"""Low-rank adapters (LoRA) on a policy, through peft: adding them in place, and what the engines and
the exported model receive from a model that has them.

The adapters are injected into the transformers model itself (peft's layers replace the targeted
``nn.Linear`` modules), so the model keeps its forward (``modeling.enable_token_outputs``), its
parameter names gain ``.base_layer`` and ``.lora_A/B.default`` parts, and only the adapters
require gradients. The engines serve plain weights: each adapted layer's base weight plus its
adapter's product (``merged_weight``), under the layer's own name (``engine_name``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # only its fields are read: the GPU checks run this module without hydra installed
    from rlhf_dist.config import LoraConfig

ADAPTER = "default"  # peft's name for a model's one adapter
PEFT_PREFIX = "base_model.model."  # what peft's PeftModel puts before the transformers model's names
_ADAPTER_TENSOR = re.compile(r"\.lora_[A-Za-z_]+\.")  # lora_A, lora_B, lora_embedding_A, lora_magnitude_vector


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last components of ``model``'s linear layers' names (what target_modules matches)."""
    return sorted({name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def add_adapters(model: nn.Module, lora: LoraConfig, key: str = "model.lora"):
    """Inject ``lora``'s adapters into ``model`` in place (every other parameter of it frozen); returns
    peft's ``PeftModel`` around it (its ``disable_adapter()`` and ``save_pretrained``). A listed target
    that names no linear layer is refused in one line (naming the config ``key``) listing those that exist."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    if isinstance(lora.targets, list):
        existing = linear_names(model)
        if missing := [t for t in lora.targets if t not in existing]:
            raise ValueError(f"{key}.target_modules={lora.target_modules!r}: {', '.join(missing)} names no "
                             f"linear layer of {type(model).__name__}; its linear layers: {', '.join(existing)}")
    config = PeftLoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                            target_modules=lora.targets, bias="none")
    return get_peft_model(model, config)


def is_adapter_tensor(name: str) -> bool:
    """Whether parameter ``name`` of a model with adapters is an adapter's own (lora_A, lora_B, ...)."""
    return bool(_ADAPTER_TENSOR.search(name))


def engine_name(name: str) -> str:
    """The name under which the engines know parameter ``name`` of a model with adapters: an adapted
    layer's base weight or bias under its layer's own name (``x.q_proj.base_layer.weight`` ->
    ``x.q_proj.weight``); every other name unchanged."""
    return name.replace(".base_layer.", ".")


def merged_weight(layer: nn.Module) -> torch.Tensor:
    """An adapted layer's base weight plus its adapter's product (scaling * B @ A), added in float32 and
    returned in the base weight's dtype: the weight that computes what the layer computes."""
    base = layer.get_base_layer().weight
    return (base.data.float() + layer.get_delta_weight(ADAPTER).float()).to(base.dtype)


def merged_exports(model: nn.Module) -> list[tuple[str, tuple[nn.Parameter, ...], Callable[[], torch.Tensor]]]:
    """What the engines receive from ``model`` (with adapters), in ``named_parameters`` order: (engine
    name, the parameters its value is computed from, the first giving its shape and dtype, and a
    function computing it from them). Under ZeRO-3 the caller gathers those parameters around the call."""
    from peft.tuners.lora import LoraLayer

    layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    exports = []
    for name, p in model.named_parameters():
        if is_adapter_tensor(name):
            continue
        owner, _, leaf = name.rpartition(".base_layer.")
        layer = layers.get(owner) if leaf == "weight" else None
        if layer is None:
            exports.append((engine_name(name), (p,), lambda p=p: p.data))
        else:
            adapter = (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)
            exports.append((engine_name(name), (p, *adapter), lambda layer=layer: merged_weight(layer)))
    return exports


def adapter_exports(model: nn.Module) -> list[tuple[str, tuple[nn.Parameter, ...], Callable[[], torch.Tensor]]]:
    """What the engines receive from ``model`` with ``model.lora.sync=adapter``, as ``merged_exports``:
    each adapter's own tensors, named as peft saves them (``base_model.model.<layer>.lora_A.weight``),
    which is what vLLM's LoRA loader reads."""
    return [(PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."), (p,), lambda p=p: p.data)
            for name, p in model.named_parameters() if is_adapter_tensor(name)]


def adapter_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapters' own parameters of ``model``, named as peft's ``PeftModel`` names them."""
    return [(PEFT_PREFIX + name, p) for name, p in model.named_parameters() if is_adapter_tensor(name)]
