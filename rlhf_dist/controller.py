"""The RL loop: ``run_rl`` (steps, evaluation, checkpoints) and ``rl_step``, one iteration top to
bottom in the algorithm's order:

take the step's rollout (``rollout.queue.RolloutQueue``: the engines generate it, up to
``rollout.max_staleness`` steps ahead, and the reward actors score it as it streams, after the
engines received the newest weights) -> reference and old logprobs, critic values
(``passes_before_update``; some already passed while it streamed, ``rlhf_dist.rollout.passes``) -> KL and
off-policy correction -> advantages -> policy and critic epochs on the trainer groups -> metrics
(``driver.metrics``) -> log, evaluate (``evaluation``), checkpoint (``checkpoint``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from rlhf_dist.checkpoint import Checkpointer, TrainState
from rlhf_dist.cluster.start import Roles
from rlhf_dist.config import AlgoConfig, Config, needs_reference, updates_once
from rlhf_dist.core.advantages import neutralise_dropped
from rlhf_dist.core.experience import Experience, collate, pad_right, routing_grid
from rlhf_dist.core.kl import kl_estimate
from rlhf_dist.core.losses import rollout_correction
from rlhf_dist.core.schedule import AdaptiveKLController, FixedKLController
from rlhf_dist.core.stats import masked_sum
from rlhf_dist.driver.data import PromptSet
from rlhf_dist.driver.metrics import (
    ROLLOUT_COLUMNS,
    GapWatch,
    OverlongWatch,
    env_metrics,
    sample_metrics,
    step_metrics,
)
from rlhf_dist.driver.preemption import Preemption
from rlhf_dist.driver.run_logger import RunLogger
from rlhf_dist.driver.timeline import Timeline
from rlhf_dist.evaluation import EVAL_COLUMNS, eval_summary, evaluate
from rlhf_dist.roles.worker_group import Pending, wait_all
from rlhf_dist.rollout import dump
from rlhf_dist.rollout.queue import RolloutBatch, RolloutQueue
from rlhf_dist.rollout.scoring import advantages_for


class Timer:
    """``time/<name>`` of each phase of a step; with a timeline, also a span on the phase's track."""

    def __init__(self, timeline: Timeline | None = None) -> None:
        self.times: dict[str, float] = {}
        self.timeline = timeline

    @contextmanager
    def __call__(self, name: str, track: str = "controller") -> Iterator[None]:
        start, wall = time.perf_counter(), time.time()
        yield
        self.times[f"time/{name}"] = time.perf_counter() - start
        if self.timeline is not None:
            self.timeline.add(track, name, wall, time.time())

    def together(self, **phases: tuple[str, Pending | None]) -> list:
        """The results of calls issued together (None: a role the run lacks), each phase
        ``name=(track, pending)`` timed from now to its own last answer (``time/<name>``)."""
        issued, wall = time.perf_counter(), time.time()
        named = [(name, track, p) for name, (track, p) in phases.items() if p is not None]
        finished: dict[int, float] = {}
        done = iter(wait_all(*(p for _, _, p in named), finished=finished))
        for i, (name, track, _) in enumerate(named):
            self.times[f"time/{name}"] = finished[i] - issued
            if self.timeline is not None:
                self.timeline.add(track, name, wall, wall + finished[i] - issued)
        return [None if p is None else next(done) for _, p in phases.values()]


def make_kl_controller(algo: AlgoConfig) -> FixedKLController | AdaptiveKLController:
    if algo.kl_controller == "adaptive":
        return AdaptiveKLController(algo.kl_coef, algo.kl_target, algo.kl_horizon)
    return FixedKLController(algo.kl_coef)


