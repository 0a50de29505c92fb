"""The vLLM-side load lifecycle every transport's engine goes through.

Each transport's engine (``gloo``, ``nccl``, ``ipc``) is vLLM's own engine (NCCL, CUDA IPC) or ours
(gloo, CPU) with ``CheckpointReload`` in front of it, so the load lifecycle, and its fix for tied
weights, lives in one place for all of them. vLLM is imported inside the methods: they run in the
engine's worker, and this module is imported wherever a transport is.

Why tied weights need a fix: vLLM's layerwise reload runs a layer's
``quant_method.process_weights_after_loading`` only for layers that received a tensor. A model
with ``tie_word_embeddings`` (Llama 3.2, Qwen2.5, Qwen3, Gemma) never receives ``lm_head.weight``
(``load_weights`` skips it; the head shares the embedding's Parameter), so the head is put back
with its parameter updated in place but its processed form untouched. On CPU that processed form
is a packed copy of the weight (``dispatch_cpu_unquantized_gemm``: oneDNN / sgl-kernel), and the
head kept computing logits from the initial embedding after every sync.
"""

from __future__ import annotations

from typing import Any

import torch


def tied_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules with a processing step that hold a Parameter object another module also holds
    (an output head tied to the input embedding), in ``model.modules()`` order."""
    holders: dict[int, list[torch.nn.Module]] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(module)
    tied: dict[int, torch.nn.Module] = {}
    for modules in holders.values():
        if len(modules) > 1:
            tied.update((id(m), m) for m in modules if getattr(m, "quant_method", None) is not None)
    return list(tied.values())


class CheckpointReload:
    """Checkpoint-format (Hugging Face named, full) tensors loaded inside vLLM's layerwise-reload
    lifecycle, then every tied module re-processed from its updated parameter.

    Goes first in the bases, before a ``WeightTransferEngine``: it replaces the engine's
    ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``; a transport changes
    how an update is received in ``receive_update``."""

    model: torch.nn.Module
    model_config: Any

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        # Found before the reload swaps parameters for meta tensors, which breaks the sharing.
        self._tied = tied_modules(self.model)
        # A bare load_weights on a loaded CPU model fails ("'Parameter' object has no attribute
        # 'weight_loader'"): checkpoint-format weights load inside this lifecycle.
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        try:
            self.receive_update(update_info)
        except BaseException:
            # A receive cut short (a peer lost, a timeout) leaves layers half-loaded inside the
            # lifecycle, and vLLM's worker ends the update without finishing it: the next
            # start_weight_update would skip those layers (initialize_layerwise_reload) and
            # process them early with this attempt's tensors, ignoring the rest. Finishing it here
            # puts real tensors back (old weights, new ones, or some of each) until the full sync
            # that follows a recovery replaces them all.
            self.finish_weight_update()
            raise

    def receive_update(self, update_info: dict[str, Any]) -> None:
        """Receive and load one update: by default the engine's own ``update_weights``."""
        super().update_weights(update_info)  # type: ignore[misc]

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        for module in self._tied:
            module.quant_method.process_weights_after_loading(module)
