"""rlhf_dist.weight_sync: the payloads each transport sends the engines (update and init info,
merged IPC handles), a broadcast that fails (a real gloo group; the NCCL deadline on a stand-in
communicator), and vLLM kept out of the trainer and the controller. The verification probe and gap
measure are tested in test_weight_verification.py; the registry entries in test_registry.py."""

from __future__ import annotations

import multiprocessing
import socket
import subprocess
import sys
import threading
import time
import tomllib

import pytest
import torch

from rlhf_dist.weight_sync.gloo import TRANSPORT as GLOO
from rlhf_dist.weight_sync.gloo import GlooInitInfo, GlooWeightSender
from rlhf_dist.weight_sync.ipc import TRANSPORT as IPC
from rlhf_dist.weight_sync.ipc import merge_ipc_handles
from rlhf_dist.weight_sync.nccl import TRANSPORT as NCCL
from rlhf_dist.weight_sync.nccl import AbortableComm
from rlhf_dist.weight_sync.transport import ParamSpec, bucket_bounds
from tests.conftest import REPO


def test_weight_sync_payloads():
    specs = [ParamSpec("model.embed_tokens.weight", "float32", (512, 128)), ParamSpec("lm_head.weight", "bfloat16", (512, 128))]
    assert [s.nbytes for s in specs] == [512 * 128 * 4, 512 * 128 * 2]
    expected = {
        "names": ["model.embed_tokens.weight", "lm_head.weight"],
        "dtype_names": ["float32", "bfloat16"],
        "shapes": [[512, 128], [512, 128]],
    }
    assert NCCL.update_info(specs, 2**20) == IPC.update_info(specs, 2**20) == expected
    assert GLOO.update_info(specs, 2**20) == {**expected, "bucket_bytes": 2**20}  # the receiver cuts the same buckets
    gloo = GLOO.engine_init_info("127.0.0.1", 1234, 3, 5, 60.0, 2**20)
    assert gloo == {"master_address": "127.0.0.1", "master_port": 1234, "rank_offset": 3, "world_size": 5, "timeout_s": 60.0}
    nccl = NCCL.engine_init_info("127.0.0.1", 1234, 3, 5, 60.0, 0)
    assert nccl["packed"] is False and nccl["timeout_s"] == 60.0  # PyNccl has no timeout: our engine bounds it
    packed = NCCL.engine_init_info("127.0.0.1", 1234, 3, 5, 60.0, 2**20)
    assert packed["packed"] is True and packed["packed_buffer_size_bytes"] == 2**20
    assert IPC.engine_init_info("127.0.0.1", 1234, 3, 5, 60.0, 2**20) == {"packed": False}
    assert IPC.with_handles(expected, [[{"GPU-a": ("embed", 0)}, {"GPU-a": ("head", 0)}]]) == {
        **expected, "ipc_handles": [{"GPU-a": ("embed", 0)}, {"GPU-a": ("head", 0)}],
    }


def test_the_nccl_init_payload_is_what_our_nccl_engine_parses():
    payload = NCCL.engine_init_info("10.0.0.1", 1234, 3, 5, 60.0, 2**20)
    info = NCCL.engine_class().init_info_cls(**payload)  # what vLLM's parse_init_info does in the engine's worker
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

    engine_class = GLOO.engine_class()  # made by the parent before the fork (cached)
    engine = engine_class.__new__(engine_class)
    engine.device, engine._buckets, engine._group = torch.device("cpu"), {}, None
    engine.parallel_config = SimpleNamespace(data_parallel_index=0, world_size=1, rank=0)
    finished = []
    engine._finalize = lambda: finished.append(True) or []  # the reload lifecycle needs a vLLM model
    for port, rank, world, timeout_s in rounds:
        engine.model = _Recorder(exit_on_load)
        engine.init_transfer_engine(GlooInitInfo(master_address="127.0.0.1", master_port=port, rank_offset=rank,
                                                 world_size=world, timeout_s=timeout_s))
        started = time.monotonic()
        try:
            engine.update_weights(GLOO.update_info(SPECS, BUCKET))
            results.put((rank, "ok", {name: t.tolist() for name, t in engine.model.loaded.items()}))
        except RuntimeError as e:  # gloo's errors
            results.put((rank, str(e), time.monotonic() - started, bool(finished)))
        engine.shutdown()


