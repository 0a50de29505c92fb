"""Start every role's actors from config and hand the controller role-named groups."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from rlhf_dist.config import Config, RunPlan
from rlhf_dist.placement import actor_env, init_ray, place, spawn
from rlhf_dist.roles.generation import GenerationEngine
from rlhf_dist.roles.groups import CriticGroup, GenerationGroup, PolicyGroup, ReferenceGroup, RewardGroup, WeightSync
from rlhf_dist.roles.reference import ReferenceModel
from rlhf_dist.roles.reward import RewardScorer
from rlhf_dist.roles.trainer import CriticTrainer, PolicyTrainer
from rlhf_dist.worker_group import wait_all


@dataclass
class Roles:
    generation: GenerationGroup
    policy: PolicyGroup
    critic: CriticGroup
    reference: ReferenceGroup
    reward: RewardGroup
    weights: WeightSync

    def shutdown(self) -> None:
        for group in (self.generation, self.policy, self.critic, self.reference, self.reward):
            group.kill()


def start_roles(cfg: Config, plan: RunPlan, policy_path: str, critic_path: str) -> Roles:
    """Place and start all actors, join the trainer groups and the weight-transfer group."""
    res, t, to = cfg.resources, cfg.trainer, cfg.timeouts
    init_ray(res, cfg.logger.actor_logs)
    counts = {
        "generation": cfg.rollout.num_engines, "policy": t.world_size, "critic": t.world_size,
        "reference": cfg.reference.num_actors, "reward": cfg.reward.num_actors,
    }
    slots = place(res, counts, to.actor_start_s)
    env = actor_env(res)
    dtype, device = cfg.model.dtype, res.device

    def trainer_args(path: str, rank: int) -> tuple:
        return (t, cfg.model, plan, path, rank, device, cfg.seed, to.weight_sync_s)

    engines = spawn(GenerationEngine, slots["generation"], res.generation, env, lambda i: (
        (policy_path, cfg.rollout, dtype, cfg.seed, res.weight_sync_backend, i), {}))
    policy = spawn(PolicyTrainer, slots["policy"], res.policy, env, lambda r: (
        trainer_args(policy_path, r), {"temperature": cfg.rollout.temperature, "clip_eps": cfg.algo.clip_eps}))
    critic = spawn(CriticTrainer, slots["critic"], res.critic, env, lambda r: (
        trainer_args(critic_path, r), {"value_clip_eps": cfg.algo.value_clip_eps}))
    reference = spawn(ReferenceModel, slots["reference"], res.reference, env, lambda i: (
        (policy_path, dtype, device, cfg.reference.batch_size, cfg.rollout.temperature), {}))
    reward = spawn(RewardScorer, slots["reward"], res.reward, env, lambda i: ((cfg.reward, dtype, device), {}))

    roles_groups = dict(
        generation=GenerationGroup("generation", engines, to.generate_s),
        policy=PolicyGroup("policy", policy, to.train_s),
        critic=CriticGroup("critic", critic, to.train_s),
        reference=ReferenceGroup("reference", reference, to.inference_s),
        reward=RewardGroup("reward", reward, to.inference_s),
    )
    g = roles_groups
    # Trainer groups join their process groups while the engines and inference actors load.
    wait_all(
        g["policy"].setup_async(to.actor_start_s),
        g["critic"].setup_async(to.actor_start_s),
        *(g[name].call_async("ready", timeout_s=to.actor_start_s) for name in ("generation", "reference", "reward")),
    )
    weights = WeightSync(g["policy"], g["generation"], res.weight_sync_backend,
                         cfg.rollout.tensor_parallel_size, to.weight_sync_s)
    return Roles(weights=weights, **g)


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()
