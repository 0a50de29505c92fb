"""Start every role's actors from config and hand the controller role-named groups."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray

from rlhf_dist.config import Config, RunPlan
from rlhf_dist.placement import actor_env, init_ray, place, spawn
from rlhf_dist.roles.generation import GenerationEngine
from rlhf_dist.roles.groups import (
    CriticGroup,
    GenerationGroup,
    PolicyGroup,
    ReferenceGroup,
    RewardGroup,
    RewardModelGroup,
    SFTGroup,
    TrainerGroup,
    WeightSync,
)
from rlhf_dist.roles.reference import ReferenceModel
from rlhf_dist.roles.reward import RewardScorer
from rlhf_dist.roles.trainer import CriticTrainer, PolicyTrainer, RewardModelTrainer, SFTTrainer
from rlhf_dist.run_logger import RunLogger
from rlhf_dist.worker_group import wait_all


@dataclass
class Roles:
    generation: GenerationGroup
    policy: PolicyGroup
    critic: CriticGroup | None  # only estimators that need values (gae) have one
    reference: ReferenceGroup
    reward: RewardGroup
    weights: WeightSync

    def kill(self) -> None:
        for group in (self.generation, self.policy, self.critic, self.reference, self.reward):
            if group is not None:
                group.kill()


def start_roles(cfg: Config, plan: RunPlan, policy_path: str, critic_path: str) -> Roles:
    """Place and start all actors, join the trainer groups and the weight-transfer group."""
    res, t, to = cfg.resources, cfg.trainer, cfg.timeouts
    init_ray(res, cfg.logger.actor_logs)
    counts = {
        "generation": cfg.rollout.num_engines, "policy": t.world_size,
        "reference": cfg.reference.num_actors, "reward": cfg.reward.num_actors,
    }
    if cfg.algo.needs_critic:
        counts["critic"] = t.world_size
    slots = place(res, counts, to.actor_start_s)
    env = actor_env(res)
    dtype, device = cfg.model.dtype, res.device

    def trainer_args(path: str, rank: int) -> tuple:
        return (t, cfg.model, plan, path, rank, device, cfg.seed, to.weight_sync_s)

    generation = GenerationGroup("generation", spawn(
        GenerationEngine, slots["generation"], res.generation, env,
        lambda i: ((policy_path, cfg.rollout, dtype, cfg.seed, res.weight_sync_backend, i), {}),
    ), to.generate_s)
    policy = PolicyGroup("policy", spawn(
        PolicyTrainer, slots["policy"], res.policy, env,
        lambda r: (trainer_args(policy_path, r),
                   {"temperature": cfg.rollout.temperature, "max_new_tokens": cfg.rollout.max_new_tokens}),
    ), to.train_s)
    critic = None
    if cfg.algo.needs_critic:
        critic = CriticGroup("critic", spawn(
            CriticTrainer, slots["critic"], res.critic, env,
            lambda r: (trainer_args(critic_path, r), {"value_clip_eps": cfg.algo.value_clip_eps}),
        ), to.train_s)
    reference = ReferenceGroup("reference", spawn(
        ReferenceModel, slots["reference"], res.reference, env,
        lambda i: ((policy_path, dtype, device, cfg.reference.batch_size, cfg.rollout.temperature), {}),
    ), to.inference_s)
    reward = RewardGroup("reward", spawn(
        RewardScorer, slots["reward"], res.reward, env,
        lambda i: ((cfg.reward, dtype, device), {"chat_template": cfg.data.chat_template}),
    ), to.inference_s)

    # Trainer groups join their process groups while the engines and inference actors load.
    wait_all(
        *(group.setup_async(to.actor_start_s) for group in (policy, critic) if group is not None),
        *(group.call_async("ready", timeout_s=to.actor_start_s) for group in (generation, reference, reward)),
    )
    weights = WeightSync(policy, generation, res.weight_sync_backend, cfg.rollout.tensor_parallel_size,
                         to.weight_sync_s)
    return Roles(generation, policy, critic, reference, reward, weights)


def start_trainer_group(
    cfg: Config, plan: RunPlan, role: str, model_path: str, actors: list, logger: RunLogger, **kwargs
) -> TrainerGroup:
    """One DeepSpeed data-parallel group on its own, for the supervised stages: ``role`` is
    "sft" or "reward_model"; ``kwargs`` go to the trainer class. Uses the policy's resources.
    The group joins ``actors`` (``stage_actors``) before it sets up, so a failed start is cleaned up."""
    cls, group_cls = {"sft": (SFTTrainer, SFTGroup), "reward_model": (RewardModelTrainer, RewardModelGroup)}[role]
    res, t, to = cfg.resources, cfg.trainer, cfg.timeouts
    started = time.perf_counter()
    init_ray(res, cfg.logger.actor_logs)
    slots = place(res, {"policy": t.world_size}, to.actor_start_s)["policy"]
    group = group_cls(role, spawn(
        cls, slots, res.policy, actor_env(res),
        lambda r: ((t, cfg.model, plan, model_path, r, res.device, cfg.seed, to.weight_sync_s), kwargs),
    ), to.train_s)
    actors.append(group)
    group.setup_async(to.actor_start_s).result()
    logger.message(f"rlhf_dist {role}: trainer group started in {time.perf_counter() - started:.0f}s")
    return group


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


@contextmanager
def stage_actors(logger: RunLogger) -> Iterator[list]:
    """The lifetime of one stage's actors: append each group (anything with ``kill()``) to the
    yielded list. However the block ends, the groups are killed and Ray is shut down; if it
    raises, summary.json records the failure first (so nothing logged is lost)."""
    groups: list = []
    try:
        yield groups
    except BaseException as e:
        logger.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        for group in groups:
            group.kill()
        shutdown_ray()
