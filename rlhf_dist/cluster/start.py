"""Start every role's actors from config and hand the controller role-named groups."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import ray

from rlhf_dist.cluster.placement import Slot, actor_env, init_ray, place, spawn
from rlhf_dist.cluster.restarts import EngineRecovery, Restarts
from rlhf_dist.config import (
    Config,
    RoleResources,
    RunPlan,
    TrainerPlan,
    actor_counts,
    needs_reference,
    reference_on_policy,
    trainer_collective_timeout_s,
    weight_sync_timeout_s,
)
from rlhf_dist.driver.preemption import Interrupted
from rlhf_dist.driver.run_logger import RunLogger
from rlhf_dist.models.modeling import resolve_model_path, token_vocab_size
from rlhf_dist.roles.generation import Generation, GenerationEngine
from rlhf_dist.roles.groups import (
    BaseModelReference,
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
from rlhf_dist.roles.spec import RankSpec
from rlhf_dist.roles.trainer import CriticTrainer, PolicyTrainer, RewardModelTrainer, SFTTrainer
from rlhf_dist.roles.worker_group import RoleError, WorkerGroup, wait_all
from rlhf_dist.weight_sync.verify import probe_sequences


@dataclass
class Roles:
    """The role-named groups of one start of the actors, and the weight sync between them."""

    generation: GenerationGroup | None  # none (nor reward actors, nor a weight sync) when replaying rollouts
    policy: PolicyGroup
    critic: CriticGroup | None  # only estimators that need values (gae) have one
    # None in a KL-free run with reference.monitor=false (needs_reference); the policy ranks, their LoRA
    # adapters disabled, in a LoRA run whose reference is its start (reference_on_policy)
    reference: ReferenceGroup | BaseModelReference | None
    reward: RewardGroup | None
    weights: WeightSync | None
    recovery: EngineRecovery  # replaces lost engines; made once per run, it outlives these roles
    start_s: dict[str, float] = field(default_factory=dict)  # seconds of each part of the start (start_summary)

    def start_summary(self) -> str:
        """Where the start went: Ray and the placement groups, then the time until each role was ready
        (the roles start side by side), then joining the weight-transfer group."""
        return ", ".join(f"{part} {seconds:.0f}s" for part, seconds in self.start_s.items())

    def groups(self) -> list[WorkerGroup]:
        groups = (self.generation, self.policy, self.critic, self.reference, self.reward)
        return [g for g in groups if isinstance(g, WorkerGroup)]  # not a BaseModelReference: the policy's ranks

    def kill(self) -> None:
        for group in self.groups():
            group.kill()

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], greedy: bool = False,
                 rows: list[dict] | None = None) -> list[Generation]:
        """Responses from the engines (``GenerationGroup.generate``; ``rows`` for multi-turn samples).
        An engine process lost during the call is replaced, joined to a new weight-transfer group,
        given the current policy weights, and the call retried: per-sample seeds make the retried
        responses the ones the lost engine would have produced."""
        try:
            return self.generation.generate(prompt_ids, seeds, greedy=greedy, rows=rows)
        except RoleError as e:
            if not self.replace_lost_engines(e):
                raise
        return self.generation.generate(prompt_ids, seeds, greedy=greedy, rows=rows)

    def replace_lost_engines(self, error: RoleError) -> bool:
        """Recover from ``error`` of a generation call: False when it cannot (not a lost actor, or
        no engine restarts left in ``recovery``'s budget) and the caller re-raises; True once each
        lost engine is back in its placement slot, every engine has joined a new weight-transfer
        group and received the current policy weights: the call can be retried."""
        if self.generation is None or not error.lost_actor or not self.recovery.restarts.take():
            return False
        started = time.perf_counter()
        lost = self.generation.respawn_lost(self.recovery.start_timeout_s)
        self.weights.reconnect()
        self.recovery.record(self)
        restarts = self.recovery.restarts
        self.recovery.notify(f"rlhf_dist: {error}; replaced engine ranks {lost} and re-synced weights version "
                             f"{self.weights.version} in {time.perf_counter() - started:.0f}s "
                             f"(restart {restarts.count}/{restarts.limit}), retrying")
        return True

    def processes(self, timeout_s: float) -> dict[str, list[int]]:
        """The process id of every actor, by role and rank (what to look at, or kill, from outside)."""
        pending = [g.call_async("pid", timeout_s=timeout_s) for g in self.groups()]
        return {g.role: pids for g, pids in zip(self.groups(), wait_all(*pending))}

    def nodes(self) -> dict[str, list[str]]:
        """The Ray node id of every actor, by role and rank (from the cluster's actor table)."""
        from ray._private.state import actors  # the GCS's actor table (pinned Ray; no dashboard needed)

        return {g.role: [actors(a._actor_id.hex())["Address"]["NodeID"] for a in g.actors] for g in self.groups()}


def rank_spec(cfg: Config, rank: int, world_size: int, model_path: str) -> RankSpec:
    """The spec of one actor: rank ``rank`` of ``world_size``, loading ``model_path``."""
    return RankSpec(rank=rank, world_size=world_size, device=cfg.resources.device, seed=cfg.seed,
                    timeout_s=trainer_collective_timeout_s(cfg), model_path=model_path)


def place_roles(cfg: Config, counts: dict[str, int], check_fit: bool = True) -> dict[str, list[Slot]]:
    """Start (or join) Ray and reserve a placement slot for every actor: ``counts`` by role
    (``check_fit``: ``placement.place``'s)."""
    init_ray(cfg.resources, cfg.logger.actor_logs)
    return place(cfg.resources, counts, cfg.timeouts.actor_start_s, check_fit)


def wait_started(cfg: Config, groups: list[WorkerGroup], trainers: tuple[TrainerGroup, ...] = ()) -> list[float]:
    """Wait until every actor of ``groups`` has started and every trainer group has set up (joined
    its process group): the trainers join while the engines and inference actors load. Returns the
    ``time.perf_counter()`` at which each group was ready, the trainers first."""
    timeout_s = cfg.timeouts.actor_start_s
    ready: dict[int, float] = {}
    wait_all(*(g.setup_async(timeout_s) for g in trainers), *(g.call_async("pid", timeout_s=timeout_s) for g in groups),
             finished=ready)
    return [ready[i] for i in range(len(trainers) + len(groups))]


def start_engines(cfg: Config, role: str, model_path: str, slots: list[Slot]) -> GenerationGroup:
    """One vLLM engine of ``model_path`` per slot (rank ``i`` in slot ``i``); a lost engine is
    respawned in its own slot."""
    res, env = cfg.resources, actor_env(cfg.resources)

    def kwargs(rank: int) -> dict[str, object]:
        return {"spec": rank_spec(cfg, rank, len(slots), model_path), "cfg": cfg.rollout, "dtype": cfg.model.dtype,
                "weight_sync_backend": res.weight_sync_backend, "in_process": res.vllm_in_process,
                "env_step_s": cfg.timeouts.env_step_s, "chat_template": cfg.data.chat_template,
                "record_routing": cfg.algo.routing_replay, "adapter": cfg.model.lora.served}

    def spawn_one(rank: int):
        return spawn(GenerationEngine, slots[rank : rank + 1], res.generation, env, lambda _: kwargs(rank))[0]

    actors = spawn(GenerationEngine, slots, res.generation, env, kwargs)
    return GenerationGroup(role, actors, cfg.timeouts.generate_s, spawn_one=spawn_one)


def start_reward(cfg: Config, slots: list[Slot]) -> RewardGroup:
    """The reward actors: one ``RewardScorer`` of the configured sources per slot."""
    def kwargs(rank: int) -> dict[str, object]:
        return {"spec": rank_spec(cfg, rank, len(slots), cfg.reward.model_path), "cfg": cfg.reward,
                "dtype": cfg.model.dtype, "chat_template": cfg.data.chat_template}

    actors = spawn(RewardScorer, slots, cfg.resources.reward, actor_env(cfg.resources), kwargs)
    return RewardGroup("reward", actors, cfg.timeouts.inference_s)


def reference_path(cfg: Config, policy_path: str) -> str:
    """The KL reference's model: ``reference.path``, or the policy's start."""
    if not cfg.reference.path:
        return policy_path
    return resolve_model_path(cfg.reference.path, cfg.cache_dir, "reference.path")


def start_reference(cfg: Config, model_path: str, slots: list[Slot]) -> ReferenceGroup:
    """The reference actors: the frozen ``model_path`` in each slot."""
    def kwargs(rank: int) -> dict[str, object]:
        return {"spec": rank_spec(cfg, rank, len(slots), model_path), "dtype": cfg.model.dtype,
                "batch_size": cfg.reference.batch_size, "temperature": cfg.rollout.temperature,
                "packing": cfg.trainer.packing, "chunk_tokens": cfg.trainer.logprob_chunk_tokens}

    actors = spawn(ReferenceModel, slots, cfg.resources.reference, actor_env(cfg.resources), kwargs)
    return ReferenceGroup("reference", actors, cfg.timeouts.inference_s)


def spawn_trainers(
    cfg: Config, plan: TrainerPlan, cls: type, resources: RoleResources, model_path: str, slots: list[Slot],
    extra: dict[str, object],
) -> list:
    """One DeepSpeed rank of ``cls`` per slot; ``extra`` are that trainer class's own keyword arguments."""
    return spawn(cls, slots, resources, actor_env(cfg.resources), lambda rank: {
        "spec": rank_spec(cfg, rank, len(slots), model_path), "cfg": cfg.trainer, "model_cfg": cfg.model,
        "plan": plan, **extra,
    })


def connect_weights(cfg: Config, policy: PolicyGroup, generation: GenerationGroup, policy_path: str) -> WeightSync:
    """The weight-transfer group from the policy's rank 0 to every engine; verified at once when
    ``weight_sync.verify_every`` is set (the engines loaded the trainer's checkpoint: they must agree)."""
    res, ws, dtype = cfg.resources, cfg.weight_sync, cfg.model.dtype
    # Two probe sequences per trainer rank: every ZeRO rank runs the same number of forward passes.
    probe = probe_sequences(token_vocab_size(policy_path), 2 * cfg.trainer.world_size, cfg.seed)
    weights = WeightSync(policy, generation, res.weight_sync_backend, cfg.rollout.tensor_parallel_size,
                         weight_sync_timeout_s(cfg), probe=probe, verify_every=ws.verify_every,
                         tolerance=ws.tolerance(dtype), bucket_bytes=int(res.weight_sync_bucket_mb * 2**20))
    if cfg.model.lora.served:  # adapters the engines cannot serve are refused now, not at the first sync
        generation.call_async("check_adapter", [spec.name for spec in policy.weight_specs()]).result()
    if ws.verify_every:
        weights.verify()
    return weights


def start_roles(
    cfg: Config, plan: RunPlan, policy_path: str, critic_path: str, recovery: EngineRecovery | None = None,
    restart: bool = False,
) -> Roles:
    """Place and start all actors, join the trainer groups and the weight-transfer group.
    ``recovery`` replaces lost engines (default: up to ``max_restarts``, reported on stderr, no actors file).
    A ``restart`` waits for the resources of a joined cluster rather than refusing a layout it
    cannot hold now (a lost node may be on its way back). A run that replays dumped rollouts
    (``rollout.replay_from``) starts no engines and no reward actors, and has no weight sync."""
    res, to = cfg.resources, cfg.timeouts
    started = time.perf_counter()
    replay = bool(cfg.rollout.replay_from)
    slots = place_roles(cfg, actor_counts(cfg), check_fit=not restart)
    placed = time.perf_counter()
    generation = None if replay else start_engines(cfg, "generation", policy_path, slots["generation"])
    sampling = {"temperature": cfg.rollout.temperature, "max_new_tokens": cfg.rollout.max_new_tokens}
    policy_ranks = spawn_trainers(cfg, plan, PolicyTrainer, res.policy, policy_path, slots["policy"], sampling)
    policy = PolicyGroup("policy", policy_ranks, to.train_s)
    critic = None
    if cfg.algo.needs_critic:
        clip = {"value_clip_eps": cfg.algo.value_clip_eps}
        critic_ranks = spawn_trainers(cfg, plan, CriticTrainer, res.critic, critic_path, slots["critic"], clip)
        critic = CriticGroup("critic", critic_ranks, to.train_s)
    reference: ReferenceGroup | BaseModelReference | None = None
    if needs_reference(cfg) and reference_on_policy(cfg):
        reference = BaseModelReference(policy)
    elif needs_reference(cfg):
        reference = start_reference(cfg, reference_path(cfg, policy_path), slots["reference"])
    reward = None if replay else start_reward(cfg, slots["reward"])
    inference = [g for g in (generation, reference, reward) if isinstance(g, WorkerGroup)]
    trainers = [g for g in (policy, critic) if g is not None]
    ready = wait_started(cfg, inference, trainers=tuple(trainers))
    joined = time.perf_counter()
    weights = None if replay else connect_weights(cfg, policy, generation, policy_path)
    recovery = recovery or EngineRecovery(Restarts(cfg.max_restarts), to.actor_start_s)
    phases = {"ray": placed - started, **{g.role: ready[i] - placed for i, g in enumerate([*trainers, *inference])},
              "weight_sync": time.perf_counter() - joined}
    return Roles(generation, policy, critic, reference, reward, weights, recovery, phases)


def start_trainer_group(
    cfg: Config, plan: TrainerPlan, role: str, model_path: str, actors: list, logger: RunLogger, lr: float
) -> TrainerGroup:
    """One DeepSpeed data-parallel group on its own, for the supervised stages: ``role`` is
    "sft" or "reward_model", trained at ``lr``. Uses the policy's resources. The group joins
    ``actors`` (``stage_actors``) before it sets up, so a failed start is cleaned up."""
    cls, group_cls = {"sft": (SFTTrainer, SFTGroup), "reward_model": (RewardModelTrainer, RewardModelGroup)}[role]
    started = time.perf_counter()
    slots = place_roles(cfg, {"policy": cfg.trainer.world_size})["policy"]
    ranks = spawn_trainers(cfg, plan, cls, cfg.resources.policy, model_path, slots, {"lr": lr})
    group = group_cls(role, ranks, cfg.timeouts.train_s)
    actors.append(group)
    group.setup_async(cfg.timeouts.actor_start_s).result()
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
