"""Rollouts: a step's prompts, generated on the engines and scored, issued ahead of training.

Generation streams: each engine hands back responses as they finish, and every chunk goes to a
reward actor at once, so scoring runs while the engines still generate; the passes before the
update (the reference logprobs, and in a synchronous run the old logprobs and values) start on
each full micro-batch as it arrives (``rlhf_dist.rollout.passes``, ``rollout.stream_passes``). With
``rollout.max_staleness = N >= 1`` the rollouts of the next N steps are in flight while a step
trains (one-step-off-policy training for N = 1, as in OpenRLHF, veRL, slime, AReaL): the engines
receive the weights of step k at the boundary of step k, once the generation they are running has
finished, and generate step k+N from them. Every sample carries the policy version that generated
it (``Generation.version``, set by the engine itself).

With ``rollout.dynamic_sampling`` (DAPO) a step's rollout is drawn in rounds: groups whose rewards
are all equal carry no advantage and are set aside, and more prompts are drawn, generated and
scored until the step holds ``rollout.batch_size`` informative groups (``GroupFilter``). A refill
round of step s draws its prompts at random, keyed on (seed, s, round), among those the step has
not drawn, and its samples continue the step's engine seeds, so a resumed run draws the same ones.
The filter counts the task's scores; DAPO's overlong shaping (``reward.overlong_buffer``) is added
after it, to the step's batch (``rollout.scoring``).

At a checkpoint the rollouts in flight are finished and saved with it (``RolloutBatch.to_json``): a
resumed run trains on exactly the samples the uninterrupted run would have, since the weights that
generated them are not in the checkpoint.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from rlhf_dist.config import Config
from rlhf_dist.core.advantages import informative_groups
from rlhf_dist.core.seeds import ENGINE_SAMPLE, REFILL_PROMPTS, derive_seed
from rlhf_dist.driver.data import PromptSampler, PromptSet
from rlhf_dist.driver.timeline import Timeline
from rlhf_dist.roles.agent_loop import env_rows
from rlhf_dist.roles.generation import Generation
from rlhf_dist.roles.groups import SyncInFlight
from rlhf_dist.roles.worker_group import RoleError
from rlhf_dist.rollout.passes import StreamedPasses, padded, streamed_passes
from rlhf_dist.rollout.scoring import shaped, task_scores

if TYPE_CHECKING:
    from rlhf_dist.cluster.start import Roles


def sample_seeds(seed: int, step: int, n: int, first: int = 0) -> list[int]:
    """Per-sample engine seeds of samples ``first .. first + n - 1`` of ``step``: a run is
    reproducible whatever the engine count."""
    return [derive_seed(ENGINE_SAMPLE, seed, step, i) for i in range(first, first + n)]


def refill_prompts(seed: int, step: int, round_: int, count: int, num_prompts: int, drawn: set[int]) -> list[int]:
    """Up to ``count`` prompt indices for refill round ``round_`` (>= 1) of ``step``: a permutation
    keyed on (seed, step, round), without the prompts the step has ``drawn`` already."""
    gen = torch.Generator().manual_seed(derive_seed(REFILL_PROMPTS, seed, step, round_))
    fresh = [i for i in torch.randperm(num_prompts, generator=gen).tolist() if i not in drawn]
    return fresh[:count]


@dataclass
class Draw:
    """One round of a step's sampling: each prompt ``n`` times, in contiguous rows, with engine seeds."""

    prompts: list[int]  # prompt indices, one per group
    prompt_ids: list[list[int]]
    texts: list[str]
    metadata: list[dict]
    seeds: list[int]


@dataclass
class RolloutBatch:
    """One step's samples, scored: rows ``i`` of every list belong together."""

    step: int
    prompt_ids: list[list[int]]
    texts: list[str]
    metadata: list[dict]
    generations: list[Generation]
    scores: list[float]  # shaped (rollout.scoring.shaped); NaN: dropped (reward.on_invalid=drop)
    # time/generate (issue -> last response); time/reward and each streamed pass's (scoring and pass left after it)
    times: dict[str, float]
    stats: dict[str, float] = field(default_factory=dict)  # of the sampling: dynamic sampling, overlong shaping
    # Per sample, the fields the passes gave while the rollout streamed (rlhf_dist.rollout.passes), e.g. ref_logprobs
    streamed: list[dict[str, list[float]]] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)

    def streamed_fields(self, width: int) -> dict[str, torch.Tensor]:
        """The streamed passes' fields as (B, width) tensors ({} when none streamed)."""
        return padded(self.streamed, width)

    @classmethod
    def from_json(cls, row: dict) -> RolloutBatch:
        return cls(**{**row, "generations": [Generation(**g) for g in row["generations"]]})


