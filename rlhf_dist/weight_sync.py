"""Weight transport from the policy trainer to the vLLM engines.

Every transport rides vLLM's weight-transfer API (``init_weight_transfer_engine``
-> ``start_weight_update`` -> ``update_weights`` -> ``finish_weight_update``):

- ``nccl`` (GPU): vLLM's NCCL engine; the trainer side opens the
  communicator with ``vllm.distributed.weight_transfer.nccl_common.trainer_init``.
- ``ipc`` (GPU, colocated): vLLM's CUDA-IPC engine. Each trainer rank
  exports CUDA IPC handles of the full weights on its own GPU; the controller
  merges them (``merge_ipc_handles``) so every engine finds a handle on its GPU,
  and no data moves between devices. NCCL cannot be used there: it refuses two
  ranks of one communicator on one GPU.
- ``gloo`` (CPU): our ``GlooWeightTransferEngine`` and ``GlooWeightSender`` below.

On the engine side every transport is one of ``rlhf_dist.vllm_engines`` (vLLM's NCCL and IPC
engines, and the gloo one, each behind the same reload lifecycle, which also re-processes tied
output heads), registered in every vLLM process through the ``vllm.general_plugins`` entry point
declared in ``pyproject.toml`` (the engine core may run in a spawned subprocess, so registering
them in the caller's process would not be enough).

Weights travel in checkpoint (Hugging Face) naming from trainer rank 0 (group rank 0) to
engine workers (ranks 1..N), in buckets of about ``resources.weight_sync_bucket_mb``: the
tensors of a bucket packed into one flat byte buffer, one broadcast per bucket (gloo: ours,
``bucket_bounds``; nccl: vLLM's packed mode), and under ZeRO-3 gathered a bucket at a time.
0 sends one broadcast per tensor. The metadata (names, dtypes, shapes, bucket size) goes
through ``update_weights``' argument; tensors never go through RPC arguments (vLLM's msgpack
transport turns them into lists).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch

# transport (resources.weight_sync_backend) -> (vLLM backend name, engine class in rlhf_dist.vllm_engines)
VLLM_ENGINES = {
    "gloo": ("rlhf_gloo", "GlooWeightTransferEngine"),
    "nccl": ("rlhf_nccl", "NcclEngine"),
    "ipc": ("rlhf_ipc", "IpcEngine"),
}


def vllm_backend_name(transport: str) -> str:
    """The vLLM ``WeightTransferConfig.backend`` for a transport name from config."""
    return VLLM_ENGINES[transport][0]


@dataclass(frozen=True)
class ParamSpec:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * getattr(torch, self.dtype).itemsize


def bucket_bounds(sizes: list[int], bucket_bytes: int) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive tensors of ``sizes`` bytes, each range as many as fit
    in ``bucket_bytes`` (a larger tensor alone); ``bucket_bytes`` 0: one tensor per range. Both
    ends of a transfer derive the same ranges from the same specs."""
    bounds: list[tuple[int, int]] = []
    start, filled = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (not bucket_bytes or filled + size > bucket_bytes):
            bounds.append((start, i))
            start, filled = i, 0
        filled += size
    if sizes:
        bounds.append((start, len(sizes)))
    return bounds


def update_info(specs: list[ParamSpec], transport: str, bucket_bytes: int) -> dict:
    """The ``update_weights`` payload of the gloo and NCCL backends (NCCL's bucket size is set
    once, in its init info)."""
    info = {
        "names": [s.name for s in specs],
        "dtype_names": [s.dtype for s in specs],
        "shapes": [list(s.shape) for s in specs],
    }
    if transport == "gloo":
        info["bucket_bytes"] = bucket_bytes
    return info


def engine_init_info(
    transport: str, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float, bucket_bytes: int
) -> dict:
    """``init_weight_transfer_engine`` payload for one engine joining the group."""
    if transport == "ipc":
        return {"packed": False}  # no group to join: handles come with every update
    info = {"master_address": host, "master_port": port, "rank_offset": rank_offset, "world_size": world_size}
    if transport == "gloo":
        info["timeout_s"] = timeout_s
    else:
        info["packed"] = bucket_bytes > 0
        if bucket_bytes:
            info["packed_buffer_size_bytes"] = bucket_bytes
    return info


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


# ----------------------------------------------------------------------------- verification

PROBE_LENGTH = 24  # tokens per probe sequence


