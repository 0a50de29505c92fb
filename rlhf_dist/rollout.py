"""Rollouts: a step's prompts, generated on the engines and scored, issued ahead of training.

Generation streams: each engine hands back responses as they finish, and every chunk goes to a
reward actor at once, so scoring runs while the engines still generate. With
``rollout.max_staleness = N >= 1`` the rollouts of the next N steps are in flight while a step
trains (one-step-off-policy training for N = 1, as in OpenRLHF, veRL, slime, AReaL): the engines
receive the weights of step k at the boundary of step k, once the generation they are running has
finished, and generate step k+N from them. Every sample carries the policy version that generated
it (``Generation.version``, set by the engine itself).

At a checkpoint the rollouts in flight are finished and saved with it (``RolloutBatch.to_json``): a
resumed run trains on exactly the samples the uninterrupted run would have, since the weights that
generated them are not in the checkpoint.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from rlhf_dist.config import Config
from rlhf_dist.data import PromptSampler, PromptSet
from rlhf_dist.roles.generation import Generation
from rlhf_dist.roles.groups import SyncInFlight
from rlhf_dist.seeds import ENGINE_SAMPLE, derive_seed
from rlhf_dist.timeline import Timeline
from rlhf_dist.worker_group import RoleError

if TYPE_CHECKING:
    from rlhf_dist.cluster import Roles


def sample_seeds(seed: int, step: int, n: int) -> list[int]:
    """Per-sample engine seeds: a run is reproducible whatever the engine count."""
    return [derive_seed(ENGINE_SAMPLE, seed, step, i) for i in range(n)]


@dataclass
class RolloutBatch:
    """One step's samples, scored: rows ``i`` of every list belong together."""

    step: int
    prompt_ids: list[list[int]]
    texts: list[str]
    metadata: list[dict]
    generations: list[Generation]
    scores: list[float]  # as scored; NaN: dropped (reward.on_invalid=drop)
    times: dict[str, float]  # time/generate (issue -> last response), time/reward (scoring left after it)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict) -> RolloutBatch:
        return cls(**{**row, "generations": [Generation(**g) for g in row["generations"]]})


