"""ipc (GPU, colocated): vLLM's CUDA-IPC weight transfer; no data moves between devices.

Both ends are here: ``IpcWeightExporter`` (every trainer rank: CUDA IPC handles of full copies of the
weights on its own GPU), ``merge_ipc_handles`` (the controller: one ``{gpu_uuid: handle}`` per
parameter, so every engine finds the handle on its GPU), and vLLM's CUDA-IPC engine behind
``CheckpointReload`` (``IpcTransport.engine_class``). Each engine shares trainer rank i's GPU
(placement colocated), and runs inside its Ray actor's process: the handles are Python objects that
vLLM's engine-core channel would only pass by pickle (its traits in ``rlhf_dist.registry.TRANSPORTS``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch

from rlhf_dist.weight_sync.reload import CheckpointReload
from rlhf_dist.weight_sync.transport import HandleTransport, WeightExporter


class IpcTransport(HandleTransport):
    def engine_init_info(
        self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float, bucket_bytes: int
    ) -> dict:
        return {"packed": False}  # no group to join: handles come with every update

    def exporter(self) -> WeightExporter:
        return IpcWeightExporter()

    def with_handles(self, info: dict, per_rank: list[list]) -> dict:
        return {**info, "ipc_handles": merge_ipc_handles(per_rank)}

    def engine_class(self) -> type:
        return _engine_class()


def merge_ipc_handles(per_rank: list[list[dict[str, tuple]]]) -> list[dict[str, tuple]]:
    """One ``{gpu_uuid: handle}`` dict per parameter from every trainer rank's list of them.

    Rank ``r`` exported the full parameters on its own GPU; an engine picks the handle of the GPU
    it runs on, so merged dicts let every engine colocated with some trainer rank find its own."""
    counts = {len(handles) for handles in per_rank}
    if len(counts) != 1:
        raise ValueError(f"trainer ranks exported different parameter counts: {[len(h) for h in per_rank]}")
    merged: list[dict[str, tuple]] = [{} for _ in per_rank[0]]
    for handles in per_rank:
        for param, handle in zip(merged, handles):
            param.update(handle)
    return merged


class IpcWeightExporter:
    """A trainer rank's CUDA IPC handles of the full weights, each a copy on this rank's GPU.

    The copies must outlive the engines' ``update_weights`` (an IPC handle does not keep its
    storage alive), so they are held until ``release``, which the controller calls after
    ``finish_weight_update``."""

    def __init__(self) -> None:
        self._copies: list[torch.Tensor] = []

    def export(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[dict[str, tuple]]:
        from torch.multiprocessing.reductions import reduce_tensor

        self.release()
        uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        handles = []
        for _, tensor in named_tensors:
            copy = tensor.detach().clone()  # ZeRO-3 frees a gathered parameter when its context exits
            self._copies.append(copy)
            handles.append({uuid: reduce_tensor(copy)[1]})
        torch.cuda.synchronize()
        return handles

    def release(self) -> None:
        if self._copies:
            self._copies = []
            torch.cuda.ipc_collect()


@functools.cache
def _engine_class() -> type:
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine

    class IpcEngine(CheckpointReload, IPCWeightTransferEngine):
        """vLLM's CUDA-IPC engine (colocated GPUs), loading through ``CheckpointReload``."""

    return IpcEngine


TRANSPORT = IpcTransport("ipc")
