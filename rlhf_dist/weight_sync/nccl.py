"""nccl (GPU): vLLM's NCCL weight transfer; trainer rank 0 broadcasts over a PyNccl communicator.

Both ends are here: ``NcclWeightSender`` (trainer rank 0, vLLM's ``trainer_init`` and packed
producer) and ``NcclReceiver`` (vLLM's NCCL engine behind ``CheckpointReload`` once
``NcclTransport.engine_class`` makes it). PyNccl has no timeout, so both ends bound a transfer by
the sync's with ``AbortableComm``. NCCL refuses two ranks of one communicator on one GPU: this
transport is never colocated (its traits in ``rlhf_dist.registry.TRANSPORTS``).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_dist.weight_sync.reload import CheckpointReload
from rlhf_dist.weight_sync.transport import GroupSender, GroupTransport, ParamSpec, WeightSender


class NcclTransport(GroupTransport):
    def engine_init_info(
        self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float, bucket_bytes: int
    ) -> dict:
        # vLLM's packed mode cuts its own buffers of this size: set once, at init.
        info = super().engine_init_info(host, port, rank_offset, world_size, timeout_s, bucket_bytes)
        info["packed"] = bucket_bytes > 0
        if bucket_bytes:
            info["packed_buffer_size_bytes"] = bucket_bytes
        return info

    def open_sender(
        self, host: str, port: int, world_size: int, timeout_s: float, specs: list[ParamSpec], bucket_bytes: int
    ) -> WeightSender:
        return NcclWeightSender(host, port, world_size, timeout_s, bucket_bytes)

    def engine_class(self) -> type:
        return _engine_class()


class AbortableComm:
    """A PyNccl communicator whose transfers a deadline can cut short (both ends of the NCCL
    transport use it: ``NcclWeightSender``, ``NcclReceiver``).

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


# ----------------------------------------------------------------------------- trainer rank 0's end


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


class NcclWeightSender(GroupSender):
    """Trainer rank 0's end of vLLM's NCCL weight-transfer group: with ``bucket_bytes``, vLLM's
    packed broadcast (buffers of that size, double-buffered), else one broadcast per tensor. A
    whole send is bounded by ``timeout_s`` (``AbortableComm``; PyNccl has no timeout)."""

    def __init__(self, host: str, port: int, world_size: int, timeout_s: float, bucket_bytes: int) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

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


# ----------------------------------------------------------------------------- the engine's end


class NcclReceiver(CheckpointReload):
    """vLLM's NCCL engine (its base, added by ``_engine_class``) loading through ``CheckpointReload``,
    each receive bounded by the sync's timeout: past it the communicator is aborted
    (``AbortableComm``), so that a trainer lost mid-broadcast cannot leave this worker waiting on
    the GPU for ever."""

    model_update_group: Any

    def init_transfer_engine(self, init_info: Any) -> None:
        super().init_transfer_engine(init_info)  # type: ignore[misc]  (vLLM's NCCL engine's)
        where = f"NCCL group at {init_info.master_address}:{init_info.master_port}"
        self.model_update_group = AbortableComm(self.model_update_group, where)  # vLLM's shutdown calls its destroy
        self.timeout_s = init_info.timeout_s

    def receive_update(self, update_info: dict[str, Any]) -> None:
        if self.model_update_group is None:
            raise RuntimeError("NCCL weight transfer not initialized: call init_weight_transfer_engine first")
        # The whole of vLLM's update_weights: it ends with a device synchronize, where the host
        # would wait on a stuck broadcast of the unpacked path.
        receive = super().receive_update
        self.model_update_group.within(self.timeout_s, "weight update from the trainer",
                                       lambda: receive(update_info))


@functools.cache
def _engine_class() -> type:
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine, NCCLWeightTransferInitInfo

    @dataclass(kw_only=True)
    class NcclInitInfo(NCCLWeightTransferInitInfo):
        timeout_s: float  # bound on one update's receive (PyNccl has no timeout of its own)

    class NcclEngine(NcclReceiver, NCCLWeightTransferEngine):
        """vLLM's NCCL engine with ``NcclReceiver`` in front of it."""

        init_info_cls = NcclInitInfo

    return NcclEngine


TRANSPORT = NcclTransport("nccl")
