"""Sizes derived from a validated config, in frozen plans: computed once, never written back.

The DeepSpeed trainer group reads the three fields of ``TrainerPlan`` (its batch arithmetic and
its LR schedule), whichever stage it trains for; each stage's plan adds the sizes that stage
counts in: PPO's ``RunPlan`` samples and minibatches, the supervised stages' ``SupervisedPlan``
rows of demonstrations or preference pairs. The process groups' timeouts are derived here too,
from ``timeouts.*`` (``weight_sync_timeout_s``, ``trainer_collective_timeout_s``).
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_dist.config.groups import TrainerConfig
from rlhf_dist.config.schema import Config


@dataclass(frozen=True)
class TrainerPlan:
    """What the trainer group reads: the sizes of one optimizer step and the schedule length."""

    per_rank_minibatch: int  # samples (or rows) per rank per optimizer step
    grad_accum_steps: int  # micro-batches per rank per optimizer step
    optimizer_steps: int  # optimizer steps over the whole run (for the LR schedule)


@dataclass(frozen=True)
class RunPlan(TrainerPlan):
    """The PPO stage: sizes of a step's rollout batch and of its passes over it."""

    rollout_batch: int  # samples per PPO step (rollout.batch_size x rollout.n)
    minibatches_per_epoch: int  # optimizer steps per PPO epoch


@dataclass(frozen=True)
class SupervisedPlan(TrainerPlan):
    """The SFT or reward-model stage: one optimizer step per ``<stage>.batch_size`` rows."""

    rows_per_step: int  # demonstrations (sft) or preference pairs (rm) per optimizer step, all ranks
    steps_per_epoch: int  # optimizer steps per pass over the rows (the last partial batch dropped)


def derive_run_plan(cfg: Config) -> RunPlan:
    """The PPO plan of a config that passed ``validate_config``."""
    a, t = cfg.algo, cfg.trainer
    samples = cfg.rollout.batch_size * cfg.rollout.n
    minibatches = samples // a.minibatch_size
    per_rank = a.minibatch_size // t.world_size
    return RunPlan(
        rollout_batch=samples,
        minibatches_per_epoch=minibatches,
        per_rank_minibatch=per_rank,
        grad_accum_steps=micro_batches_per_step(t, per_rank),
        optimizer_steps=cfg.total_steps * a.ppo_epochs * minibatches,
    )


def micro_batches_per_step(t: TrainerConfig, per_rank: int) -> int:
    """Micro-batches per rank per optimizer step: fixed by ``micro_batch_size``; with a token
    budget they vary with the lengths, and 1 is DeepSpeed's bookkeeping figure."""
    return 1 if t.max_tokens_per_micro_batch else per_rank // t.micro_batch_size


def needs_reference(cfg: Config) -> bool:
    """The run starts reference actors: for a KL penalty, or to log the KL (``reference.monitor``)."""
    return cfg.algo.uses_kl or cfg.reference.monitor


def reference_on_policy(cfg: Config) -> bool:
    """The reference is the policy's own base model, its LoRA adapters disabled: its logprobs come
    from the policy ranks and no reference actor starts (a LoRA run whose reference is its start)."""
    return cfg.model.lora.enabled and not cfg.reference.path


def lora_summary(cfg: Config) -> str:
    """The line a LoRA run prints at start: its adapters, how the engines get them, where its reference is,
    and the critic's adapters (model.critic_lora)."""
    lora, critic = cfg.model.lora, cfg.model.critic_lora
    critic_part = (f"; the critic: LoRA rank {critic.rank} (alpha {critic.alpha:g}, target_modules "
                   f"{critic.target_modules}) on its backbone, its value head trained in full"
                   if critic.enabled and cfg.algo.needs_critic else "")
    if not lora.enabled:
        return f"rlhf_dist: the policy trains every weight{critic_part}" if critic_part else ""
    if not needs_reference(cfg):
        reference = "no KL reference"
    elif reference_on_policy(cfg):
        reference = "the KL reference is the policy with its adapters disabled (no reference actor)"
    else:
        reference = f"the KL reference is reference.path={cfg.reference.path!r} on reference actors"
    sync = ("each sync sends the engines the adapters alone (they keep the base)" if lora.served else
            "each sync sends the engines full weights, the adapters merged")
    return (f"rlhf_dist: LoRA rank {lora.rank} (alpha {lora.alpha:g}, target_modules {lora.target_modules}), "
            f"{sync}; {reference}{critic_part}")


