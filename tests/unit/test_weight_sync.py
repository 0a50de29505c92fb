"""rlhf_dist.weight_sync: the payloads sent to the engines (update and init info, merged IPC handles),
and a broadcast that fails (a real gloo group; the NCCL deadline on a stand-in communicator).
The verification probe and gap measure are tested in test_weight_verification.py."""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time

import pytest
import torch

from rlhf_dist.weight_sync import (
    AbortableComm,
    GlooWeightSender,
    ParamSpec,
    bucket_bounds,
    engine_init_info,
    merge_ipc_handles,
    update_info,
)


def test_weight_sync_payloads():
    specs = [ParamSpec("model.embed_tokens.weight", "float32", (512, 128)), ParamSpec("lm_head.weight", "bfloat16", (512, 128))]
    assert [s.nbytes for s in specs] == [512 * 128 * 4, 512 * 128 * 2]
    expected = {
        "names": ["model.embed_tokens.weight", "lm_head.weight"],
        "dtype_names": ["float32", "bfloat16"],
        "shapes": [[512, 128], [512, 128]],
    }
    assert update_info(specs, "nccl", 2**20) == expected
    assert update_info(specs, "gloo", 2**20) == {**expected, "bucket_bytes": 2**20}
    gloo = engine_init_info("gloo", "127.0.0.1", 1234, 3, 5, 60.0, 2**20)
    assert gloo == {"master_address": "127.0.0.1", "master_port": 1234, "rank_offset": 3, "world_size": 5, "timeout_s": 60.0}
    nccl = engine_init_info("nccl", "127.0.0.1", 1234, 3, 5, 60.0, 0)
    assert nccl["packed"] is False and nccl["timeout_s"] == 60.0  # PyNccl has no timeout: our engine bounds it
    packed = engine_init_info("nccl", "127.0.0.1", 1234, 3, 5, 60.0, 2**20)
    assert packed["packed"] is True and packed["packed_buffer_size_bytes"] == 2**20
    assert engine_init_info("ipc", "127.0.0.1", 1234, 3, 5, 60.0, 2**20) == {"packed": False}


def test_the_nccl_init_payload_is_what_our_nccl_engine_parses():
    from rlhf_dist.vllm_engines import NcclEngine

    payload = engine_init_info("nccl", "10.0.0.1", 1234, 3, 5, 60.0, 2**20)
    info = NcclEngine.init_info_cls(**payload)  # what vLLM's parse_init_info does in the engine's worker
    assert (info.master_address, info.rank_offset, info.world_size, info.timeout_s) == ("10.0.0.1", 3, 5, 60.0)
    assert info.packed and info.packed_buffer_size_bytes == 2**20


def test_bucket_bounds_group_consecutive_tensors_up_to_the_bucket_size():
    # sizes 4, 4, 3, 9, 1, 1 in buckets of 8: 4 + 4 = 8 fits; 3 alone would fit with 9? no (12): [3];
    # 9 is larger than a bucket: alone; 1 + 1
    assert bucket_bounds([4, 4, 3, 9, 1, 1], 8) == [(0, 2), (2, 3), (3, 4), (4, 6)]
    assert bucket_bounds([4, 4, 3], 0) == [(0, 1), (1, 2), (2, 3)]  # 0: one tensor each
    assert bucket_bounds([4, 4, 3], 100) == [(0, 3)]
    assert bucket_bounds([], 8) == []


def test_merge_ipc_handles_gives_every_gpu_its_handle_per_parameter():
    rank0 = [{"GPU-a": ("embed", 0)}, {"GPU-a": ("head", 0)}]
    rank1 = [{"GPU-b": ("embed", 1)}, {"GPU-b": ("head", 1)}]
    assert merge_ipc_handles([rank0, rank1]) == [
        {"GPU-a": ("embed", 0), "GPU-b": ("embed", 1)},
        {"GPU-a": ("head", 0), "GPU-b": ("head", 1)},
    ]
    with pytest.raises(ValueError, match=r"different parameter counts: \[2, 1\]"):
        merge_ipc_handles([rank0, rank1[:1]])


# ----------------------------------------------------------------------------- a failed broadcast

