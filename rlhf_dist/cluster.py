"""Start every role's actors from config and hand the controller role-named groups."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import ray

from rlhf_dist.config import Config, RunPlan
from rlhf_dist.modeling import token_vocab_size
from rlhf_dist.placement import actor_env, init_ray, place, spawn
from rlhf_dist.preemption import Interrupted
from rlhf_dist.roles.generation import Generation, GenerationEngine
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
from rlhf_dist.weight_sync import probe_sequences
from rlhf_dist.worker_group import RoleError, WorkerGroup, wait_all


@dataclass
class Roles:
    generation: GenerationGroup
    policy: PolicyGroup
    critic: CriticGroup | None  # only estimators that need values (gae) have one
    reference: ReferenceGroup
    reward: RewardGroup
    weights: WeightSync
    max_engine_restarts: int  # lost engines replaced during the run, at most
    start_timeout_s: float
    actors_file: Path | None = None  # where ``processes()`` is written after every (re)start
    notify: Callable[[str], None] = field(default=lambda text: print(text, file=sys.stderr))
    engine_restarts: int = 0

    def groups(self) -> list[WorkerGroup]:
        return [g for g in (self.generation, self.policy, self.critic, self.reference, self.reward) if g is not None]

    def kill(self) -> None:
        for group in self.groups():
            group.kill()

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], greedy: bool = False) -> list[Generation]:
        """Responses from the engines. An engine process lost during the call is replaced, joined
        to a new weight-transfer group, given the current policy weights, and the call retried:
        per-sample seeds make the retried responses the ones the lost engine would have produced."""
        try:
            return self.generation.generate_async(prompt_ids, seeds, greedy=greedy).result()
        except RoleError as e:
            if not e.lost_actor or self.engine_restarts >= self.max_engine_restarts:
                raise
            self.engine_restarts += 1
            started = time.perf_counter()
            lost = self.generation.respawn_lost(self.start_timeout_s)
            self.weights.reconnect()
            self.write_processes()
            self.notify(f"rlhf_dist: {e}; replaced engine ranks {lost} and re-synced weights version "
                        f"{self.weights.version} in {time.perf_counter() - started:.0f}s "
                        f"(restart {self.engine_restarts}/{self.max_engine_restarts}), retrying")
        return self.generation.generate_async(prompt_ids, seeds, greedy=greedy).result()

    def processes(self) -> dict[str, list[int]]:
        """The process id of every actor, by role and rank (what to look at, or kill, from outside)."""
        pending = [g.call_async("pid", timeout_s=self.start_timeout_s) for g in self.groups()]
        return {g.role: pids for g, pids in zip(self.groups(), wait_all(*pending))}

    def write_processes(self) -> None:
        if self.actors_file is not None:
            tmp = self.actors_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.processes(), indent=1) + "\n")
            os.replace(tmp, self.actors_file)


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

    def engine_args(i: int) -> tuple:
        args = (policy_path, cfg.rollout, dtype, cfg.seed, res.weight_sync_backend, i)
        return args, {"in_process": res.vllm_in_process}

    def spawn_engine(i: int):
        return spawn(GenerationEngine, slots["generation"][i : i + 1], res.generation, env, lambda _: engine_args(i))[0]

    generation = GenerationGroup(
        "generation", spawn(GenerationEngine, slots["generation"], res.generation, env, engine_args), to.generate_s,
        spawn_one=spawn_engine,
    )
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
        *(group.call_async("pid", timeout_s=to.actor_start_s) for group in (generation, reference, reward)),
    )
    ws = cfg.weight_sync
    # Two probe sequences per trainer rank: every ZeRO rank runs the same number of forward passes.
    probe = probe_sequences(token_vocab_size(policy_path), 2 * t.world_size, cfg.seed)
    weights = WeightSync(policy, generation, res.weight_sync_backend, cfg.rollout.tensor_parallel_size,
                         to.weight_sync_s, probe=probe, verify_every=ws.verify_every, tolerance=ws.tolerance(dtype))
    if ws.verify_every:
        weights.verify()  # the engines loaded the same checkpoint as the trainer: they must agree now
    return Roles(generation, policy, critic, reference, reward, weights, cfg.max_restarts, to.actor_start_s)


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
    raises, summary.json records the failure first (so nothing logged is lost), or
    ``status: interrupted`` for a run stopped by a signal between steps."""
    groups: list = []
    try:
        yield groups
    except Interrupted as e:
        logger.add_summary({"interrupted_by": signal.Signals(e.signum).name})
        logger.finish("interrupted", error=str(e))
        raise
    except BaseException as e:
        logger.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        for group in groups:
            group.kill()
        shutdown_ray()
