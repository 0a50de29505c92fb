"""Security defaults (docs/reliability.md, "Security defaults"): weights as safetensors, checkpoints
loaded without unpickling code, the HTTP reward endpoint contacted only when enabled, and the W&B
key never written. The local Ray cluster's defaults: tests/integration/test_ray_security.py."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import pytest
import torch

from rlhf_dist.config import ConfigError, LoggerConfig, RewardConfig, as_dict, validate_config
from rlhf_dist.roles.reward import RewardError
from tests.conftest import compose_config, local_scorer

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".ckpt"}  # torch.load / pickle formats that can run code


def weight_files(model_dir: Path) -> tuple[list[str], list[str]]:
    files = sorted(p.name for p in model_dir.rglob("*") if p.is_file())
    return [f for f in files if f.endswith(".safetensors")], [f for f in files if Path(f).suffix in PICKLE_SUFFIXES]


def test_models_are_written_as_safetensors(tiny_policy, tiny_reward_model, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from rlhf_dist.models.modeling import load_causal_lm, write_model_dir

    for built in (tiny_policy, tiny_reward_model):  # the embedded models
        assert weight_files(Path(built)) == (["model.safetensors"], [])
    # What the trainer's save does: a full state dict through save_pretrained, inside write_model_dir.
    model = load_causal_lm(tiny_policy, "float32")
    state = {name: p.detach().clone() for name, p in model.named_parameters()}

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, state_dict=state)
        AutoTokenizer.from_pretrained(tiny_policy).save_pretrained(tmp)

    saved = write_model_dir(tmp_path / "policy", write)
    assert weight_files(saved) == (["model.safetensors"], [])
    with safe_open(str(saved / "model.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == sorted(state)
    reloaded = dict(load_causal_lm(str(saved), "float32").named_parameters())
    assert all(torch.equal(reloaded[name], value) for name, value in state.items())


def test_http_reward_config_needs_weight_and_url():
    with pytest.raises(ConfigError) as excinfo:
        validate_config(compose_config(["reward=http"]))  # weight 1, no URL
    assert str(excinfo.value) == "reward.http_url='': required when reward.http_weight=1.0"
    # A URL with weight 0 is valid, and never contacted (next test).
    validate_config(compose_config(["reward.http_weight=0", "reward.http_url=http://127.0.0.1:9/score"]))


def test_http_endpoint_is_contacted_only_when_its_weight_is_not_zero():
    # A listening socket that never answers: a connection attempt would wait in its backlog.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/score"
        off = local_scorer(RewardConfig(http_weight=0.0, http_url=url))
        # the default function alone: words great, soup, and, bread; 2 x 1 positive / 4 words = 0.5
        assert off.score(["the soup was"], [" great soup and bread"], [{}]) == [0.5]
        with pytest.raises(BlockingIOError):
            listener.accept()
        # The probe sees a contact: with weight 1 the scorer connects, then times out waiting for an answer.
        on = local_scorer(RewardConfig(http_weight=1.0, http_url=url, http_timeout_s=0.2, http_retries=0))
        with pytest.raises(RewardError, match="failed after 1 attempts"):
            on.score(["p"], ["r"], [{}])
        conn, _ = listener.accept()
        conn.close()


SECRET = "some-secret-4c1f0e9b"
MARKER = "config-marker-8d2a"


def readable_bytes(path: Path) -> bytes:
    """A file's bytes; for a ``.wandb`` log also its records reassembled, since a record that crosses a
    32 KiB block is stored in pieces and a string in it may be split."""
    from tests.wandb_reader import _records

    data = path.read_bytes()
    if path.suffix == ".wandb":
        data += b"".join(rec.SerializeToString() for _, rec in _records(data))
    return data


def test_wandb_api_key_is_never_written_or_printed(tmp_path, monkeypatch, capfd):
    from rlhf_dist.config import Config
    from rlhf_dist.driver.run_logger import RunLogger
    from tests.wandb_reader import read_offline_run

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                     ("WANDB_ARTIFACT_DIR", "artifacts")):
        monkeypatch.setenv(var, str(tmp_path / sub))  # everything W&B writes lands under tmp_path
    config = {**as_dict(Config()), "note": MARKER}
    logger = RunLogger(LoggerConfig(backend="wandb", mode="offline", progress_bar=False), tmp_path / "run", config,
                       total_steps=1, group="")
    logger.log(0, {"reward/mean": 0.5})
    logger.finish("completed")
    # wandb-core writes the .wandb log asynchronously: this waits for its final record.
    assert read_offline_run(tmp_path / "run" / "wandb")["config"]["note"] == MARKER

    def files_containing(text: str) -> list[str]:
        return sorted(p.name for p in tmp_path.rglob("*") if p.is_file() and text.encode() in readable_bytes(p))

    # The walk reads what W&B wrote: the config marker is found in the offline run's .wandb log ...
    assert any(name.endswith(".wandb") for name in files_containing(MARKER))
    # ... and the key is in no file, and was not printed.
    assert files_containing(SECRET) == []
    out, err = capfd.readouterr()
    assert SECRET not in out and SECRET not in err


class _RunsCode:
    """Unpickling this calls os.system: what a tampered checkpoint file would do."""

    def __reduce__(self):
        import os

        return (os.system, ("touch " + str(Path.cwd() / "PWNED"),))


def test_trainer_checkpoints_load_without_unpickling_code(tmp_path, monkeypatch):
    # The DeepSpeed checkpoint engine the trainer installs loads with weights_only=True: tensors,
    # containers and DeepSpeed's own plain state classes load; any other object is refused.
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from rlhf_dist.roles.zero_rank import safe_checkpoint_engine

    engine = safe_checkpoint_engine(None)
    state = {"optimizer_state_dict": {"state": {0: {"exp_avg": torch.ones(2)}}}, "loss_scaler": LossScaler(1.0),
             "zero_stage": ZeroStageEnum.gradients, "ds_version": "0.19.8"}
    torch.save(state, tmp_path / "optim_states.pt")
    loaded = engine.load(str(tmp_path / "optim_states.pt"))
    assert torch.equal(loaded["optimizer_state_dict"]["state"][0]["exp_avg"], torch.ones(2))
    assert loaded["zero_stage"] == ZeroStageEnum.gradients and loaded["loss_scaler"].cur_scale == 1.0

    monkeypatch.chdir(tmp_path)
    torch.save({"module": _RunsCode()}, tmp_path / "tampered.pt")
    with pytest.raises(pickle.UnpicklingError, match="unsupported GLOBAL posix.system"):
        engine.load(str(tmp_path / "tampered.pt"))
    assert not (tmp_path / "PWNED").exists()
