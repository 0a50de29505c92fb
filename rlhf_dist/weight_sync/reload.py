"""The vLLM-side load lifecycle every transport's engine goes through.

Each transport's engine (``gloo``, ``nccl``, ``ipc``) is vLLM's own engine (NCCL, CUDA IPC) or ours
(gloo, CPU) with ``CheckpointReload`` in front of it, so the load lifecycle, and its fixes for tied
weights and fused experts, live in one place for all of them. vLLM is imported inside the methods:
they run in the engine's worker, and this module is imported wherever a transport is.

Why tied weights need a fix: vLLM's layerwise reload runs a layer's
``quant_method.process_weights_after_loading`` only for layers that received a tensor. A model
with ``tie_word_embeddings`` (Llama 3.2, Qwen2.5, Qwen3, Gemma) never receives ``lm_head.weight``
(``load_weights`` skips it; the head shares the embedding's Parameter), so the head is put back
with its parameter updated in place but its processed form untouched. On CPU that processed form
is a packed copy of the weight (``dispatch_cpu_unquantized_gemm``: oneDNN / sgl-kernel), and the
head kept computing logits from the initial embedding after every sync.

Why fused experts need a fix (vLLM 0.32): a MoE layer's experts are one ``RoutedExperts`` module
whose ``load_weights`` fills its fused ``w13_weight`` / ``w2_weight`` from per-expert or stacked
tensors. The layerwise reload processes it like any layer once all of it has arrived
(``reload/layerwise.py``, ``_layerwise_process``): ``UnquantizedFusedMoEMethod``'s
``process_weights_after_loading`` on the new, checkpoint-layout tensors, then the result copied
into the tensors the kernel reads (``_copy_and_restore_kernel_tensors``). But that method, finding
its kernel built (``_setup_kernel``: ``is_weight_update``), skips the kernel's own step,
``moe_kernel.fused_experts.process_weights_after_loading``, which on CPU prepacks the weights for
``cpu_fused_moe`` (``experts/cpu_moe.py``, ``CPUUnquantizedExperts``: ``cpu_prepack_moe_weight``;
the Triton experts' step on GPU does nothing). The experts then served the new weights in
checkpoint layout read as prepacked ones: logprob gap 0.02 on the tiny Qwen3-MoE after the first
sync. So that step runs here after the reload, into the served tensors (it registers new ones), and
only on layers that took weights in this update: one that took none got its prepacked tensors back,
and prepacking is not idempotent.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class IncompleteUpdate(RuntimeError):
    """A full weight update left some of the engine's layers without any new weight."""


def unloaded_layers(model: torch.nn.Module, tied: list[torch.nn.Module]) -> list[str]:
    """Names of the layers a full update gave no weight (read before the reload is finalised): each
    has parameters of its own and loaded none, and is neither an output head tied to the embedding
    (it never receives one) nor an attention layer (its scales are not the checkpoint's); a layer
    of buffers only (a rotary embedding's cos/sin cache) is never sent. vLLM's reload puts such a
    layer's previous weights back with a log line, so a tensor dropped on the way would leave the
    engine serving a policy the trainer no longer has, by an amount that rounding in bfloat16 can
    hide from the logprob probe; this check is exact."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    tied_ids = {id(m) for m in tied}
    missed = []
    for name, module in model.named_modules():
        info = get_layerwise_info(module)
        if (info.can_load() and info.load_numel_total and info.load_numel == 0 and id(module) not in tied_ids
                and any(p is not None for p in module._parameters.values())  # not buffers alone
                and not is_deferred_attention_layer(module)):
            missed.append(name)
    return missed


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


def process_in_place(layer: torch.nn.Module, process: Callable[[torch.nn.Module], None]) -> None:
    """Run ``process`` on ``layer``, then copy each parameter it replaced back into the Parameter it
    replaced, and put that one back: whatever holds the layer's tensors (a compiled graph, a CUDA
    graph, vLLM's kernel tensors of the next reload) keeps reading them. A parameter whose shape or
    dtype it changed is an error, not a silent broadcast."""
    kept = dict(layer.named_parameters(recurse=False))
    process(layer)
    for name, param in kept.items():
        new = getattr(layer, name)
        if new is param:
            continue
        if new.shape != param.shape or new.dtype != param.dtype:
            raise RuntimeError(f"{type(layer).__name__}.{name}: processing made {tuple(new.shape)} {new.dtype} of "
                               f"{tuple(param.shape)} {param.dtype}; it cannot be copied into the served tensor")
        param.data.copy_(new.data)
        setattr(layer, name, param)


def fused_expert_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """vLLM's fused-MoE layers whose unquantized method has built its kernel: those whose reload
    skips the kernel's own processing step (see the module docstring)."""
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    return [m for m in model.modules()
            if isinstance(getattr(m, "quant_method", None), UnquantizedFusedMoEMethod)
            and m.quant_method.moe_kernel is not None]


class CheckpointReload:
    """Checkpoint-format (Hugging Face named, full) tensors loaded inside vLLM's layerwise-reload
    lifecycle, then every tied module re-processed from its updated parameter and every reloaded
    fused-MoE layer given its kernel's processing step.

    Goes first in the bases, before a ``WeightTransferEngine``: it replaces the engine's
    ``start_weight_update`` / ``update_weights`` / ``finish_weight_update``; a transport changes
    how an update is received in ``receive_update``."""

    model: torch.nn.Module
    model_config: Any

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        # Found before the reload swaps parameters for meta tensors, which breaks the sharing.
        self._tied = tied_modules(self.model)
        self._experts = fused_expert_layers(self.model)
        # A bare load_weights on a loaded CPU model fails ("'Parameter' object has no attribute
        # 'weight_loader'"): checkpoint-format weights load inside this lifecycle.
        initialize_layerwise_reload(self.model)
        self._expected = len(unloaded_layers(self.model, self._tied))  # nothing is loaded yet: every layer

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
            self._finalize()
            raise

    def receive_update(self, update_info: dict[str, Any]) -> None:
        """Receive and load one update: by default the engine's own ``update_weights``."""
        super().update_weights(update_info)  # type: ignore[misc]

    def finish_weight_update(self) -> None:
        """End the update; raises ``IncompleteUpdate`` if some layers received weights and others none
        (``unloaded_layers``). An update that received nothing at all (one started, then given up
        when a peer was lost: ``Generation.shutdown_weight_transfer``) ends on the weights it had."""
        missed = self._finalize()
        if missed and len(missed) < self._expected:
            raise IncompleteUpdate(
                f"the engine received no weights for {len(missed)} of its layers in this update "
                f"({', '.join(missed[:3])}{', ...' if len(missed) > 3 else ''}): they still serve the "
                "previous weights; a tensor the trainer sent under a name this model's load_weights "
                "does not map, or one it did not send")

    def _finalize(self) -> list[str]:
        """Finish the reload (every layer back to real tensors); the layers that received nothing."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

        # Read before finalize resets it: a layer processed while loading has no tracking left
        # (can_load() False), one that took part of its weights is processed by finalize; one
        # that took none gets its prepacked tensors back, to be left as they are.
        reloaded = [m for m in self._experts
                    if not get_layerwise_info(m).can_load() or get_layerwise_info(m).load_numel > 0]
        missed = unloaded_layers(self.model, self._tied)
        finalize_layerwise_reload(self.model, self.model_config)
        for module in self._tied:
            module.quant_method.process_weights_after_loading(module)
        for module in reloaded:
            process_in_place(module, module.quant_method.moe_kernel.fused_experts.process_weights_after_loading)
        return missed
