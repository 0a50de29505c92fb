"""Typed configuration: one dataclass per Hydra group, the root registered as the schema.

Defaults live only on the dataclasses; YAML files in ``conf/`` only override. Each group
validates itself (``validate``); ``validate_config`` (PPO) and ``supervised_plan`` (SFT, reward
model) run the checks across the groups a stage uses. Values derived from the config go into a
frozen plan, never back into the config.

    errors.py    ConfigError and the shared checks
    model.py     the model group: the policy's path and dtype, its LoRA adapters (model.lora)
    groups.py    what is trained and how: data, eval, algo, rollout, trainer, reward, reference, sft, rm
    runtime.py   where and how it runs: resources, timeouts, weight_sync, checkpoint, logger
    schema.py    the root Config, Hydra's DictConfig -> Config, the ConfigStore registration
    plan.py      the frozen plans: TrainerPlan (what the trainer reads), RunPlan (PPO), SupervisedPlan
    validate.py  the cross-group checks, one function per concern, and each stage's entry point

This package imports neither torch nor Ray so that a bad value is reported in well under a
second, before any actor starts.
"""

from rlhf_dist.config.errors import ConfigError
from rlhf_dist.config.groups import (
    BUILTIN_PROMPTS,
    BUILTIN_SUPERVISED,
    ESTIMATORS,
    GROUP_ESTIMATORS,
    KL_ESTIMATORS,
    LOSS_AGGS,
    LR_SCHEDULES,
    RATIO_LEVELS,
    ROLLOUT_CORRECTIONS,
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
from rlhf_dist.config.model import LORA_SYNCS, LoraConfig, ModelConfig
from rlhf_dist.config.pipeline import PipelineConfig
from rlhf_dist.config.plan import (
    RunPlan,
    SupervisedPlan,
    TrainerPlan,
    actor_counts,
    lora_summary,
    needs_reference,
    reference_on_policy,
    trainer_collective_timeout_s,
    updates_once,
    weight_sync_timeout_s,
)
from rlhf_dist.config.runtime import (
    LOGPROB_TOLERANCE,
    CheckpointConfig,
    LoggerConfig,
    ResourcesConfig,
    RoleResources,
    TimeoutConfig,
    WeightSyncConfig,
)
from rlhf_dist.config.schema import GROUPS, Config, as_dict, register_configs, to_config
from rlhf_dist.config.validate import SUPERVISED_GROUPS, supervised_plan, validate_config

__all__ = [
    "BUILTIN_PROMPTS",
    "BUILTIN_SUPERVISED",
    "ESTIMATORS",
    "GROUPS",
    "GROUP_ESTIMATORS",
    "KL_ESTIMATORS",
    "LOGPROB_TOLERANCE",
    "LORA_SYNCS",
    "LOSS_AGGS",
    "LR_SCHEDULES",
    "RATIO_LEVELS",
    "ROLLOUT_CORRECTIONS",
    "SUPERVISED_GROUPS",
    "AlgoConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LoggerConfig",
    "LoraConfig",
    "ModelConfig",
    "PipelineConfig",
    "ReferenceConfig",
    "ResourcesConfig",
    "RewardConfig",
    "RewardModelConfig",
    "RoleResources",
    "RolloutConfig",
    "RunPlan",
    "SFTConfig",
    "SupervisedPlan",
    "TimeoutConfig",
    "TrainerConfig",
    "TrainerPlan",
    "WeightSyncConfig",
    "actor_counts",
    "as_dict",
    "lora_summary",
    "needs_reference",
    "reference_on_policy",
    "register_configs",
    "supervised_plan",
    "to_config",
    "trainer_collective_timeout_s",
    "updates_once",
    "validate_config",
    "weight_sync_timeout_s",
]