def kl_and_correction(
    old_logprobs: torch.Tensor | None, ref_logprobs: torch.Tensor | None, engine_logprobs: torch.Tensor,
    mask: torch.Tensor, algo: AlgoConfig,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
    """The per-token KL to the reference (0 without a reference, or before pi_old is known) and the
    off-policy correction of samples of an older policy (``rollout.max_staleness``): its weights
    (None: none) and statistics ({} before pi_old is known). Shape: (B, T) each."""
    if old_logprobs is None:
        return torch.zeros_like(mask), None, {}
    kl = torch.zeros_like(old_logprobs) if ref_logprobs is None else kl_estimate(
        old_logprobs, ref_logprobs, algo.kl_estimator)
    weights, correction = rollout_correction(
        old_logprobs, engine_logprobs, mask, algo.rollout_correction, algo.rollout_is_cap
    )
    return kl, weights, correction


def passes_before_update(
    cfg: Config, roles: Roles, exp: Experience, streamed: dict[str, torch.Tensor], timer: Timer,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(reference logprobs, old logprobs, entropy, critic values) of ``exp``, (B, T) each: those
    passed while the rollout streamed (``streamed``, ``rollout.passes``), the others now, all
    at once (they are on different groups). None for what the run has no pass for: no reference
    (``needs_reference``), no critic, or no pass for pi_old (``config.updates_once``: the
    update's own forward gives it)."""
    def now(field: str, needed: bool, call: Callable[[Experience], Pending]) -> Pending | None:
        return call(exp) if needed and field not in streamed else None

    ref, old, values = timer.together(
        reference=("reference", now("ref_logprobs", needs_reference(cfg), lambda e: roles.reference.logprobs_async(e))),
        values=("policy", now("old_logprobs", not updates_once(cfg), lambda e: roles.policy.logprobs_async(e))),
        critic_values=("critic", now("old_values", roles.critic is not None, lambda e: roles.critic.values_async(e))),
    )
    old_logprobs, entropy = (streamed["old_logprobs"], streamed["entropy"]) if "old_logprobs" in streamed else (
        old or (None, None))
    return streamed.get("ref_logprobs", ref), old_logprobs, entropy, streamed.get("old_values", values)


def rl_step(
    step: int, cfg: Config, roles: Roles, batch: RolloutBatch, kl_ctl: FixedKLController | AdaptiveKLController,
    timeline: Timeline, started: float | None = None,
) -> tuple[dict[str, float], list[list]]:
    """Train on one step's scored rollout (``rollout.queue.RolloutQueue.take``): reference and old
    logprobs (and values) -> advantages -> policy (and critic) epochs; the update hands back the
    pi_old it used, which gives the KL and the correction where no pass before it did
    (``config.updates_once``). Returns the step's metrics
    and its first ``logger.num_samples`` rollouts as rows of ``ROLLOUT_COLUMNS`` (reward as scored,
    KL summed over the response's tokens). The weights reach the engines at the next take.
    ``started``: when the step began (``time/step``; default: now), i.e. before its take."""
    algo, n, timer, step_start = cfg.algo, cfg.rollout.n, Timer(timeline), started or time.perf_counter()
    gens = batch.generations
    exp = collate(batch.prompt_ids, [g.response_ids for g in gens], pad_id=0, action_masks=[g.action_mask for g in gens])
    if algo.routing_replay:  # the trainer's forward passes route as the engines did
        exp = exp.with_fields(routing=routing_grid(exp, [g.routing for g in gens]))
    mask = exp.response_mask
    engine_logprobs = pad_right([g.response_logprobs for g in gens], mask.shape[1])
    raw_scores = torch.tensor(batch.scores)
    scores, kept = neutralise_dropped(raw_scores, n)
    truncated = torch.tensor([g.truncated for g in gens], dtype=torch.bool)  # cut off by max_new_tokens
    trained = kept & ~truncated if algo.mask_truncated else kept  # DAPO's overlong filtering
    ref_logprobs, old_logprobs, entropy, values = passes_before_update(
        cfg, roles, exp, batch.streamed_fields(mask.shape[1]), timer)
    # (no pi_old yet: the KL is not in the reward and there is no correction, so neither is needed yet)
    kl, weights, correction = kl_and_correction(old_logprobs, ref_logprobs, engine_logprobs, mask, algo)
    kl_coef = kl_ctl.value
    advantages, returns = advantages_for(algo, scores, kl, mask, values, n, kl_coef)
    exp = exp.with_fields(  # a dropped (or masked truncated) sample carries no policy gradient
        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages * trained[:, None],
        old_values=values, returns=returns, rollout_weights=weights,
    )
    update, critic_stats = timer.together(
        train=("policy", roles.policy.train_async(exp, algo.ppo_epochs, algo, kl_coef)),
        critic_train=("critic", roles.critic.train_async(exp, algo.ppo_epochs) if roles.critic else None),
    )
    policy_stats, used_old_logprobs, used_entropy = update
    if old_logprobs is None:  # the update computed pi_old
        old_logprobs, entropy = used_old_logprobs, used_entropy
        kl, _, correction = kl_and_correction(old_logprobs, ref_logprobs, engine_logprobs, mask, algo)
    sequence_kl = masked_sum(kl, mask, dim=-1)
    kl_ctl.update(sequence_kl.mean().item(), len(gens))
    metrics = step_metrics(
        raw_scores, kept, kl, sequence_kl, mask, entropy, engine_logprobs, old_logprobs, kl_coef,
        policy_stats, critic_stats, {**batch.times, **timer.times}, time.perf_counter() - step_start,
    )
    if ref_logprobs is None:  # no reference: there is no KL to report
        del metrics["kl/mean"], metrics["kl/token_mean"]
    metrics.update(correction)
    metrics.update(batch.stats)  # dynamic sampling, overlong shaping
    metrics.update(sample_metrics(step, gens, kept, truncated, algo.mask_truncated))
    metrics.update(env_metrics(gens))  # multi-turn samples
    shown = range(min(cfg.logger.num_samples, len(gens)))
    kls = [None] * len(gens) if ref_logprobs is None else sequence_kl.tolist()
    return metrics, [[step, batch.texts[i], gens[i].transcript or gens[i].text, batch.scores[i], kls[i]] for i in shown]


def run_rl(
    cfg: Config, roles: Roles, prompts: PromptSet, eval_prompts: PromptSet | None, logger: RunLogger,
    checkpoints: Checkpointer | None = None, start: TrainState | None = None, preemption: Preemption | None = None,
) -> None:
    """Iterations from ``start.step`` (0 for a new run) to ``cfg.total_steps``, each logged as it
    finishes and checkpointed when ``checkpoints`` says it is due. Each step takes its rollout from
    a queue that generates ``rollout.max_staleness`` steps ahead (``rollout.queue.RolloutQueue``). With
    held-out prompts, evaluate before training (summary ``eval/initial_reward_mean``) and after
    every ``eval.every_steps`` steps and the last one (``eval/reward_mean`` in that step's row).
    Once ``preemption`` has seen a signal, the step in progress is finished, checkpointed, and
    ``Interrupted`` raised. On return the engines serve the final policy."""
    start = start or TrainState()
    timeline = Timeline(enabled=cfg.logger.timeline)
    restored = [RolloutBatch.from_json(row) for row in start.in_flight]
    rollouts = (dump.ReplayQueue(cfg.rollout.replay_from) if cfg.rollout.replay_from
                else RolloutQueue(cfg, roles, prompts, timeline, restored))
    kl_ctl = make_kl_controller(cfg.algo)
    if start.kl_controller:
        kl_ctl.load_state_dict(start.kl_controller)
    gap_watch = GapWatch(cfg.weight_sync.gap_threshold(cfg.model.dtype), logger)
    overlong_watch = OverlongWatch(logger)
    every = cfg.eval.every_steps if eval_prompts is not None else 0
    if every and start.step == 0:
        initial, samples = evaluate(cfg, roles, eval_prompts)
        logger.add_summary(eval_summary("initial", initial))
        logger.table("eval/samples", EVAL_COLUMNS, [[0, *row] for row in samples], step=0)
    for step in range(start.step, cfg.total_steps):
        started = time.perf_counter()
        batch = rollouts.take(step)  # generated from the policy of step - staleness, scored
        if cfg.rollout.dump:
            dumped = time.perf_counter()
            dump.write(logger.out_dir / "rollouts", batch)
            batch.times["time/rollout_dump"] = time.perf_counter() - dumped
        metrics, rows = rl_step(step, cfg, roles, batch, kl_ctl, timeline, started)
        if not metrics["rollout/staleness_max"]:  # a stale sample's gap is the policy's change, not the sync's
            gap_watch.observe(step, metrics["logprob_gap/mean"])
        overlong_watch.observe(step, metrics)
        if cfg.logger.samples_every_steps and step % cfg.logger.samples_every_steps == 0:
            logger.table("rollout/samples", ROLLOUT_COLUMNS, rows, step=step)
        if every and ((step + 1) % every == 0 or step + 1 == cfg.total_steps):
            rollouts.sync_engines(step + 1)
            evaluation, samples = evaluate(cfg, roles, eval_prompts)
            metrics.update(evaluation)
            logger.add_summary(eval_summary("final", metrics))
            logger.table("eval/samples", EVAL_COLUMNS, [[step + 1, *row] for row in samples], step=step)
        logger.log(step, metrics)
        stopping = preemption is not None and preemption.requested and step + 1 < cfg.total_steps
        if checkpoints is not None and checkpoints.due(step + 1, cfg.total_steps, stopping):
            in_flight = [b.to_json() for b in rollouts.finish_in_flight()]  # saved: their weights are not
            state = TrainState(step + 1, kl_ctl.state_dict(), logger.extra_summary, logger.wandb_id, in_flight)
            logger.message(f"rlhf_dist: checkpoint {checkpoints.save(roles, state)}")
        timeline.write(logger.out_dir / "timeline.json")
        if stopping:
            preemption.check(f"{step + 1} of {cfg.total_steps} steps done")
    rollouts.sync_engines(cfg.total_steps)
