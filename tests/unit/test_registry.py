"""rlhf_dist.registry: every built-in task entry resolves to its Task and every weight-sync
transport entry to its Transport, the traits config reads without importing them match what they
are, and what config, data, model loading and vLLM offer are exactly the registry's entries (a
registry of strings cannot rot unseen)."""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import pytest

from rlhf_dist.config import BUILTIN_PROMPTS, BUILTIN_SUPERVISED, ConfigError, DataConfig, ResourcesConfig
from rlhf_dist.driver.data import DataError, builtin_prompt_rows, load_sft
from rlhf_dist.models import tiny as tiny_model
from rlhf_dist.models.modeling import resolve_model_path
from rlhf_dist.registry import TASKS, TRANSPORTS
from rlhf_dist.tasks.base import Task, load_task
from rlhf_dist.weight_sync.transport import GroupTransport, HandleTransport, load_transport
from tests.conftest import REPO, compose_config


@pytest.mark.parametrize("name", list(TASKS))
def test_every_entry_resolves_to_a_task_whose_traits_it_states(name):
    task, entry = load_task(name), TASKS[name]
    assert isinstance(task, Task) and task.name == name
    assert entry.model == task.model
    assert entry.supervised is (task.supervised_rows is not None)


def test_names_are_unique_and_unknown_names_are_refused():
    models = [entry.model for entry in TASKS.values()]
    caches = [load_task(name).recipe.name for name in TASKS]
    assert len(set(models)) == len(models) and len(set(caches)) == len(caches)  # one policy per name, per directory
    with pytest.raises(ValueError, match=r"unknown task 'poems': use one of reviews, "):
        load_task("poems")


def test_config_offers_the_registry_tasks_as_builtin_sources():
    assert BUILTIN_PROMPTS == tuple(f"builtin:{name}" for name in TASKS)
    assert BUILTIN_SUPERVISED == tuple(f"builtin:{name}" for name, entry in TASKS.items() if entry.supervised)
    for name, entry in TASKS.items():
        DataConfig(prompts=f"builtin:{name}", eval_prompts=f"builtin:{name}").validate()
        if entry.supervised:
            DataConfig(sft=f"builtin:{name}", preferences=f"builtin:{name}").validate()
        else:
            with pytest.raises(ConfigError, match=rf"data\.sft='builtin:{name}'"):
                DataConfig(sft=f"builtin:{name}").validate()


@pytest.mark.parametrize("name", list(TASKS))
def test_builtin_prompts_come_from_the_task(name):
    rows = builtin_prompt_rows(f"builtin:{name}", 4, 0, "test")
    assert rows == load_task(name).prompts(4, 0, "test") and all(isinstance(r["prompt"], str) for r in rows)


def test_a_task_without_supervised_rows_is_refused_by_name():
    name = next(name for name, entry in TASKS.items() if not entry.supervised)
    with pytest.raises(DataError, match=rf"data\.sft='builtin:{name}': the {name} task has no demonstrations"):
        load_sft(f"builtin:{name}", DataConfig(), SimpleNamespace(eos_token_id=2), max_len=64, seed=0)


@pytest.mark.parametrize("name", list(TASKS))
def test_the_model_name_resolves_to_the_task_policy(name, monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(tiny_model, "build_task_policy", lambda task, path: built.append((task, path)) or path)
    task = load_task(name)
    assert resolve_model_path(TASKS[name].model, str(tmp_path)) == str(tmp_path / task.recipe.name)
    assert built == [(task, tmp_path / task.recipe.name)]


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "task").glob("*.yaml")), ids=lambda p: p.stem)
def test_a_task_config_names_its_own_task(path: pathlib.Path):
    # conf/task/<name>.yaml picks the task's policy and prompts; a renamed task or model shows up here.
    cfg = compose_config([f"task={path.stem}"])
    assert cfg.model.path == TASKS[path.stem].model
    assert cfg.data.prompts == f"builtin:{path.stem}"


# ----------------------------------------------------------------------------- weight-sync transports


@pytest.mark.parametrize("name", list(TRANSPORTS))
def test_every_transport_entry_resolves_to_a_transport_whose_traits_it_states(name):
    from vllm.distributed.weight_transfer.base import WeightTransferEngine
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    from rlhf_dist.weight_sync.plugin import register_vllm_plugin
    from rlhf_dist.weight_sync.reload import CheckpointReload

    transport, entry = load_transport(name), TRANSPORTS[name]
    assert transport.name == name
    # grouped: rank 0 opens a group and broadcasts (the sync may be issued ahead); else every rank exports
    # handles and the sync goes stage by stage: what roles.groups and roles.trainer do with each kind.
    assert isinstance(transport, GroupTransport) is entry.grouped
    assert isinstance(transport, HandleTransport) is not entry.grouped
    assert entry.devices and set(entry.devices) <= {"cpu", "cuda"}  # resources.device's values
    assert entry.placements and set(entry.placements) <= {"separate", "colocated"}  # resources.placement's
    # What vLLM's factory does inside every engine process: look the backend up, load the class.
    register_vllm_plugin()
    engine = WeightTransferEngineFactory._registry[entry.vllm_backend]()
    assert engine is transport.engine_class()
    assert issubclass(engine, CheckpointReload) and issubclass(engine, WeightTransferEngine)


def test_config_accepts_exactly_the_registry_transports():
    for name, entry in TRANSPORTS.items():
        ResourcesConfig(device=entry.devices[0], placement=entry.placements[0], weight_sync_backend=name).validate()
    backends = [entry.vllm_backend for entry in TRANSPORTS.values()]
    assert len(set(backends)) == len(backends)  # one engine per name in vLLM's factory
    names = ", ".join(TRANSPORTS)
    with pytest.raises(ConfigError, match=rf"^resources\.weight_sync_backend='rdma': use one of {names}$"):
        ResourcesConfig(weight_sync_backend="rdma").validate()
    with pytest.raises(ValueError, match=r"unknown weight-sync transport 'rdma': use one of gloo, "):
        load_transport("rdma")
