"""Adapter-only weight sync (``model.lora.sync=adapter``): the engines keep the base weights they
loaded at start and receive only the LoRA adapters' tensors at each sync, through the same transport
(and buckets) as full weights, loaded in memory as a new adapter of vLLM's LoRA manager: no files.

``AdapterReceiver`` is a vLLM worker extension (``worker_extension_cls``): ``receive_adapter`` runs
the transport's own receive (``receive_weights``) into a stand-in model that keeps what it is given,
instead of the served model; ``load_adapter`` turns those tensors into vLLM's ``LoRAModel`` as its
``_load_adapter`` does from a directory, replaces the previous version with it and activates it.
Requests name it with a ``LoRARequest`` of the same id (``adapter_request``), whose path is never read.
"""

from __future__ import annotations

from typing import Any

import torch

ADAPTER_PATH = "rlhf_dist://in-memory"  # a LoRARequest needs a path; an adapter loaded here never reads it
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values (config/lora.py)


def max_lora_rank(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds adapters of ``rank``."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"model.lora.rank={rank}: vLLM serves adapters of rank <= {VLLM_LORA_RANKS[-1]}")


def adapter_request(version: int):
    """The ``LoRARequest`` naming the adapter of policy ``version`` (ids start at 1)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"policy-v{version}", version + 1, ADAPTER_PATH)


class _Kept:
    """A stand-in for the served model during an adapter receive: ``load_weights`` keeps copies of the
    tensors (a transport's receive buffers are reused by the next sync)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def load_weights(self, weights) -> set[str]:
        for name, tensor in weights:
            self.tensors[name] = tensor.detach().to("cpu", copy=True)
        return set(self.tensors)


class AdapterReceiver:
    """Methods of vLLM's worker (a worker extension, called through ``collective_rpc``)."""

    weight_transfer_engine: Any
    model_runner: Any

    def receive_adapter(self, update_info: dict[str, Any]) -> int:
        """Receive one sync's adapter tensors with the transport's own ``receive_weights``; returns how many."""
        engine = self.weight_transfer_engine
        kept = _Kept()
        engine.set_weight_update_target(kept, engine.model_config)
        try:
            engine.receive_weights(engine.parse_update_info(update_info))
        finally:
            engine.reset_weight_update_target()
        self._received_adapter = kept.tensors
        return len(kept.tensors)

    def unknown_adapter_layers(self, names: list[str]) -> list[str]:
        """The layers that adapter tensors ``names`` (peft's names, as a sync sends them) would adapt and
        this engine cannot: a check at start, before any sync."""
        from vllm.lora.utils import parse_fine_tuned_lora_name

        manager = self.model_runner.lora_manager._adapter_manager
        mapper = getattr(manager.model, "hf_to_vllm_mapper", None)
        layers = {parse_fine_tuned_lora_name(name, mapper and mapper.get_rename_mapper())[0] for name in names}
        return sorted(layers - _adaptable(manager))

    def load_adapter(self, adapter_id: int, peft_config: dict[str, Any]) -> int:
        """The received tensors as adapter ``adapter_id``, in place of every earlier one, active; returns
        the number of layers it adapts. Raises if a received tensor names no layer vLLM can adapt."""
        from vllm.lora.peft_helper import PEFTHelper

        tensors, self._received_adapter = getattr(self, "_received_adapter", {}), {}
        if not tensors:  # an update started and given up (a peer lost): the adapter served stays
            return 0
        workers = self.model_runner.lora_manager
        manager = workers._adapter_manager
        targets = sorted({name.split(".")[-3] for name in tensors})  # <layer>.<target>.lora_A.weight
        helper = PEFTHelper.from_dict({**peft_config, "target_modules": targets,
                                       "vllm_max_position_embeddings": workers.max_position_embeddings})
        helper.validate_legal(workers.lora_config)
        model = manager.model
        mapper = getattr(model, "hf_to_vllm_mapper", None)
        lora = workers._lora_model_cls.from_lora_tensors(
            adapter_id, tensors, helper, device="cpu", dtype=workers.lora_config.lora_dtype,
            model_vocab_size=workers.vocab_size, weights_mapper=mapper and mapper.get_rename_mapper(),
            skip_prefixes=getattr(model, "lora_skip_prefixes", None),
        )
        if unknown := sorted(set(lora.loras) - _adaptable(manager)):
            raise ValueError(cannot_adapt(unknown))
        for old in list(manager.list_adapters()):
            manager.remove_adapter(old)
        manager.add_adapter(lora)
        manager.activate_adapter(adapter_id)
        return len(lora.loras)


def cannot_adapt(layers: list[str]) -> str:
    return (f"adapter tensors for {len(layers)} layers this engine cannot adapt ({', '.join(layers[:3])}"
            f"{', ...' if len(layers) > 3 else ''}); use model.lora.sync=merged")


def _adaptable(manager) -> set[str]:
    """The module names ``manager`` serves adapters for, a fused layer's by its parts' names (q_proj,
    k_proj, v_proj for qkv_proj), as adapter tensors name them."""
    return set(manager.modules).union(*manager.packed_modules.values())
