"""rlhf_dist.registry: every built-in task entry resolves to its Task, the traits config reads
without importing a task match the Task, and what config, data and model loading offer are
exactly the registry's tasks (a registry of strings cannot rot unseen)."""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

import pytest

from rlhf_dist import tiny_model
from rlhf_dist.config import BUILTIN_PROMPTS, BUILTIN_SUPERVISED, ConfigError, DataConfig
from rlhf_dist.driver.data import DataError, builtin_prompt_rows, load_sft
from rlhf_dist.modeling import resolve_model_path
from rlhf_dist.registry import TASKS
from rlhf_dist.tasks.base import Task, load_task
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