class GroupFilter:
    """DAPO's dynamic sampling over the rounds of one step: keeps the prompt groups with unequal
    task scores (``core.advantages.informative_groups`` on ``rollout.scoring.task_scores``, before
    any overlong shaping) until ``want`` are in, for at most ``max_rounds``
    rounds. ``next_count`` sizes the next round from the share of informative groups so far;
    ``result`` is the step's batch: the first ``want`` informative groups in draw order, filled up
    with uninformative ones (advantage 0) when the rounds ran out."""

    def __init__(self, want: int, n: int, max_rounds: int) -> None:
        self.want, self.n, self.max_rounds = want, n, max_rounds
        self.rounds, self.informative, self.uninformative = 0, [], []

    def add(self, draw: Draw, generations: list[Generation], scores: list[float],
            streamed: list[dict[str, list[float]]]) -> None:
        self.rounds += 1
        useful = informative_groups(torch.tensor(scores, dtype=torch.float64), self.n).tolist()
        streamed = streamed or [{} for _ in scores]
        for g, keep in enumerate(useful):
            rows = range(g * self.n, (g + 1) * self.n)
            group = ([draw.prompt_ids[i] for i in rows], [draw.texts[i] for i in rows],
                     [draw.metadata[i] for i in rows], [generations[i] for i in rows], [scores[i] for i in rows],
                     [streamed[i] for i in rows])
            (self.informative if keep else self.uninformative).append(group)

    def next_count(self) -> int:
        """Prompts to draw in the next round; 0 once there are enough or the rounds ran out."""
        deficit = self.want - len(self.informative)
        if deficit <= 0 or self.rounds >= self.max_rounds:
            return 0
        drawn = len(self.informative) + len(self.uninformative)
        rate = len(self.informative) / drawn
        return self.want if rate == 0 else min(self.want, math.ceil(deficit / rate))

    def result(self) -> tuple[tuple[list, list, list, list, list, list], dict[str, float]]:
        """(prompt_ids, texts, metadata, generations, scores, streamed passes) of the step's
        groups, and the stats."""
        kept = self.informative[: self.want]
        filled = self.uninformative[: self.want - len(kept)]
        columns = tuple([x for group in kept + filled for x in group[c]] for c in range(6))
        stats = {
            "rollout/sampling_rounds": float(self.rounds),
            "rollout/prompts_sampled": float(len(self.informative) + len(self.uninformative)),
            "rollout/filtered_groups": float(len(self.uninformative)),
            "rollout/filled_groups": float(len(filled)),
        }
        return columns, stats


