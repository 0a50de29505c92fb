"""The pure parts of weight-sync verification: the probe, the gap measure, the tie finder, the gap watch."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rlhf_dist.config import LOGPROB_TOLERANCE, LoggerConfig, WeightSyncConfig
from rlhf_dist.driver.metrics import GapWatch
from rlhf_dist.driver.run_logger import RunLogger
from rlhf_dist.weight_sync.verify import ProbeGap, probe_sequences, worst_probe_gap


def test_probe_is_fixed_by_the_seed_and_inside_the_vocabulary():
    a, b = probe_sequences(50, 4, seed=7), probe_sequences(50, 4, seed=7)
    assert a == b and len(a) == 4 and all(len(s) == 24 for s in a)
    assert all(0 <= t < 50 for s in a for t in s)
    assert probe_sequences(50, 4, seed=8) != a


def test_worst_probe_gap_is_the_largest_mean_over_a_sequence():
    trainer = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])  # row 1 has 2 tokens (then padding)
    engines = [
        [[-1.0, -2.0, -3.0], [-0.5, -0.5]],  # engine 0: exact
        # engine 1: sequence 0 off by (0.3 + 0 + 0) / 3 = 0.1; sequence 1 by (0.2 + 0.4) / 2 = 0.3
        [[-1.3, -2.0, -3.0], [-0.7, -0.1]],
    ]
    worst = worst_probe_gap(engines, trainer)
    assert (worst.engine, worst.sequence) == (1, 1)
    assert worst.gap == pytest.approx(0.3, abs=1e-6)
    assert worst_probe_gap(engines[:1], trainer) == ProbeGap(0, 0, 0.0)


def test_a_nan_logprob_is_the_worst_gap():
    trainer = torch.tensor([[-1.0], [-1.0]])
    worst = worst_probe_gap([[[-1.0], [float("nan")]], [[-9.0], [-9.0]]], trainer)
    assert (worst.engine, worst.sequence) == (0, 1) and math.isnan(worst.gap)


class _Head(nn.Module):
    def __init__(self, weight: nn.Parameter) -> None:
        super().__init__()
        self.weight = weight
        self.quant_method = object()  # what vLLM layers carry; plain modules have none


def test_tied_modules_are_those_sharing_a_parameter():
    from rlhf_dist.weight_sync.reload import tied_modules

    shared = nn.Parameter(torch.zeros(4, 2))
    model = nn.ModuleDict({
        "embed": _Head(shared), "head": _Head(shared), "other": _Head(nn.Parameter(torch.zeros(2))),
        "plain": nn.Linear(2, 2),
    })
    assert tied_modules(model) == [model["embed"], model["head"]]
    model["head"] = _Head(nn.Parameter(torch.zeros(4, 2)))  # untied
    assert tied_modules(model) == []


def test_tolerances_by_dtype_unless_set():
    cfg = WeightSyncConfig()
    assert cfg.tolerance("float32") == LOGPROB_TOLERANCE["float32"] == 1e-3
    assert cfg.gap_threshold("bfloat16") == LOGPROB_TOLERANCE["bfloat16"]
    assert WeightSyncConfig(verify_tol=0.02, gap_warn=0.5).tolerance("float32") == 0.02
    assert WeightSyncConfig(verify_tol=0.02, gap_warn=0.5).gap_threshold("float32") == 0.5


def test_gap_watch_warns_once_and_keeps_the_largest_gap(tmp_path, capsys):
    logger = RunLogger(LoggerConfig(progress_bar=False), tmp_path, {}, 4, "")
    watch = GapWatch(1e-3, logger)
    for step, gap in enumerate([2e-7, 2.4e-2, 3.1e-2, 1e-7]):
        watch.observe(step, gap)
    summary = logger.finish("completed")
    out = capsys.readouterr().out
    assert out.count("warning") == 1
    assert "step 1: logprob_gap/mean 0.024 > 0.001" in out
    assert summary["logprob_gap/max"] == 3.1e-2


def test_every_transport_resolves_to_an_engine_behind_the_one_reload_lifecycle():
    # What vLLM's factory does inside every engine process: look the backend up, load the class.
    from vllm.distributed.weight_transfer.base import WeightTransferEngine
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    from rlhf_dist.registry import TRANSPORTS
    from rlhf_dist.weight_sync.plugin import register_vllm_plugin
    from rlhf_dist.weight_sync.reload import CheckpointReload

    register_vllm_plugin()
    bases = {"nccl": NCCLWeightTransferEngine, "ipc": IPCWeightTransferEngine}  # vLLM's own engines underneath
    for transport, entry in TRANSPORTS.items():
        engine = WeightTransferEngineFactory._registry[entry.vllm_backend]()
        assert issubclass(engine, bases.get(transport, WeightTransferEngine)) and issubclass(engine, CheckpointReload)
        assert engine.start_weight_update is CheckpointReload.start_weight_update
        assert engine.finish_weight_update is CheckpointReload.finish_weight_update
