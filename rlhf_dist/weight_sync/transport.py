"""Weight transport from the policy trainer to the vLLM engines: what every transport shares.

Every transport rides vLLM's weight-transfer API (``init_weight_transfer_engine``
-> ``start_weight_update`` -> ``update_weights`` -> ``finish_weight_update``), and is one module
of this package plus one line in ``rlhf_dist.registry.TRANSPORTS`` (``resources.weight_sync_backend``):

- ``gloo`` (CPU): our engine and sender; trainer rank 0 broadcasts over a gloo group.
- ``nccl`` (GPU): vLLM's NCCL engine; the trainer side opens the communicator with
  ``vllm.distributed.weight_transfer.nccl_common.trainer_init``.
- ``ipc`` (GPU, colocated): vLLM's CUDA-IPC engine. Each trainer rank exports CUDA IPC handles of
  the full weights on its own GPU; the controller merges them so every engine finds a handle on its
  GPU, and no data moves between devices. NCCL cannot be used there: it refuses two ranks of one
  communicator on one GPU.

A transport is a ``GroupTransport`` (trainer rank 0 and every engine worker join one group; rank 0
broadcasts) or a ``HandleTransport`` (every trainer rank exports handles; each engine loads those on
its GPU). Its module holds both ends: the payloads the controller sends the engines, the trainer
side, and the engine class vLLM creates in its worker, behind ``reload.CheckpointReload``. That
class derives from vLLM's engine base, so it is made on first use (``Transport.engine_class``,
through ``plugin``): the trainer and the controller import a transport without importing vLLM
(trainer rank 0's group senders import vLLM's group helpers when they open a group).

Weights travel in checkpoint (Hugging Face) naming from trainer rank 0 (group rank 0) to
engine workers (ranks 1..N), in buckets of about ``resources.weight_sync_bucket_mb``: the
tensors of a bucket packed into one flat byte buffer, one broadcast per bucket (gloo: ours,
``bucket_bounds``; nccl: vLLM's packed mode), and under ZeRO-3 gathered a bucket at a time.
0 sends one broadcast per tensor. The metadata (names, dtypes, shapes, bucket size) goes
through ``update_weights``' argument; tensors never go through RPC arguments (vLLM's msgpack
transport turns them into lists).

Every broadcast is bounded on both ends by the sync's timeout (gloo: the group's own; NCCL:
``nccl.AbortableComm``, PyNccl having none). A broadcast that fails (a peer lost or stopped) closes
the group at the end that saw it; the controller replaces a lost engine, and every engine and trainer
rank 0 join a new group (``roles.groups.WeightSync.reconnect``).
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from rlhf_dist.registry import TRANSPORTS


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


class WeightSender(Protocol):
    """Trainer rank 0's end of a group transport's weight-transfer group."""

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


class WeightExporter(Protocol):
    """A trainer rank's end of a handle transport: handles of full copies it holds until ``release``."""

    def export(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list: ...

    def release(self) -> None: ...


class Transport:
    """One way the weights travel from the trainer to the engines, both ends of it. Its static traits
    (devices, placements, whether it needs the engine in-process, its vLLM backend name) are its
    ``rlhf_dist.registry.TRANSPORTS`` entry, which config validation reads without importing it."""

    def __init__(self, name: str) -> None:
        self.name = name  # its key in registry.TRANSPORTS

    def engine_init_info(
        self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float, bucket_bytes: int
    ) -> dict:
        """``init_weight_transfer_engine`` payload for one engine joining (its worker 0 is group rank
        ``rank_offset`` of ``world_size``); ``timeout_s`` bounds each of its receives."""
        raise NotImplementedError

    def update_info(self, specs: list[ParamSpec], bucket_bytes: int) -> dict:
        """The ``update_weights`` payload: every parameter's name, dtype and shape, in the order sent."""
        return {
            "names": [s.name for s in specs],
            "dtype_names": [s.dtype for s in specs],
            "shapes": [list(s.shape) for s in specs],
        }

    def engine_class(self) -> type:
        """The engine vLLM creates in its worker (registered by ``plugin``): a ``reload.CheckpointReload``
        in front of a vLLM ``WeightTransferEngine``. Made on first use; imports vLLM."""
        raise NotImplementedError


class GroupTransport(Transport):
    """Trainer rank 0 (group rank 0) and every engine worker (ranks 1..N) join one process group and
    rank 0 broadcasts: both ends take part at once, so a sync can be issued without waiting for it."""

    def engine_init_info(
        self, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float, bucket_bytes: int
    ) -> dict:
        return {"master_address": host, "master_port": port, "rank_offset": rank_offset, "world_size": world_size,
                "timeout_s": timeout_s}

    def open_sender(
        self, host: str, port: int, world_size: int, timeout_s: float, specs: list[ParamSpec], bucket_bytes: int
    ) -> WeightSender:
        """Trainer rank 0's end of the group whose rendezvous it hosts at ``host:port``."""
        raise NotImplementedError


class HandleTransport(Transport):
    """Every trainer rank exports handles of full copies of the weights on its own GPU, and each engine
    loads those on its GPU. No group: each stage is done before the next is issued (the engines need
    the exported handles, and the copies must outlive their load)."""

    def exporter(self) -> WeightExporter:
        """A trainer rank's exporter, kept by the rank from one sync to the next."""
        raise NotImplementedError

    def with_handles(self, info: dict, per_rank: list[list]) -> dict:
        """The ``update_weights`` payload: ``info`` (``update_info``) with every trainer rank's export."""
        raise NotImplementedError


def load_transport(name: str) -> Transport:
    """The transport ``name`` (``resources.weight_sync_backend``), imported from its registry entry."""
    if name not in TRANSPORTS:
        raise ValueError(f"unknown weight-sync transport {name!r}: use one of {', '.join(TRANSPORTS)} "
                         "(rlhf_dist.registry.TRANSPORTS)")
    module_name, _, attr = TRANSPORTS[name].target.partition(":")
    transport = getattr(importlib.import_module(module_name), attr)
    if not isinstance(transport, (GroupTransport, HandleTransport)) or transport.name != name:
        raise TypeError(f"TRANSPORTS[{name!r}]={TRANSPORTS[name].target!r} is not the {name} GroupTransport "
                        "or HandleTransport")
    return transport


class GroupSender:
    """What the group senders share: a broadcast that fails closes the group, and rank 0 still walks
    the rest of the parameters. Under ZeRO-3 the parameter iterator gathers every bucket in a
    collective of all trainer ranks, and the other ranks gather them all: a rank 0 that stopped
    half-way would leave them waiting in a gather until DeepSpeed's timeout, and the trainer group
    out of step for good. After a failure the engines must join a new group (the trainer's
    ``init_weight_sender`` replaces this sender)."""

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