class Rollout:
    """One step's rollout in flight: the engines' streams are issued at once (in the caller's
    thread, so the engines see the calls in the order the controller made them), and a thread
    scores each chunk as it arrives; ``generated`` is set once the engines are done with it (its
    scoring may go on), ``result`` waits for the scored batch. With ``refill`` (dynamic sampling)
    the thread draws further rounds, ``refill(round, count, drawn prompts, first sample)``, while
    ``GroupFilter`` asks for them; the engines are then done only once the last round's scores
    are in."""

    def __init__(self, step: int, draw: Draw, roles: Roles, cfg: Config, timeline: Timeline,
                 queued_before: list = (), refill: Callable[[int, int, set[int], int], Draw] | None = None) -> None:
        self.step, self.draw, self.roles, self.cfg, self.timeline = step, draw, roles, cfg, timeline
        self.refill = refill
        self.issued = time.time()
        queued = sum(isinstance(r, Rollout) for r in queued_before)  # generations ahead of it on the engines
        self.stream = roles.generation.stream(draw.prompt_ids, draw.seeds, cfg.rollout.stream_chunk, queued,
                                              self._rows(draw))
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
        times = {"time/generate": 0.0, "time/reward": 0.0}
        generations, scores, streamed = self._round(self.draw, self.stream, self.issued, times,
                                                    last=self.refill is None)
        if self.refill is None:
            columns = (self.draw.prompt_ids, self.draw.texts, self.draw.metadata, generations, scores, streamed)
            return self._batch(columns, times, {})
        rollout = self.cfg.rollout
        groups = GroupFilter(rollout.batch_size, rollout.n, rollout.max_sampling_rounds)
        groups.add(self.draw, generations, scores, streamed)
        drawn, samples = set(self.draw.prompts), len(self.draw.seeds)
        while count := groups.next_count():
            draw = self.refill(groups.rounds, count, drawn, samples)
            if not draw.prompts:
                break  # every prompt of the set is in this step already
            drawn.update(draw.prompts)
            samples += len(draw.seeds)
            issued = time.time()  # behind at most max_staleness rollouts on the engines
            stream = self.roles.generation.stream(draw.prompt_ids, draw.seeds, rollout.stream_chunk,
                                                  rollout.max_staleness, self._rows(draw))
            groups.add(draw, *self._round(draw, stream, issued, times, last=False))
        self.generated.set()
        columns, stats = groups.result()
        return self._batch(columns, times, stats)

    def _rows(self, draw: Draw) -> list[dict] | None:
        """What the environments of multi-turn samples are made from (None: single-turn)."""
        return env_rows(draw.texts, draw.metadata) if self.cfg.rollout.env else None

    def _round(self, draw: Draw, stream, issued: float, times: dict[str, float],
               last: bool) -> tuple[list, list, list]:
        """One round's generations, task scores (``rollout.scoring.task_scores``) and what the streamed passes
        gave (``rlhf_dist.rollout.passes``); scoring each chunk, and passing each full micro-batch, as it
        arrives. ``last``: no round follows, so the engines are free once it is generated."""
        reward, n = self.roles.reward, len(draw.prompt_ids)
        generations: list[Generation | None] = [None] * n
        scoring = []
        passes = StreamedPasses(streamed_passes(self.cfg, self.roles), self.timeline, self.step)
        for rank, part in stream.chunks():
            for i, g in part:
                generations[i] = g
            passes.add(rank, part)
            index = [i for i, _ in part]
            scoring.append((index, time.time(), reward.score_on_async(
                len(scoring) % len(reward), [draw.texts[i] for i in index], [g.text for _, g in part],
                [draw.metadata[i] for i in index],
            )))
        generated = time.time()
        if last:
            self.generated.set()  # the engines are free: the next sync and rollout can go while this is scored
        self.timeline.add("generation", f"generate step {self.step}", issued, generated, samples=n)
        scores = [math.nan] * n
        for index, sent, pending in scoring:
            for i, s in zip(index, pending.result()):
                scores[i] = s
            self.timeline.add("reward", f"score step {self.step}", sent, time.time(), samples=len(index))
        times["time/generate"] += generated - issued
        times["time/reward"] += time.time() - generated
        streamed = passes.result(n, times)
        scores = task_scores(scores, generations, self.cfg.reward.env_weight, self.cfg.reward.on_invalid)
        return generations, scores, streamed

    def _batch(self, columns: tuple[list, list, list, list, list, list], times: dict[str, float],
               stats: dict[str, float]) -> RolloutBatch:
        prompt_ids, texts, metadata, generations, scores, streamed = columns
        scores, overlong = shaped(self.cfg, generations, scores)
        return RolloutBatch(self.step, prompt_ids, texts, metadata, generations, scores, times, {**stats, **overlong}, streamed)

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
        if synced and (gap := self.roles.weights.probe_gap_of(step)) is not None:  # this sync was verified
            batch.stats = {**batch.stats, "weight_sync/probe_gap": gap}
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
            if self.in_flight or not self.roles.replace_lost_engines(e):
                raise
            self.roles.weights.sync(version)

    def finish_in_flight(self) -> list[RolloutBatch]:
        """Wait for every rollout in flight (kept for the steps they belong to); returns them in step
        order, as a checkpoint saves them."""
        return [self._wait(step) for step in sorted(self.in_flight)]

    def _issue(self, step: int) -> Rollout:
        in_flight = [r for r in self.in_flight.values() if isinstance(r, Rollout) and not r.generated.is_set()]
        refill = None
        if self.cfg.rollout.dynamic_sampling:
            def refill(round_: int, count: int, drawn: set[int], first: int) -> Draw:
                prompts = refill_prompts(self.cfg.seed, step, round_, count, len(self.prompts), drawn)
                return self._draw(step, prompts, first)
        return Rollout(step, self._draw(step, self.sampler.indices(step), 0), self.roles, self.cfg, self.timeline,
                       in_flight, refill)

    def _draw(self, step: int, prompts: list[int], first: int) -> Draw:
        """``prompts``, each ``rollout.n`` times in contiguous rows, with the engine seeds of the
        step's samples ``first, first + 1, ...``."""
        rows = [i for i in prompts for _ in range(self.cfg.rollout.n)]
        columns = (self.prompts.token_ids, self.prompts.texts, self.prompts.metadata)
        picked = [[column[i] for i in rows] for column in columns]
        return Draw(prompts, *picked, sample_seeds(self.cfg.seed, step, len(rows), first))

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
            if self.ahead or not self.roles.replace_lost_engines(e):
                raise
            batch = self._issue(step).result()  # per-sample seeds: the samples the lost engine would have made
        batch.times["time/rollout_wait"] = time.time() - waited
        self.timeline.add("controller", f"wait for rollout {step}", waited, time.time())
        self.in_flight[step] = batch
        return batch

