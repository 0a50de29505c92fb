"""Weight transport from the policy trainer to the vLLM engines.

Both transports ride vLLM's weight-transfer API (``init_weight_transfer_engine``
-> ``start_weight_update`` -> ``update_weights`` -> ``finish_weight_update``):

- ``nccl`` (GPU): vLLM's built-in NCCL backend; the trainer side opens the
  communicator with ``vllm.distributed.weight_transfer.nccl_common.trainer_init``.
- ``gloo`` (CPU): ``GlooWeightTransferEngine`` below, registered in every vLLM
  process through the ``vllm.general_plugins`` entry point declared in
  ``pyproject.toml`` (the engine core runs in a spawned subprocess, so
  registering it in the caller's process would not be enough).

Weights travel in checkpoint (Hugging Face) naming, one broadcast per tensor,
from trainer rank 0 (group rank 0) to engine workers (ranks 1..N). The metadata
(names, dtypes, shapes) goes through ``update_weights``' argument; tensors never
go through RPC arguments (vLLM's msgpack transport turns them into lists).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import torch

GLOO_BACKEND = "rlhf_gloo"


def vllm_backend_name(transport: str) -> str:
    """The vLLM ``WeightTransferConfig.backend`` for a transport name from config."""
    return {"gloo": GLOO_BACKEND, "nccl": "nccl"}[transport]


@dataclass(frozen=True)
class ParamSpec:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]


def update_info(specs: list[ParamSpec]) -> dict:
    """The ``update_weights`` payload shared by the gloo and (unpacked) NCCL backends."""
    return {
        "names": [s.name for s in specs],
        "dtype_names": [s.dtype for s in specs],
        "shapes": [list(s.shape) for s in specs],
    }


def engine_init_info(transport: str, host: str, port: int, rank_offset: int, world_size: int, timeout_s: float) -> dict:
    """``init_weight_transfer_engine`` payload for one engine joining the group."""
    info = {"master_address": host, "master_port": port, "rank_offset": rank_offset, "world_size": world_size}
    if transport == "gloo":
        info["timeout_s"] = timeout_s
    else:
        info["packed"] = False
    return info


# ----------------------------------------------------------------------------- trainer side


class WeightSender(Protocol):
    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...

    def close(self) -> None: ...


class GlooWeightSender:
    """Trainer rank 0's end of the gloo group (group rank 0 is the source)."""

    def __init__(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        from vllm.distributed.utils import stateless_init_torch_distributed_process_group

        self._group = stateless_init_torch_distributed_process_group(
            host, port, 0, world_size, backend="gloo", timeout=timedelta(seconds=timeout_s)
        )

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for _, tensor in named_tensors:
            # The group is not registered with torch.distributed's world, so use the
            # ProcessGroup's own broadcast, whose root is a group rank.
            self._group.broadcast(tensor.detach().contiguous().cpu(), 0).wait()

    def close(self) -> None:
        self._group = None


class NcclWeightSender:
    """Trainer rank 0's end of vLLM's NCCL weight-transfer group."""

    def __init__(self, host: str, port: int, world_size: int, timeout_s: float) -> None:
        from vllm.distributed.weight_transfer.nccl_common import trainer_init

        del timeout_s  # PyNccl has no timeout; the controller bounds the call instead
        self._comm = trainer_init({"master_address": host, "master_port": port, "world_size": world_size}, rank=0)

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        stream = torch.cuda.current_stream()
        for _, tensor in named_tensors:
            self._comm.broadcast(tensor.detach().contiguous(), src=0, stream=stream)
        stream.synchronize()

    def close(self) -> None:
        self._comm = None


def make_sender(transport: str, host: str, port: int, world_size: int, timeout_s: float) -> WeightSender:
    senders = {"gloo": GlooWeightSender, "nccl": NcclWeightSender}
    return senders[transport](host, port, world_size, timeout_s)


# ----------------------------------------------------------------------------- vLLM side


def register_vllm_plugin() -> None:
    """Entry point (``vllm.general_plugins``): register the gloo backend in this process."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    if GLOO_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(GLOO_BACKEND, "rlhf_dist.vllm_gloo", "GlooWeightTransferEngine")
