"""vLLM worker-side weight-transfer engines: every transport loads through one reload lifecycle.

Loaded lazily by vLLM's ``WeightTransferEngineFactory`` inside the engine's worker process once
``rlhf_dist.weight_sync.register_vllm_plugin`` has registered them. Each transport is vLLM's own
engine (NCCL, CUDA IPC) or ours (gloo, CPU) with ``CheckpointReload`` in front of it, so the
load lifecycle, and its fix for tied weights, lives in one place for all of them.

Why tied weights need a fix: vLLM's layerwise reload runs a layer's
``quant_method.process_weights_after_loading`` only for layers that received a tensor. A model
with ``tie_word_embeddings`` (Llama 3.2, Qwen2.5, Qwen3, Gemma) never receives ``lm_head.weight``
(``load_weights`` skips it; the head shares the embedding's Parameter), so the head is put back
with its parameter updated in place but its processed form untouched. On CPU that processed form
is a packed copy of the weight (``dispatch_cpu_unquantized_gemm``: oneDNN / sgl-kernel), and the
head kept computing logits from the initial embedding after every sync.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from vllm.distributed.utils import (
    stateless_destroy_torch_distributed_process_group,
    stateless_init_torch_distributed_process_group,
)
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)
from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo

from rlhf_dist.weight_sync import AbortableComm


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


@dataclass(kw_only=True)
class NcclInitInfo(NCCLWeightTransferInitInfo):
    timeout_s: float  # bound on one update's receive (PyNccl has no timeout of its own)


class NcclEngine(CheckpointReload, NCCLWeightTransferEngine):
    """vLLM's NCCL engine (GPU), loading through ``CheckpointReload``, each receive bounded by the
    sync's timeout: past it the communicator is aborted (``weight_sync.AbortableComm``), so that a
    trainer lost mid-broadcast cannot leave this worker waiting on the GPU for ever."""

    init_info_cls = NcclInitInfo

    def init_transfer_engine(self, init_info: NcclInitInfo) -> None:
        super().init_transfer_engine(init_info)
        where = f"NCCL group at {init_info.master_address}:{init_info.master_port}"
        self.model_update_group = AbortableComm(self.model_update_group, where)  # vLLM's shutdown calls its destroy
        self.timeout_s = init_info.timeout_s

    def receive_update(self, update_info: dict[str, Any]) -> None:
        if self.model_update_group is None:
            raise RuntimeError("NCCL weight transfer not initialized: call init_weight_transfer_engine first")
        # The whole of vLLM's update_weights: it ends with a device synchronize, where the host
        # would wait on a stuck broadcast of the unpacked path.
        self.model_update_group.within(self.timeout_s, "weight update from the trainer",
                                       lambda: super(NcclEngine, self).receive_update(update_info))


class IpcEngine(CheckpointReload, IPCWeightTransferEngine):
    """vLLM's CUDA-IPC engine (colocated GPUs), loading through ``CheckpointReload``."""


# ----------------------------------------------------------------------------- gloo (CPU)


@dataclass
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int  # group rank of this engine's worker 0 (the trainer is rank 0)
    world_size: int  # trainer + every engine worker
    timeout_s: float


@dataclass
class GlooUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int = 0  # the sender's bucket size (rlhf_dist.weight_sync.bucket_bounds); 0: per tensor

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(
                f"gloo update_info lists differ in length: names={len(self.names)} "
                f"dtype_names={len(self.dtype_names)} shapes={len(self.shapes)}"
            )


class GlooWeightTransferEngine(CheckpointReload, WeightTransferEngine[GlooInitInfo, GlooUpdateInfo]):
    """Receives full checkpoint-format tensors by broadcast over a gloo group (the trainer side is
    ``rlhf_dist.weight_sync.GlooWeightSender``)."""

    init_info_cls = GlooInitInfo
    update_info_cls = GlooUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group = None
        self._buckets: dict[int, torch.Tensor] = {}  # receive buffer of each bucket, kept across syncs

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self._group = stateless_init_torch_distributed_process_group(
            init_info.master_address,
            init_info.master_port,
            rank,
            init_info.world_size,
            backend="gloo",
            timeout=timedelta(seconds=init_info.timeout_s),
        )

    def receive_update(self, update_info: dict[str, Any]) -> None:
        # Not the engine's own update_weights: it ends with torch.accelerator.synchronize(),
        # which has nothing to do on CPU; gloo's broadcast is synchronous once wait() returns.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        """One broadcast per bucket of ``GlooWeightSender``, its tensors loaded together.

        Each bucket has its own receive buffer, kept from one sync to the next (a fresh one would
        cost its page faults every time): the layerwise reload holds on to loaded tensors (views
        of the buffers) until ``finish_weight_update``, so no buffer is reused within a sync."""
        from rlhf_dist.weight_sync import ParamSpec, bucket_bounds

        if self._group is None:
            raise RuntimeError("gloo weight transfer not initialized: call init_weight_transfer_engine first")
        specs = [ParamSpec(n, d, tuple(s)) for n, d, s in
                 zip(update_info.names, update_info.dtype_names, update_info.shapes)]
        sizes = [s.nbytes for s in specs]
        for start, end in bucket_bounds(sizes, update_info.bucket_bytes):
            if end - start == 1:
                spec = specs[start]
                weight = torch.empty(spec.shape, dtype=getattr(torch, spec.dtype), device=self.device)
                self._group.broadcast(weight, 0).wait()
                self.model.load_weights([(spec.name, weight)])
                continue
            nbytes = sum(sizes[start:end])
            flat = self._buckets.get(start)
            if flat is None or flat.numel() != nbytes:
                flat = self._buckets[start] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._group.broadcast(flat, 0).wait()
            tensors, offset = [], 0
            for spec, size in zip(specs[start:end], sizes[start:end]):
                tensors.append((spec.name, flat[offset : offset + size].view(getattr(torch, spec.dtype)).view(spec.shape)))
                offset += size
            self.model.load_weights(tensors)

    def shutdown(self) -> None:
        """Leave the group (before joining a new one); idempotent."""
        if self._group is not None:
            group, self._group = self._group, None
            stateless_destroy_torch_distributed_process_group(group)
