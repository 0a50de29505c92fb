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

Every broadcast is bounded on both ends by the sync's timeout (gloo: the group's own; NCCL:
``AbortableComm``, PyNccl having none). A broadcast that fails (a peer lost or stopped) closes the
group at the end that saw it; the controller replaces a lost engine, and every engine and trainer
rank 0 join a new group (``roles.groups.WeightSync.reconnect``).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator
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
    """``init_weight_transfer_engine`` payload for one engine joining the group; ``timeout_s`` bounds
    each of its receives."""
    if transport == "ipc":
        return {"packed": False}  # no group to join: handles come with every update
    info = {"master_address": host, "master_port": port, "rank_offset": rank_offset, "world_size": world_size,
            "timeout_s": timeout_s}
    if transport == "nccl":
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


def _one_line(error: BaseException) -> str:
    """``Type: first line`` of an error, without the source location gloo puts first."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: " + re.sub(r"^\[\S+:\d+\] ", "", first)


class AbortableComm:
    """A PyNccl communicator whose transfers a deadline can cut short (both ends of the NCCL
    transport use it: ``NcclWeightSender``, ``vllm_engines.NcclEngine``).

    PyNccl has no timeout: a broadcast with a peer that died (an engine lost mid-sync, or the
    trainer) spins on the GPU for ever, and the host waits for it in a stream synchronize.
    ``within`` runs a transfer under a timer that aborts the communicator (PyNccl's ``destroy`` is
    ncclCommAbort, which makes NCCL's kernels return and frees the communicator), so that wait
    ends, the process stays usable, and the transfer raises ``TimeoutError``; the engines then join
    a new group (``WeightSync.reconnect``). ``broadcast`` and the abort share a lock so that an
    abort never frees the communicator while this thread enqueues a collective on it; an abort
    that cannot get the lock within ``ENQUEUE_GRACE_S`` goes ahead (an enqueue blocked inside
    NCCL is what the abort is there to end)."""

    ENQUEUE_GRACE_S = 5.0

    def __init__(self, comm, where: str) -> None:
        self.comm, self.where = comm, where  # where: "NCCL group at <rank 0's host>:<port>", for error messages
        self.aborted = False
        self._lock = threading.Lock()

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        with self._lock:
            if self.aborted:  # PyNccl's own broadcast would return without sending anything
                raise RuntimeError(f"the communicator of the {self.where} was aborted")
            self.comm.broadcast(tensor, src=src, stream=stream)

    def destroy(self) -> None:
        """Abort and free the communicator (idempotent); what vLLM's engine calls on shutdown."""
        locked = self._lock.acquire(timeout=self.ENQUEUE_GRACE_S)
        try:
            if not self.aborted:
                self.aborted = True
                self.comm.destroy()
        finally:
            if locked:
                self._lock.release()

    def within(self, timeout_s: float, what: str, transfer: Callable[[], None]) -> None:
        """``transfer()``, the communicator aborted if it has not returned after ``timeout_s``."""
        if self.aborted:
            raise RuntimeError(f"the communicator of the {self.where} was aborted")
        timer = threading.Timer(timeout_s, self.destroy)
        timer.daemon = True
        timer.start()
        try:
            transfer()
        finally:
            timer.cancel()
            timer.join()  # an abort already under way finishes first
            if self.aborted:  # what ended the transfer (or it ended as the timer fired): the communicator is gone
                raise TimeoutError(f"{what} did not finish within {timeout_s:g}s ({self.where}): a peer was "
                                   "lost or stopped; the communicator was aborted")


class _GroupSender:
    """What the gloo and NCCL senders share: a broadcast that fails closes the group, and rank 0
    still walks the rest of the parameters. Under ZeRO-3 the parameter iterator gathers every
    bucket in a collective of all trainer ranks, and the other ranks gather them all: a rank 0
    that stopped half-way would leave them waiting in a gather until DeepSpeed's timeout, and the
    trainer group out of step for good. After a failure the engines must join a new group
    (``init_weight_sender`` replaces this sender)."""

    _group = None
    where = ""  # the group's rendezvous (rank 0's node), for error messages

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        tensors = iter(named_tensors)
        try:
            if self._group is None:
                raise RuntimeError(f"the weight-transfer group ({self.where}) was closed after a failed broadcast; "
                                   "the engines must join a new one first")
            self._send(tensors)
        except Exception:
            for _ in tensors:
                pass
            self.close()
            raise

    def _send(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class GlooWeightSender(_GroupSender):
    """Trainer rank 0's end of the gloo group (group rank 0 is the source): the tensors of each
    bucket (``bucket_bounds`` of ``specs``, the order they are sent in) copied into one flat
    buffer, one broadcast per bucket; a bucket of one tensor goes as it is. The buffer (the size
    of the largest bucket) is allocated once: a fresh one per sync would cost its page faults.
    Every broadcast is bounded by ``timeout_s`` (gloo's own timeout); a peer that died fails it
    at once ("Connection closed by peer")."""

    def __init__(
        self, host: str, port: int, world_size: int, timeout_s: float, specs: list[ParamSpec], bucket_bytes: int
    ) -> None:
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self.where = f"gloo group at {host}:{port}"
        self._group = stateless_init_torch_distributed_process_group(
            host, port, 0, world_size, backend="gloo", timeout=timedelta(seconds=timeout_s)
        )
        self._sizes = [s.nbytes for s in specs]
        self._bounds = bucket_bounds(self._sizes, bucket_bytes)
        self._flat = torch.empty(max((sum(self._sizes[a:b]) for a, b in self._bounds if b - a > 1), default=0),
                                 dtype=torch.uint8)

    def _send(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        for k, (start, end) in enumerate(self._bounds):
            if end - start == 1:
                data = next(tensors)[1].detach().contiguous().cpu()
            else:
                data = self._flat[: sum(self._sizes[start:end])]  # free again: the last broadcast has returned
                offset = 0
                for size in self._sizes[start:end]:
                    # A copy as each arrives: a ZeRO-3 tensor is partitioned again once the iterator moves on.
                    data[offset : offset + size].copy_(as_bytes(next(tensors)[1]))
                    offset += size
            try:
                # The group is not registered with torch.distributed's world, so use the
                # ProcessGroup's own broadcast, whose root is a group rank.
                self._group.broadcast(data, 0).wait()
            except RuntimeError as e:
                raise RuntimeError(f"weight broadcast to the engines failed at bucket {k + 1} of {len(self._bounds)} "
                                   f"({self.where}): {_one_line(e)}") from e

    def close(self) -> None:
        """Leave the group (its sockets and, on rank 0, its rendezvous store); idempotent."""
        if self._group is not None:
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            group, self._group = self._group, None
            stateless_destroy_torch_distributed_process_group(group)


def _cloned_on(stream, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, copy) of each tensor, for vLLM's packed producer, which draws from its iterator and
    packs on side streams of its own (``packed_tensor._get_streams``).

    Drawing from ``tensors`` runs the ZeRO-3 gather of a bucket, and leaving a bucket frees its
    gathered parameters. DeepSpeed orders each on the stream current at the time: the gather's
    completion is waited for on it, and ``free_param`` records only it for the allocator; in
    training that is one stream. Inside the producer the current stream is whichever side stream
    it is filling, and its buffers do not end where our buckets do: a bucket gathered while one
    side stream is current could have its tensors copied on the other, before the gather is done,
    and be freed, with only the stream current then recorded, before the copy has read it. So the gather,
    the copy and the free all run on ``stream`` (the caller's), as in any other pass; the side
    stream then waits for the copy before packing it, and the copy is recorded on the side stream,
    since the producer drops it as soon as the packing is enqueued there."""
    while True:
        with torch.cuda.stream(stream):
            item = next(tensors, None)
            if item is None:
                return
            name, tensor = item
            copy = tensor.detach().clone()  # vLLM packs a buffer only once it is full: the gather may be gone by then
        packing = torch.cuda.current_stream()
        packing.wait_stream(stream)
        copy.record_stream(packing)
        yield name, copy


class NcclWeightSender(_GroupSender):
    """Trainer rank 0's end of vLLM's NCCL weight-transfer group: with ``bucket_bytes``, vLLM's
    packed broadcast (buffers of that size, double-buffered), else one broadcast per tensor. A
    whole send is bounded by ``timeout_s`` (``AbortableComm``; PyNccl has no timeout)."""

    def __init__(
        self, host: str, port: int, world_size: int, timeout_s: float, specs: list[ParamSpec], bucket_bytes: int
    ) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        del specs  # vLLM packs by itself
        self.where = f"NCCL group at {host}:{port}"
        comm = trainer_init({"master_address": host, "master_port": port, "world_size": world_size}, rank=0)
        self._group = AbortableComm(comm, self.where)
        self._timeout_s, self._bucket_bytes = timeout_s, bucket_bytes

    def _send(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        self._group.within(self._timeout_s, "weight broadcast to the engines", lambda: self._broadcast(tensors))

    def _broadcast(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
        stream = torch.cuda.current_stream()
        if self._bucket_bytes:
            from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

            packed_nccl_broadcast_producer(
                iterator=_cloned_on(stream, tensors), group=self._group, src=0,
                post_iter_func=lambda item: item[1], buffer_size_bytes=self._bucket_bytes,
            )  # returns once its streams are drained
            return
        for _, tensor in tensors:  # all on the current stream, as ZeRO-3's gathers and frees
            self._group.broadcast(tensor.detach().contiguous(), src=0, stream=stream)
        stream.synchronize()

    def close(self) -> None:
        """Destroy the communicator (ncclCommAbort, also of a broadcast still in flight); idempotent."""
        if self._group is not None:
            group, self._group = self._group, None
            group.destroy()


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