def actor_counts(cfg: Config) -> dict[str, int]:
    """Actors per role of a PPO run, for the roles it starts (no critic without GAE, no reference
    without ``needs_reference`` or with ``reference_on_policy``, no engines or reward actors when it replays dumped rollouts):
    what placement lays out and validation sizes GPUs for."""
    t = cfg.trainer
    counts = {"generation": cfg.rollout.num_engines, "policy": t.world_size, "reward": cfg.reward.num_actors}
    if cfg.rollout.replay_from:  # the rollouts are read, not generated and scored
        del counts["generation"], counts["reward"]
    if needs_reference(cfg) and not reference_on_policy(cfg):
        counts["reference"] = cfg.reference.num_actors
    if cfg.algo.needs_critic:
        counts["critic"] = t.world_size
    return counts


def updates_once(cfg: Config) -> bool:
    """A PPO step is one optimizer step (one epoch of one minibatch) and nothing before it needs
    pi_old (no KL in the reward, no rollout correction): the update's own forward then gives the
    old logprobs, and the separate pass before it is skipped (``PolicyTrainer.train`` returns the
    pi_old it used)."""
    a = cfg.algo
    one_step = a.ppo_epochs == 1 and a.minibatch_size == cfg.rollout.batch_size * cfg.rollout.n
    return one_step and a.rollout_correction == "none" and not (a.kl_in == "reward" and a.uses_kl)


def derive_supervised_plan(cfg: Config, stage: str, num_rows: int) -> SupervisedPlan:
    """The plan of stage "sft" or "rm" over ``num_rows`` rows, once its checks passed."""
    t, st = cfg.trainer, getattr(cfg, stage)
    per_rank = st.batch_size // t.world_size
    steps_per_epoch = num_rows // st.batch_size
    return SupervisedPlan(
        rows_per_step=st.batch_size,
        steps_per_epoch=steps_per_epoch,
        per_rank_minibatch=per_rank,
        grad_accum_steps=micro_batches_per_step(t, per_rank),
        optimizer_steps=st.epochs * steps_per_epoch,
    )


def weight_sync_timeout_s(cfg: Config) -> float:
    """The bound on one weight sync, on the controller and at both ends of the broadcast:
    ``timeouts.weight_sync_s``, plus a generation when rollouts run more than one step ahead (the
    engines apply a sync only between generations, so it is queued behind one)."""
    return cfg.timeouts.weight_sync_s + (cfg.timeouts.generate_s if cfg.rollout.max_staleness > 1 else 0.0)


def trainer_collective_timeout_s(cfg: Config) -> float:
    """DeepSpeed's process-group timeout on the trainer ranks: past it a rank waiting in a collective
    fails, and on GPUs the NCCL watchdog kills its process. So it is no shorter than the longest wait
    the controller allows, and the controller reports a slow call first, in one line. A rank waits
    for its peers within one call of its group, as long as that call's bound at most: the
    rendezvous of ``setup`` (``timeouts.actor_start_s``); train, logprobs, values, checkpoint save
    and load with their barriers, the policy export (``timeouts.train_s``); the weight broadcast
    (``weight_sync_timeout_s``), where ZeRO-3 ranks wait in their next gather while rank 0 sends,
    with ``rollout.max_staleness >= 2`` until the engines have finished a generation. Plus one
    more weight sync: a broadcast cut short at its bound still has rank 0 gather the rest of the
    parameters with its peers (``weight_sync.transport.GroupSender``)."""
    sync = weight_sync_timeout_s(cfg)
    return max(cfg.timeouts.actor_start_s, cfg.timeouts.train_s, sync) + sync