def test_an_engine_lost_mid_sync_fails_the_broadcast_at_once_and_a_new_group_carries_the_next():
    """Trainer rank 0 (this process) broadcasts 3 buckets to two engine processes over gloo; engine 1
    dies once bucket 1 is in. The sender fails at bucket 2 at once (well before the group's timeout) ("Connection closed by peer"), still
    draws every tensor (under ZeRO-3 each bucket is a gather its peers take part in) and closes the
    group; the surviving engine's receive fails too, within the group's timeout, its reload finished. Then,
    as a recovery does, a new group (a replacement engine and the survivor, rejoined) gets everything."""
    GLOO.engine_class()  # made once, here (it imports vLLM): the forked engines start with it

    first, second = _free_port(), _free_port()
    fork = multiprocessing.get_context("fork")
    results = fork.Queue()
    lost = fork.Process(target=_engine, args=([(first, 1, 3, 10.0)], True, results))
    survivor = fork.Process(target=_engine, args=([(first, 2, 3, 10.0), (second, 2, 3, 60.0)], False, results))
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

        sender = GlooWeightSender("127.0.0.1", first, 3, 10.0, SPECS, BUCKET)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"^weight broadcast to the engines failed at bucket 2 of 3 \(gloo group "
                           rf"at 127\.0\.0\.1:{first}\): RuntimeError: Connection closed by peer \[127\.0\.0\.1\]"):
            sender.send(tensors())
        # At once, not at the group's 10 s timeout (the margin is wide: a loaded CI machine is slow).
        assert time.monotonic() - started < 5
        assert lost.exitcode == 1 and drawn == list(TENSORS)  # every tensor drawn all the same
        drawn.clear()
        with pytest.raises(RuntimeError, match=r"gloo group at .* was closed after a failed broadcast"):
            sender.send(tensors())  # a sync without a new group fails too, and draws every tensor
        assert drawn == list(TENSORS)

        # Gloo connects every pair: the survivor sees engine 1's connection close, or else times out.
        rank, error, seconds, finished = results.get(timeout=60)
        assert rank == 2 and ("Connection closed by peer" in error or "Timed out waiting 10000ms" in error), error
        assert seconds < 20 and finished

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


def test_the_trainer_and_controller_sides_of_every_transport_import_no_vllm():
    # An engine class derives from vLLM's engine base, so it is made on first use in the engine's
    # worker: the trainer and the controller import every transport's payloads and trainer side
    # without vLLM (rank 0's group senders import vLLM's group helpers only to open a group).
    code = (
        "import sys\n"
        "import rlhf_dist.roles.groups, rlhf_dist.roles.trainer\n"
        "from rlhf_dist.registry import TRANSPORTS\n"
        "from rlhf_dist.weight_sync.transport import HandleTransport, ParamSpec, load_transport\n"
        "specs = [ParamSpec('w', 'float32', (2, 2))]\n"
        "for name in TRANSPORTS:\n"
        "    transport = load_transport(name)\n"
        "    transport.update_info(specs, 64), transport.engine_init_info('h', 1, 1, 2, 1.0, 64)\n"
        "    if isinstance(transport, HandleTransport):\n"
        "        transport.exporter(), transport.with_handles({}, [[{'GPU-a': ()}]])\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'vllm'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_the_installed_vllm_plugin_entry_is_the_one_in_pyproject_and_resolves():
    # vLLM loads this entry point in every engine process, and Ray workers run from the repository
    # root, where pip's rlhf_dist.egg-info wins over the venv's metadata: an install older than the
    # code (its target a module that is gone) leaves every engine without our backends.
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    code = ("from importlib.metadata import entry_points\n"
            "[plugin] = [e for e in entry_points(group='vllm.general_plugins') if e.name == 'rlhf_dist_gloo']\n"
            "print(plugin.value)\n"
            "plugin.load()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO)
    assert out.returncode == 0, f"reinstall the package (pip install -e .): {out.stderr.strip()[-300:]}"
    assert out.stdout.strip() == declared["vllm.general_plugins"]["rlhf_dist_gloo"], "reinstall (pip install -e .)"