class Rollout:
    """One step's rollout in flight: the engines' streams are issued at once (in the caller's
    thread, so the engines see the calls in the order the controller made them), and a thread
    scores each chunk as it arrives; ``generated`` is set once the engines are done with it (its
    scoring may go on), ``result`` waits for the scored batch."""

    def __init__(self, step: int, rows: tuple[list, list, list], seeds: list[int], roles: Roles, chunk: int,
                 timeline: Timeline, queued_before: list = ()) -> None:
        self.step, (self.prompt_ids, self.texts, self.metadata) = step, rows
        self.roles, self.timeline = roles, timeline
        self.issued = time.time()
        queued = sum(isinstance(r, Rollout) for r in queued_before)  # generations ahead of it on the engines
        self.stream = roles.generation.stream(self.prompt_ids, seeds, chunk, queued)
        self.batch: RolloutBatch | None = None
        self.error: BaseException | None = None
        self.generated = threading.Event()  # set once the engines are done with it (or it failed)
        self.thread = threading.Thread(target=self._run, name=f"rollout-step-{step}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.batch = self._collect()
        except BaseException as e:  # noqa: BLE001 -- re-raised in the controller's thread by result()
            self.error = e
        finally:
            self.generated.set()

    def _collect(self) -> RolloutBatch:
        reward, n = self.roles.reward, len(self.prompt_ids)
        generations: list[Generation | None] = [None] * n
        scoring = []
        for rank, part in self.stream.chunks():
            for i, g in part:
                generations[i] = g
            index = [i for i, _ in part]
            scoring.append((index, time.time(), reward.score_on_async(
                len(scoring) % len(reward), [self.texts[i] for i in index], [g.text for _, g in part],
                [self.metadata[i] for i in index],
            )))
        generated = time.time()
        self.generated.set()  # the engines are free: the next sync and rollout can go while this is scored
        self.timeline.add("generation", f"generate step {self.step}", self.issued, generated, samples=n)
        scores = [math.nan] * n
        for index, issued, pending in scoring:
            for i, s in zip(index, pending.result()):
                scores[i] = s
            self.timeline.add("reward", f"score step {self.step}", issued, time.time(), samples=len(index))
        times = {"time/generate": generated - self.issued, "time/reward": time.time() - generated}
        return RolloutBatch(self.step, self.prompt_ids, self.texts, self.metadata, generations, scores, times)

    def result(self) -> RolloutBatch:
        """The scored batch; every wait inside is bounded by the roles' timeouts."""
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.batch


class RolloutQueue:
    """The rollouts of the coming steps, issued ``rollout.max_staleness`` steps ahead of the one
    training (0: each step's rollout is generated when that step starts, from its own weights)."""

    def __init__(self, cfg: Config, roles: Roles, prompts: PromptSet, timeline: Timeline,
                 restored: list[RolloutBatch] = ()) -> None:
        self.cfg, self.roles, self.prompts, self.timeline = cfg, roles, prompts, timeline
        self.sampler = PromptSampler(len(prompts), cfg.rollout.batch_size, cfg.seed)
        self.ahead = cfg.rollout.max_staleness
        self.in_flight: dict[int, Rollout | RolloutBatch] = {b.step: b for b in restored}

    def take(self, step: int) -> RolloutBatch:
        """Step ``step``'s scored rollout. First the engines receive the policy of ``step`` (the
        trainer's, after ``step`` updates), then the rollouts up to ``step + max_staleness`` are
        issued; the weights go out only once the engines finished what they were generating."""
        times: dict[str, float] = {}
        if isinstance(self.in_flight.get(step), Rollout):  # issued ahead (max_staleness >= 1): the engines
            self.in_flight[step].generated.wait()  # finish generating it before the sync; it is scored meanwhile
        started, synced = time.time(), self.roles.weights.version < step
        sync = self._start_sync(step) if synced else None
        for ahead in range(step, min(step + self.ahead, self.cfg.total_steps - 1) + 1):
            if ahead not in self.in_flight:
                self.in_flight[ahead] = self._issue(ahead)
        if sync is not None:
            sync.wait()
        times["time/weight_sync"] = time.time() - started if synced else 0.0  # 0: the engines had it
        if synced:
            self.timeline.add("weight_sync", f"sync version {step}", started, time.time())
        batch = self._wait(step)
        del self.in_flight[step]
        if self.cfg.rollout.sleep_level:  # colocated GPUs: free the engines' memory until the next sync
            slept = time.time()
            self.roles.generation.sleep()
            times["time/engine_sleep"] = time.time() - slept
        batch.times = {**batch.times, **times}
        return batch

    def sync_engines(self, version: int) -> None:
        """The engines serve policy ``version`` (before an evaluation and at the end of the run);
        rollouts in flight are finished first, so the sync never waits behind a generation."""
        self.finish_in_flight()
        if self.roles.weights.version < version:
            started = time.time()
            self._sync_now(version)
            self.timeline.add("weight_sync", f"sync version {version}", started, time.time())

    def _start_sync(self, version: int) -> SyncInFlight | None:
        """With rollouts ahead, the sync is only issued (the engines apply it between generations);
        otherwise it is done at once (None), before the step's rollout is issued."""
        if self.ahead:
            return self.roles.weights.sync_async(version)
        self._sync_now(version)
        return None

    def _sync_now(self, version: int) -> None:
        """A sync done stage by stage, so that an engine lost since the last call is found before
        the trainers join a broadcast with it; it is then replaced in place (no rollout is in
        flight) and the sync done again."""
        try:
            self.roles.weights.sync(version)
        except RoleError as e:
            if self.in_flight or not self.roles.recovery.replace_lost_engines(self.roles, e):
                raise
            self.roles.weights.sync(version)

    def finish_in_flight(self) -> list[RolloutBatch]:
        """Wait for every rollout in flight (kept for the steps they belong to); returns them in step
        order, as a checkpoint saves them."""
        return [self._wait(step) for step in sorted(self.in_flight)]

    def _issue(self, step: int) -> Rollout:
        rows = [i for i in self.sampler.indices(step) for _ in range(self.cfg.rollout.n)]  # a prompt's n samples
        columns = (self.prompts.token_ids, self.prompts.texts, self.prompts.metadata)  # are contiguous
        picked = tuple([column[i] for i in rows] for column in columns)
        seeds = sample_seeds(self.cfg.seed, step, len(rows))
        in_flight = [r for r in self.in_flight.values() if isinstance(r, Rollout) and not r.generated.is_set()]
        return Rollout(step, picked, seeds, self.roles, self.cfg.rollout.stream_chunk, self.timeline, in_flight)

    def _wait(self, step: int) -> RolloutBatch:
        """Step ``step``'s rollout, finished (it stays in ``in_flight``, as a batch, until taken)."""
        item = self.in_flight[step]
        if isinstance(item, RolloutBatch):
            return item
        waited = time.time()
        try:
            batch = item.result()
        except RoleError as e:
            # A lost engine is replaced in place when nothing else is queued on the engines; with
            # rollouts in flight the run restarts from its last checkpoint (train.run_with_restarts).
            if self.ahead or not self.roles.recovery.replace_lost_engines(self.roles, e):
                raise
            batch = self._issue(step).result()  # per-sample seeds: the samples the lost engine would have made
        batch.times["time/rollout_wait"] = time.time() - waited
        self.timeline.add("controller", f"wait for rollout {step}", waited, time.time())
        self.in_flight[step] = batch
        return batch

