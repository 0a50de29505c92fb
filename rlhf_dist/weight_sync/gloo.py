"""gloo (CPU): trainer rank 0 broadcasts the weights to every engine worker over a gloo group.

Both ends are here: ``GlooWeightSender`` (trainer rank 0) and ``GlooReceiver`` (the engine's
worker, a vLLM engine once ``GlooTransport.engine_class`` adds vLLM's base). The tensors of a bucket
(``bucket_bounds`` of the specs, the order they are sent in) travel as one flat byte buffer, one
broadcast per bucket; both ends derive the same buckets from the same specs and bucket size.
Every broadcast is bounded by gloo's own timeout (the sync's); a peer that died fails it at once
("Connection closed by peer").
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from rlhf_dist.weight_sync.reload import CheckpointReload
from rlhf_dist.weight_sync.transport import GroupSender, GroupTransport, ParamSpec, WeightSender, bucket_bounds


class GlooTransport(GroupTransport):
    def update_info(self, specs: list[ParamSpec], bucket_bytes: int) -> dict:
        # The receiver cuts the same buckets from the same specs and size (bucket_bounds).
        return {**super().update_info(specs, bucket_bytes), "bucket_bytes": bucket_bytes}

    def open_sender(
        self, host: str, port: int, world_size: int, timeout_s: float, specs: list[ParamSpec], bucket_bytes: int
    ) -> WeightSender:
        return GlooWeightSender(host, port, world_size, timeout_s, specs, bucket_bytes)

    def engine_class(self) -> type:
        return _engine_class()


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's data as a flat uint8 tensor (a view where it is contiguous)."""
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def _one_line(error: BaseException) -> str:
    """``Type: first line`` of an error, without the source location gloo puts first."""
    first = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: " + re.sub(r"^\[\S+:\d+\] ", "", first)


class GlooWeightSender(GroupSender):
    """Trainer rank 0's end of the gloo group (group rank 0 is the source): the tensors of each
    bucket copied into one flat buffer, one broadcast per bucket; a bucket of one tensor goes as it
    is. The buffer (the size of the largest bucket) is allocated once: a fresh one per sync would
    cost its page faults."""

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


# ----------------------------------------------------------------------------- the engine's end


@dataclass
class GlooInitInfo:
    master_address: str
    master_port: int
    rank_offset: int  # group rank of this engine's worker 0 (the trainer is rank 0)
    world_size: int  # trainer + every engine worker
    timeout_s: float


@dataclass
class GlooUpdateInfo:
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    bucket_bytes: int = 0  # the sender's bucket size (bucket_bounds); 0: per tensor

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(
                f"gloo update_info lists differ in length: names={len(self.names)} "
                f"dtype_names={len(self.dtype_names)} shapes={len(self.shapes)}"
            )


class GlooReceiver(CheckpointReload):
    """Receives full checkpoint-format tensors by broadcast over the gloo group, from
    ``GlooWeightSender``. The methods of our gloo engine; vLLM's engine base (the config, device
    and model it sets, ``parse_update_info``) is added by ``_engine_class``."""

    device: torch.device
    parallel_config: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._group = None
        self._buckets: dict[int, torch.Tensor] = {}  # receive buffer of each bucket, kept across syncs

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

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
        self.receive_weights(self.parse_update_info(update_info))  # type: ignore[attr-defined]

    def receive_weights(self, update_info: GlooUpdateInfo) -> None:
        """One broadcast per bucket of ``GlooWeightSender``, its tensors loaded together.

        Each bucket has its own receive buffer, kept from one sync to the next (a fresh one would
        cost its page faults every time): the layerwise reload holds on to loaded tensors (views
        of the buffers) until ``finish_weight_update``, so no buffer is reused within a sync."""
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
            from vllm.distributed.utils import stateless_destroy_torch_distributed_process_group

            group, self._group = self._group, None
            stateless_destroy_torch_distributed_process_group(group)


@functools.cache
def _engine_class() -> type:
    from vllm.distributed.weight_transfer.base import WeightTransferEngine

    class GlooWeightTransferEngine(GlooReceiver, WeightTransferEngine):
        """Our gloo engine: ``GlooReceiver`` on vLLM's engine base, loading through ``CheckpointReload``."""

        init_info_cls = GlooInitInfo
        update_info_cls = GlooUpdateInfo

    return GlooWeightTransferEngine


TRANSPORT = GlooTransport("gloo")
