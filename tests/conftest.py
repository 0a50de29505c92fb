"""Shared fixtures: the repo root, the embedded tiny models, and typed configs composed by Hydra."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def compose_config(overrides: list[str]):
    """The real Hydra config (conf/ + dataclass schema) with overrides, as a typed ``Config``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_dist.config import register_configs, to_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return to_config(compose(config_name="config", overrides=overrides))


@pytest.fixture(scope="session")
def tiny_policy() -> str:
    from rlhf_dist.tiny_model import build_tiny_policy, default_model_dir

    return str(build_tiny_policy(default_model_dir()))


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_policy: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from rlhf_dist.tiny_model import build_tiny_reward_model

    return str(build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm", tiny_policy))