def probe_sequences(vocab_size: int, count: int, seed: int, length: int = PROBE_LENGTH) -> list[list[int]]:
    """``count`` fixed sequences of token ids drawn uniformly from ``[0, vocab_size)``: a probe
    that touches the embedding rows and output logits of many tokens, whatever the task."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator).tolist()


@dataclass(frozen=True)
class ProbeGap:
    """The worst (engine, probe sequence) pair: mean |engine - trainer| logprob over its tokens."""

    engine: int
    sequence: int
    gap: float


def worst_probe_gap(engine_logprobs: list[list[list[float]]], trainer_logprobs: torch.Tensor) -> ProbeGap:
    """``engine_logprobs[e][s]``: engine ``e``'s logprobs of tokens 1.. of probe sequence ``s``;
    ``trainer_logprobs``: (S, T) the trainer's of the same tokens (T >= every sequence's length)."""
    worst = ProbeGap(-1, -1, -1.0)
    for e, per_sequence in enumerate(engine_logprobs):
        for s, lps in enumerate(per_sequence):
            gap = float((torch.tensor(lps, dtype=torch.float64) - trainer_logprobs[s, : len(lps)].double()).abs().mean())
            if math.isnan(gap):  # worse than any number
                return ProbeGap(e, s, gap)
            if gap > worst.gap:
                worst = ProbeGap(e, s, gap)
    return worst


# ----------------------------------------------------------------------------- trainer side


class WeightSender(Protocol):
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's data as a flat uint8 tensor (a view where it is contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


class GlooWeightSender:
    """Trainer rank 0's end of the gloo group (group rank 0 is the source): the tensors of each
    bucket (``bucket_bounds`` of ``specs``, the order they are sent in) copied into one flat
    buffer, one broadcast per bucket; a bucket of one tensor goes as it is. The buffer (the size
    of the largest bucket) is allocated once: a fresh one per sync would cost its page faults."""

    def __init__(
        self, host: str, port: int, world_size: int, timeout_s: float, specs: list[ParamSpec], bucket_bytes: int
    ) -> None:
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self._group = stateless_init_torch_distributed_process_group(
            host, port, 0, world_size, backend="gloo", timeout=timedelta(seconds=timeout_s)
        )
        self._sizes = [s.nbytes for s in specs]
        self._bounds = bucket_bounds(self._sizes, bucket_bytes)
        self._flat = torch.empty(max((sum(self._sizes[a:b]) for a, b in self._bounds if b - a > 1), default=0),
                                 dtype=torch.uint8)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        tensors = iter(named_tensors)
        for start, end in self._bounds:
            # The group is not registered with torch.distributed's world, so use the
            # ProcessGroup's own broadcast, whose root is a group rank.
            if end - start == 1:
                self._group.broadcast(next(tensors)[1].detach().contiguous().cpu(), 0).wait()
                continue
            flat = self._flat[: sum(self._sizes[start:end])]  # free again: the last broadcast has returned
            offset = 0
            for size in self._sizes[start:end]:
                # A copy as each arrives: a ZeRO-3 tensor is partitioned again once the iterator moves on.
                flat[offset : offset + size].copy_(as_bytes(next(tensors)[1]))
                offset += size
            self._group.broadcast(flat, 0).wait()

    def close(self) -> None:
        self._group = None


class NcclWeightSender:
    """Trainer rank 0's end of vLLM's NCCL weight-transfer group: with ``bucket_bytes``, vLLM's
    packed broadcast (buffers of that size, double-buffered), else one broadcast per tensor."""

    def __init__(
        self, host: str, port: int, world_size: int, timeout_s: float, specs: list[ParamSpec], bucket_bytes: int
    ) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        del timeout_s, specs  # PyNccl has no timeout (the controller bounds the call); vLLM packs by itself
        self._comm = trainer_init({"master_address": host, "master_port": port, "world_size": world_size}, rank=0)
        self._bucket_bytes = bucket_bytes

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        if self._bucket_bytes:
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            # A clone: vLLM concatenates a buffer's tensors only once it is full, after a ZeRO-3
            # gather that produced the first of them may have been released.
            packed_nccl_broadcast_producer(
                iterator=iter(named_tensors), group=self._comm, src=0,
                post_iter_func=lambda item: item[1].detach().clone(), buffer_size_bytes=self._bucket_bytes,
            )
            return
        stream = torch.cuda.current_stream()
        for _, tensor in named_tensors:
            self._comm.broadcast(tensor.detach().contiguous(), src=0, stream=stream)
        stream.synchronize()

    def close(self) -> None:
        self._comm = None


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


def make_sender(
    transport: str, host: str, port: int, world_size: int, timeout_s: float, specs: list[ParamSpec], bucket_bytes: int
) -> WeightSender:
    senders = {"gloo": GlooWeightSender, "nccl": NcclWeightSender}
    return senders[transport](host, port, world_size, timeout_s, specs, bucket_bytes)


# ----------------------------------------------------------------------------- vLLM side


def register_vllm_plugin() -> None:
    """Entry point (``vllm.general_plugins``): register our engines in this process (lazily: the
    module is imported when an engine is created)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for backend, class_name in VLLM_ENGINES.values():
        if backend not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(backend, "rlhf_dist.vllm_engines", class_name)
