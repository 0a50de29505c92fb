"""The forward passes before the update, started on full micro-batches while a rollout streams.

Each engine's responses go, in the order the engine returned them, to every pass a full
micro-batch at a time; what is left once the stream ends goes last, all engines' leftovers
together. So the passes run while the engines still generate and the reward actors score, rather
than after the slowest sample (``rollout.stream_passes``):

- the reference logprobs (a frozen model: always valid), a micro-batch of
  ``reference.batch_size`` samples on one reference actor at a time;
- in a synchronous run, the old logprobs (and entropy) on the policy group and the values on the
  critic group, ``trainer.world_size x trainer.micro_batch_size`` samples at a time, split over
  the ranks. Their weights are then the step's: the sync came before the rollout, and the update
  comes after it. With ``rollout.max_staleness >= 1`` the trainers are still updating on the
  step before, so these two wait for the whole batch (in ``controller.rl_step``); with dynamic
  sampling a refill round's size need not split evenly over the ranks, so they wait too. A step
  of one optimizer step takes its old logprobs from the update itself (``config.updates_once``).

An engine returns its samples in the same order every time (vLLM's scheduler is deterministic),
so a micro-batch holds the same samples in a run and in its resume, and the numbers are the same.
Multi-turn trajectories (``rollout.env``) finish in the order their environments answer, which
can change from run to run: there a micro-batch's samples, and so the last bits of its numbers,
can differ between a run and its resume.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlhf_dist.config import Config, needs_reference, reference_on_policy, updates_once
from rlhf_dist.core.experience import Experience, collate, pad_right
from rlhf_dist.driver.timeline import Timeline
from rlhf_dist.roles.generation import Generation
from rlhf_dist.roles.worker_group import Pending

if TYPE_CHECKING:
    from rlhf_dist.cluster.start import Roles


@dataclass(frozen=True)
class Pass:
    """One pass: ``time/<name>`` on ``track``; ``call(number, exp)`` issues micro-batch ``number``
    and its result is a tensor, or a tuple of them, one per name in ``fields`` (Experience's)."""

    name: str
    track: str
    fields: tuple[str, ...]
    size: int  # samples per micro-batch
    call: Callable[[int, Experience], Pending]


def streamed_passes(cfg: Config, roles: Roles) -> list[Pass]:
    """The passes a rollout of this run starts while it streams (module docstring)."""
    if not cfg.rollout.stream_passes:
        return []
    passes = []
    per_call = cfg.trainer.world_size * cfg.trainer.micro_batch_size
    synchronous = cfg.rollout.max_staleness == 0 and not cfg.rollout.dynamic_sampling
    # A LoRA run's reference is the policy ranks (adapters disabled), a call spanning all of them. They
    # stream only in a synchronous run: overlapped, the controller's thread may be training them, and
    # calls from two threads could reach the ranks in different orders (under ZeRO-3 their gathers would
    # then not pair up), so the reference pass runs in the controller's thread, after the update.
    on_policy = reference_on_policy(cfg)
    if needs_reference(cfg) and (synchronous or not on_policy):
        reference = roles.reference
        passes.append(Pass("reference", "policy" if on_policy else "reference", ("ref_logprobs",),
                           per_call if on_policy else cfg.reference.batch_size,
                           lambda k, exp: reference.logprobs_on_async(k % len(reference), exp)))
    if synchronous and not updates_once(cfg):
        passes.append(Pass("values", "policy", ("old_logprobs", "entropy"), per_call,
                           lambda k, exp: roles.policy.logprobs_async(exp)))
    if synchronous and roles.critic is not None:
        passes.append(Pass("critic_values", "critic", ("old_values",), per_call,
                           lambda k, exp: roles.critic.values_async(exp)))
    return passes


class StreamedPasses:
    """The passes of one round of a rollout over its samples as they arrive (module docstring)."""

    def __init__(self, passes: list[Pass], timeline: Timeline, step: int) -> None:
        self.passes, self.timeline, self.step = passes, timeline, step
        # pass name -> engine rank -> samples not yet in a micro-batch
        self.waiting: dict[str, dict[int, list[tuple[int, Generation]]]] = {p.name: defaultdict(list) for p in passes}
        self.issued: dict[str, list[tuple[list[tuple[int, Generation]], float, Pending]]] = {p.name: [] for p in passes}

    def add(self, rank: int, part: list[tuple[int, Generation]]) -> None:
        """Samples (index, generation) that engine ``rank`` returned; issues every full micro-batch."""
        for p in self.passes:
            waiting = self.waiting[p.name][rank]
            waiting.extend(part)
            while len(waiting) >= p.size:
                self._issue(p, waiting[: p.size])
                del waiting[: p.size]

    def _issue(self, p: Pass, samples: list[tuple[int, Generation]]) -> None:
        gens = [g for _, g in samples]
        exp = collate([g.prompt_ids for g in gens], [g.response_ids for g in gens], pad_id=0,
                      action_masks=[g.action_mask for g in gens])
        issued = self.issued[p.name]
        issued.append((samples, time.time(), p.call(len(issued), exp)))

    def result(self, count: int, times: dict[str, float]) -> list[dict[str, list[float]]]:
        """Per sample (``count``, in sample order) its rows of every pass's fields, e.g.
        ``{"ref_logprobs": [...]}``; an empty response keeps its one padded position, as
        ``collate`` gives it. Adds to ``times["time/<pass>"]`` how long each pass ran on after this
        call (its tail beyond generation and scoring)."""
        for p in self.passes:  # the leftovers: every engine's together, in rank order
            left = [s for rank in sorted(self.waiting[p.name]) for s in self.waiting[p.name][rank]]
            if left:
                self._issue(p, left)
        out: list[dict[str, list[float]]] = [{} for _ in range(count)]
        started = time.time()
        for p in self.passes:
            for samples, sent, pending in self.issued[p.name]:
                outputs = pending.result()
                outputs = outputs if isinstance(outputs, tuple) else (outputs,)
                for field, values in zip(p.fields, outputs):
                    for row, (i, g) in enumerate(samples):
                        out[i][field] = values[row, : max(len(g.response_ids), 1)].tolist()
                self.timeline.add(p.track, f"{p.name} step {self.step}", sent, time.time(), samples=len(samples))
            times[f"time/{p.name}"] = times.get(f"time/{p.name}", 0.0) + time.time() - started
        return out


def padded(rows: list[dict[str, list[float]]], width: int) -> dict[str, torch.Tensor]:
    """The streamed fields of a batch's samples as (B, width) tensors (0 at padding, as a pass over
    the whole batch gives them); only the fields every sample has."""
    fields = set.intersection(*(set(r) for r in rows)) if rows else set()
    return {f: pad_right([r[f] for r in rows], width) for f in sorted(fields)}
