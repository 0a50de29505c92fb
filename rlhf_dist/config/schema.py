"""The root ``Config`` (the Hydra schema, registered as ``base_config``) and the way from
Hydra's DictConfig to it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from rlhf_dist.config.errors import _fail
from rlhf_dist.config.groups import (
    AlgoConfig,
    DataConfig,
    EvalConfig,
    ReferenceConfig,
    RewardConfig,
    RewardModelConfig,
    RolloutConfig,
    SFTConfig,
    TrainerConfig,
)
from rlhf_dist.config.model import ModelConfig
from rlhf_dist.config.pipeline import PipelineConfig
from rlhf_dist.config.runtime import (
    CheckpointConfig,
    LoggerConfig,
    ResourcesConfig,
    TimeoutConfig,
    WeightSyncConfig,
)


@dataclass
class Config:
    # PPO iterations (generate -> score -> train -> sync) to run.
    total_steps: int = 20
    # Seed of the controller, every actor and the engines' sampling.
    seed: int = 0
    # Directory holding the embedded default models; empty means $RLHF_DIST_CACHE or ~/.cache/rlhf_dist.
    cache_dir: str = ""
    # "" starts a new run (in an output dir without one); "auto" continues the run in the output
    # dir (hydra.run.dir=...) from its newest complete checkpoint, or starts it if it has none;
    # or a checkpoint directory (.../checkpoints/step_000010) to continue from.
    resume: str = ""
    # Restarts after losing an actor: a lost engine is replaced within the step (at most this many
    # times); a lost trainer, reference or reward actor restarts every role from the last
    # checkpoint (at most this many times). 0 makes any loss fatal.
    max_restarts: int = 2
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RewardModelConfig = field(default_factory=RewardModelConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)


# The groups of Config, in the order validate_config checks them.
GROUPS = (
    "model", "data", "eval", "algo", "rollout", "trainer", "reward", "reference", "sft", "rm", "resources", "timeouts",
    "weight_sync", "checkpoint", "logger", "pipeline",
)


def to_config(raw: Any) -> Config:
    """Turn Hydra's DictConfig (typed by the schema) into a plain ``Config`` object."""
    obj = OmegaConf.to_object(raw)
    if not isinstance(obj, Config):
        raise TypeError(f"expected Config, got {type(obj).__name__}")
    _reject_unknown_keys(obj, "")
    return obj


def _reject_unknown_keys(obj: Any, prefix: str) -> None:
    # Hydra accepts "+group.new_key=..." even on a structured node; a typo must not pass silently.
    known = {f.name for f in dataclasses.fields(obj)}
    for key, value in vars(obj).items():
        if key not in known:
            _fail(f"{prefix}{key}", value, "unknown key; see `python -m rlhf_dist.train --cfg job`")
        if dataclasses.is_dataclass(value):
            _reject_unknown_keys(value, f"{prefix}{key}.")


def as_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def tokens_fraction(total: int, fraction: float) -> int:
    """``${rlhf_dist.tokens_fraction:${rollout.max_new_tokens},0.2}``: a share of a token budget,
    at least 1 (presets that scale with the budget, e.g. DAPO's overlong buffer)."""
    return max(1, int(int(total) * float(fraction)))


def register_configs() -> None:
    """Register the schema: the root ``Config`` as ``base_config``, the first entry of
    conf/config.yaml's defaults list; the group files merge into its typed nodes. Also the
    resolvers the presets use."""
    ConfigStore.instance().store(name="base_config", node=Config)
    OmegaConf.register_new_resolver("rlhf_dist.tokens_fraction", tokens_fraction, replace=True)