SPECS = [ParamSpec(f"layer{i}.weight", "float32", (64, 64)) for i in range(6)]  # 16 KiB each
BUCKET = 2 * 16 * 2**10  # two tensors per bucket: 3 buckets
TENSORS = {s.name: torch.full(s.shape, float(i + 1)) for i, s in enumerate(SPECS)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Recorder:
    """An engine's model: keeps a copy of what it loads; ``exit_on_load`` makes its process die
    once the first bucket is in (an engine lost mid-sync)."""

    def __init__(self, exit_on_load: bool = False) -> None:
        self.loaded: dict[str, torch.Tensor] = {}
        self.exit_on_load = exit_on_load

    def load_weights(self, weights) -> None:
        if self.exit_on_load:
            import os

            os._exit(1)
        self.loaded.update((name, tensor.clone()) for name, tensor in weights)


def _engine(rounds: list[tuple[int, int, int, float]], exit_on_load: bool, results) -> None:
    """An engine worker (our real gloo engine, its model a ``_Recorder``) taking part in ``rounds``
    of (port, group rank, world size, timeout): each joins the group, receives one update, leaves
    it; it reports (rank, "ok", what it loaded, as lists) or (rank, error, seconds, whether the reload was finished)."""
    from types import SimpleNamespace

    from rlhf_dist.vllm_engines import GlooInitInfo, GlooWeightTransferEngine

    engine = GlooWeightTransferEngine.__new__(GlooWeightTransferEngine)
    engine.device, engine._buckets, engine._group = torch.device("cpu"), {}, None
    engine.parallel_config = SimpleNamespace(data_parallel_index=0, world_size=1, rank=0)
    finished = []
    engine.finish_weight_update = lambda: finished.append(True)  # the reload lifecycle needs a vLLM model
    for port, rank, world, timeout_s in rounds:
        engine.model = _Recorder(exit_on_load)
        engine.init_transfer_engine(GlooInitInfo(master_address="127.0.0.1", master_port=port, rank_offset=rank,
                                                 world_size=world, timeout_s=timeout_s))
        started = time.monotonic()
        try:
            engine.update_weights(update_info(SPECS, "gloo", BUCKET))
            results.put((rank, "ok", {name: t.tolist() for name, t in engine.model.loaded.items()}))
        except RuntimeError as e:  # gloo's errors
            results.put((rank, str(e), time.monotonic() - started, bool(finished)))
        engine.shutdown()


def test_an_engine_lost_mid_sync_fails_the_broadcast_at_once_and_a_new_group_carries_the_next():
    """Trainer rank 0 (this process) broadcasts 3 buckets to two engine processes over gloo; engine 1
    dies once bucket 1 is in. The sender fails at bucket 2 at once ("Connection closed by peer"), still
    draws every tensor (under ZeRO-3 each bucket is a gather its peers take part in) and closes the
    group; the surviving engine's receive fails too, within the group's timeout, its reload finished. Then,
    as a recovery does, a new group (a replacement engine and the survivor, rejoined) gets everything."""
    import rlhf_dist.vllm_engines  # noqa: F401  (imported once, here: the forked engines start with it)

    first, second = _free_port(), _free_port()
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    lost = fork.Process(target=_engine, args=([(first, 1, 3, 2.0)], True, results))
    survivor = fork.Process(target=_engine, args=([(first, 2, 3, 2.0), (second, 2, 3, 60.0)], False, results))
    replacement = fork.Process(target=_engine, args=([(second, 1, 3, 60.0)], False, results))
    for process in (lost, survivor, replacement):  # before this process opens a gloo group (and its threads)
        process.start()
    try:
        drawn = []

        def tensors():
            for i, (name, tensor) in enumerate(TENSORS.items()):
                if i == 2:  # bucket 2 goes out only once engine 1 is gone
                    lost.join(timeout=30)
                drawn.append(name)
                yield name, tensor

        sender = GlooWeightSender("127.0.0.1", first, 3, 2.0, SPECS, BUCKET)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"^weight broadcast to the engines failed at bucket 2 of 3 \(gloo group "
                           rf"at 127\.0\.0\.1:{first}\): RuntimeError: Connection closed by peer \[127\.0\.0\.1\]"):
            sender.send(tensors())
        assert time.monotonic() - started < 1.5  # at once, not at the 2 s timeout
        assert lost.exitcode == 1 and drawn == list(TENSORS)  # every tensor drawn all the same
        drawn.clear()
        with pytest.raises(RuntimeError, match=r"gloo group at .* was closed after a failed broadcast"):
            sender.send(tensors())  # a sync without a new group fails too, and draws every tensor
        assert drawn == list(TENSORS)

        # Gloo connects every pair: the survivor sees engine 1's connection close, or else times out.
        rank, error, seconds, finished = results.get(timeout=30)
        assert rank == 2 and ("Connection closed by peer" in error or "Timed out waiting 2000ms" in error), error
        assert seconds < 10 and finished

        sender = GlooWeightSender("127.0.0.1", second, 3, 60.0, SPECS, BUCKET)
        sender.send(iter(TENSORS.items()))
        sender.close()
        for _ in range(2):
            rank, status, loaded = results.get(timeout=60)
            assert status == "ok" and loaded.keys() == TENSORS.keys(), rank
            assert all(torch.equal(torch.tensor(loaded[name]), tensor) for name, tensor in TENSORS.items()), rank
    finally:
        for process in (lost, survivor, replacement):
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


class _StuckComm:
    """A PyNccl communicator with a peer lost mid-broadcast: what the host waits on (``done``) is
    released only by an abort, as NCCL's kernels return only then."""

    def __init__(self) -> None:
        self.done, self.sent, self.destroyed = threading.Event(), 0, 0

    def broadcast(self, tensor: torch.Tensor, src: int, stream=None) -> None:
        self.sent += 1

    def destroy(self) -> None:
        self.destroyed += 1
        self.done.set()


def test_an_nccl_transfer_past_its_deadline_is_aborted_and_raises_one_line():
    stuck = _StuckComm()
    comm = AbortableComm(stuck, "NCCL group at 10.0.0.1:1234")
    comm.within(30.0, "weight broadcast to the engines", lambda: comm.broadcast(torch.ones(1), src=0))
    assert (stuck.sent, stuck.destroyed) == (1, 0)  # in time: nothing aborted

    def stuck_transfer():
        comm.broadcast(torch.ones(1), src=0)
        stuck.done.wait()  # the stream synchronize

    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^weight broadcast to the engines did not finish within 0\.3s \(NCCL group "
                       r"at 10\.0\.0\.1:1234\): a peer was lost or stopped; the communicator was aborted$"):
        comm.within(0.3, "weight broadcast to the engines", stuck_transfer)
    assert time.monotonic() - started < 5 and stuck.destroyed == 1  # the abort ended the wait
    with pytest.raises(RuntimeError, match="the communicator of the NCCL group at 10.0.0.1:1234 was aborted"):
        comm.broadcast(torch.ones(1), src=0)  # not PyNccl's silent no-op on a destroyed communicator
    comm.destroy()  # vLLM's shutdown after an abort: nothing more to do
    assert (stuck.sent, stuck.destroyed) == (2, 1)
