"""Checkpoint directories (manifest, verification, atomic commit, keep-last, resume resolution),
the controller state round trip, and how the run logger continues a run."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rlhf_dist.checkpoint import (
    CheckpointDir,
    Checkpointer,
    CheckpointError,
    TrainState,
    config_changes,
    read_state,
    reshard_kind,
    reshard_line,
    restore_controller_rng,
    verify,
    write_state,
)
from rlhf_dist.config import CheckpointConfig, LoggerConfig, as_dict
from rlhf_dist.driver.run_logger import RunLogger


def _make(root, step: int, payload: bytes = b"weights") -> None:
    """A complete checkpoint of ``step`` as ``CheckpointDir`` writes one."""
    ckpts = CheckpointDir(root, keep_last=10)
    tmp = ckpts.begin(step)
    (tmp / "policy_ds").mkdir()
    (tmp / "policy_ds" / "part.pt").write_bytes(payload)
    write_state(tmp, TrainState(step=step, kl_controller={"value": 0.05}))
    (tmp / "config.json").write_text("{}")
    ckpts.commit(tmp, step)


def test_manifest_verifies_and_catches_damage(tmp_path):
    _make(tmp_path, 3)
    path = tmp_path / "step_000003"
    assert verify(path) == ""
    manifest = json.loads((path / "manifest.json").read_text())["files"]
    assert set(manifest) == {"policy_ds/part.pt", "state.json", "config.json", "controller_rng.safetensors"}
    assert manifest["policy_ds/part.pt"]["bytes"] == len(b"weights")

    (path / "policy_ds" / "part.pt").write_bytes(b"weightz")  # same size, other content
    assert verify(path) == "policy_ds/part.pt does not match its checksum"
    (path / "policy_ds" / "part.pt").unlink()
    assert verify(path) == "missing files: policy_ds/part.pt"
    (path / "manifest.json").unlink()
    assert verify(path) == "no readable manifest.json (FileNotFoundError)"


def test_latest_skips_a_damaged_checkpoint_with_a_warning(tmp_path):
    _make(tmp_path, 2)
    _make(tmp_path, 4)
    (tmp_path / "step_000004" / "state.json").write_text("{}")
    warnings: list[str] = []
    ckpts = CheckpointDir(tmp_path, keep_last=2, warn=warnings.append)
    assert ckpts.latest() == tmp_path / "step_000002"
    assert warnings == [f"skipping checkpoint {tmp_path / 'step_000004'}: state.json does not match its checksum"]


def test_commit_is_a_rename_and_keeps_the_last_ones(tmp_path):
    ckpts = CheckpointDir(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        tmp = ckpts.begin(step)
        assert tmp.name == f".tmp-step_00000{step}" and not (tmp_path / f"step_00000{step}").exists()
        write_state(tmp, TrainState(step=step))
        (tmp / "config.json").write_text("{}")
        assert ckpts.commit(tmp, step) == tmp_path / f"step_00000{step}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000002", "step_000003"]
    # A crash mid-write leaves a temporary directory: never taken for a checkpoint, removed by the next one.
    (ckpts.begin(4) / "half-written").write_text("x")
    assert ckpts.latest() == tmp_path / "step_000003"
    assert list(ckpts.begin(4).iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-step_000004", "step_000002", "step_000003"]


def test_resolve(tmp_path):
    ckpts = CheckpointDir(tmp_path / "checkpoints", keep_last=2)
    assert ckpts.resolve("") is None
    assert ckpts.resolve("auto") is None  # no checkpoint yet: a new run
    _make(tmp_path / "checkpoints", 5)
    assert ckpts.resolve("auto") == tmp_path / "checkpoints" / "step_000005"
    assert ckpts.resolve(str(tmp_path / "checkpoints" / "step_000005")) == tmp_path / "checkpoints" / "step_000005"
    with pytest.raises(CheckpointError, match=r"^resume='/nowhere': not a usable checkpoint: no readable manifest"):
        ckpts.resolve("/nowhere")


def test_state_round_trip_restores_the_controller_rngs(tmp_path):
    state = TrainState(step=7, kl_controller={"value": 0.0731}, summary={"eval/initial_reward_mean": 0.25},
                       wandb_id="abc123")
    torch.manual_seed(11)
    random.seed(11)
    write_state(tmp_path, state)
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    assert read_state(tmp_path) == state
    restore_controller_rng(tmp_path)
    got = (torch.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and got[1] == expected[1]


def test_due_every_k_steps_and_at_the_end(tmp_path):
    checkpointer = Checkpointer(CheckpointConfig(every_steps=2), tmp_path, {})
    assert [s for s in range(1, 6) if checkpointer.due(s, total_steps=5)] == [2, 4, 5]
    assert not any(Checkpointer(CheckpointConfig(every_steps=0), tmp_path, {}).due(s, 5) for s in range(1, 6))
    assert checkpointer.dir.root == tmp_path / "checkpoints"


def _logger(out, **kwargs) -> RunLogger:
    return RunLogger(LoggerConfig(progress_bar=False), out, {}, total_steps=4, group="", **kwargs)


def test_logger_continues_a_run_and_keeps_redone_steps_aside(tmp_path):
    logger = _logger(tmp_path)
    for step in range(4):
        logger.log(step, {"reward/mean": float(step)})
        logger.table("rollout/samples", ["step", "prompt"], [[step, "p"]])
    logger.table("eval/samples", ["after_steps", "prompt"], [[2, "p"], [4, "p"]])
    logger.finish("failed")

    with pytest.raises(FileExistsError, match="continue it with resume=auto"):
        _logger(tmp_path)
    resumed = _logger(tmp_path, resume_step=2)
    assert [r["step"] for r in resumed.history] == [0, 1]
    read = lambda name: [json.loads(line) for line in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    assert [r["step"] for r in read("metrics.jsonl")] == [0, 1]
    assert [r["step"] for r in read("metrics.replaced.jsonl")] == [2, 3]
    assert [r["step"] for r in read("rollout_samples.jsonl")] == [0, 1]
    assert [r["after_steps"] for r in read("eval_samples.jsonl")] == [2]  # evaluated after step 1

    resumed.log(2, {"reward/mean": 20.0})
    resumed.rewind(1)  # an in-process restart from an earlier checkpoint
    resumed.log(1, {"reward/mean": 10.0})
    summary = resumed.finish("completed")
    assert [(r["step"], r["reward/mean"]) for r in read("metrics.jsonl")] == [(0, 0.0), (1, 10.0)]
    assert [r["step"] for r in read("metrics.replaced.jsonl")] == [2, 3, 1, 2]
    assert summary["steps"] == 2


def test_a_resume_from_an_earlier_checkpoint_sets_later_ones_aside(tmp_path):
    for step in (2, 4, 6):
        _make(tmp_path, step)
    ckpts = CheckpointDir(tmp_path, keep_last=3)
    assert ckpts.set_aside_after(2) == [tmp_path / "step_000006.superseded", tmp_path / "step_000004.superseded"]
    assert ckpts.latest() == tmp_path / "step_000002"
    assert verify(tmp_path / "step_000004.superseded") == ""  # kept whole


def test_committing_a_step_again_replaces_it(tmp_path):
    _make(tmp_path, 3, payload=b"first")
    _make(tmp_path, 3, payload=b"second")
    assert (tmp_path / "step_000003" / "policy_ds" / "part.pt").read_bytes() == b"second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003"]


def test_a_resume_is_checked_against_the_checkpointed_config():
    from tests.conftest import compose_config

    saved = as_dict(compose_config([]))
    # Longer, with other timeouts, logger and checkpointing: nothing computed changes.
    same = compose_config(["total_steps=40", "resume=auto", "timeouts.train_s=900", "logger=wandb",
                           "checkpoint.every_steps=5", "resources.num_cpus=16"])
    assert config_changes(saved, as_dict(same)) == []
    # Another KL coefficient or seed: allowed, reported (the run is no longer the checkpointed one).
    changed = compose_config(["algo.kl_coef=0.1", "seed=3"])
    assert config_changes(saved, as_dict(changed)) == ["algo.kl_coef: 0.05 -> 0.1", "seed: 0 -> 3"]
    # Another model cannot load the trainer's state.
    with pytest.raises(CheckpointError, match=r"^model.dtype='bfloat16': the checkpoint was written with "
                                              r"model.dtype='float32'; resume with that$"):
        config_changes(saved, as_dict(compose_config(["model.dtype=bfloat16"])))


def test_a_resume_onto_another_trainer_shape_converts_or_says_why_not():
    from tests.conftest import compose_config

    def shape(*overrides):
        return as_dict(compose_config(list(overrides)))

    zero2_on_2 = shape()  # the default: 2 ranks, ZeRO-2
    assert reshard_kind(zero2_on_2, shape()) == "" and reshard_line(zero2_on_2, shape()) == ""
    for other in (["trainer.world_size=1"], ["trainer=zero3"], ["trainer=zero1", "trainer.world_size=4"]):
        assert reshard_kind(zero2_on_2, shape(*other)) == "universal"
        assert config_changes(zero2_on_2, shape(*other)) == []  # announced by reshard_line, not as a change
    assert reshard_line(zero2_on_2, shape("trainer.world_size=1")) == (
        "rlhf_dist: the checkpoint's trainers ran on 2 ranks at ZeRO-2, this run's on 1 at ZeRO-2: their DeepSpeed "
        "state is converted to a universal checkpoint (kept beside it as policy_ds.universal/) and loaded onto the "
        "new shape")
    # ZeRO-0 holds the whole optimizer state on every rank: another world size loads it as it is ...
    zero0_on_2 = shape("trainer=zero0")
    assert reshard_kind(zero0_on_2, shape("trainer=zero0", "trainer.world_size=1")) == ""
    # ... but no ZeRO 1-3 shape converts from or to it (DeepSpeed's universal checkpoints cover ZeRO 1-3).
    for saved, resumed, old, new in ((zero0_on_2, shape(), 0, 2), (zero2_on_2, zero0_on_2, 2, 0)):
        with pytest.raises(CheckpointError, match=rf"^trainer.zero_stage={new}: the checkpoint was written with "
                                                  rf"trainer.zero_stage={old}, .*resume with trainer.zero_stage={old}$"):
            config_changes(saved, resumed)


def test_model_dir_is_replaced_only_when_asked_and_only_once_complete(tmp_path):
    from rlhf_dist.models.modeling import write_model_dir

    write_model_dir(tmp_path / "policy", lambda d: (d / "model.safetensors").write_text("v1"))
    with pytest.raises(FileExistsError, match="refusing to overwrite a saved model"):
        write_model_dir(tmp_path / "policy", lambda d: (d / "model.safetensors").write_text("v2"))

    def fails(d):
        (d / "model.safetensors").write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_model_dir(tmp_path / "policy", fails, replace=True)
    assert (tmp_path / "policy" / "model.safetensors").read_text() == "v1"  # the old one is untouched
    write_model_dir(tmp_path / "policy", lambda d: (d / "model.safetensors").write_text("v2"), replace=True)
    assert (tmp_path / "policy" / "model.safetensors").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy"]
