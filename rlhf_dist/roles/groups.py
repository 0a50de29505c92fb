"""Typed, role-named handles over the actor groups; every method ending in ``_async`` returns a ``Pending``.

The controller only talks to these: it never sees DeepSpeed, vLLM or process groups.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
import torch

from rlhf_dist.config import AlgoConfig
from rlhf_dist.core.experience import Experience, RankingBatch, collate, concat, split_sizes
from rlhf_dist.roles.generation import Generation
from rlhf_dist.roles.worker_group import Pending, RoleError, WorkerGroup, get_one, wait_all, wait_collective
from rlhf_dist.weight_sync.transport import HandleTransport, ParamSpec, load_transport
from rlhf_dist.weight_sync.verify import worst_probe_gap


def _flatten(parts: list[list]) -> list:
    return [x for part in parts for x in part]


def _chunks(items: list, parts: int) -> list[list]:
    out, start = [], 0
    for size in split_sizes(len(items), parts):
        out.append(items[start : start + size])
        start += size
    return out


def _mean_stats(per_rank: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.fmean(d[k] for d in per_rank) for k in per_rank[0]}


class GenerationGroup(WorkerGroup):
    def __init__(
        self, role: str, actors: list, timeout_s: float, spawn_one: Callable[[int], Any] | None = None
    ) -> None:
        super().__init__(role, actors, timeout_s)
        self.spawn_one = spawn_one  # rank -> a new engine actor in that rank's placement slot
        self.asleep = False

    def sleep(self) -> None:
        """Every engine frees its GPU memory (``rollout.sleep_level``) until ``wake``."""
        self.call_async("sleep").result()
        self.asleep = True

    def wake(self, tags: list[str] | None = None) -> None:
        """Reallocate ``tags`` on every sleeping engine (all memory if None); a no-op when awake."""
        if self.asleep:
            self.call_async("wake_up", tags).result()
            self.asleep = tags is not None

    def respawn_lost(self, start_timeout_s: float) -> list[int]:
        """Replace every engine whose process is gone by a fresh one; returns their ranks."""
        if self.spawn_one is None:
            raise RuntimeError(f"{self.role}: engines of this group cannot be respawned")
        lost = []
        for rank, actor in enumerate(self.actors):
            try:
                Pending(self.role, "pid", [actor.pid.remote()], start_timeout_s, list).result()
            except RoleError as e:
                if not e.lost_actor:
                    raise
                lost.append(rank)
                self.actors[rank] = self.spawn_one(rank)
        self.call_async("pid", timeout_s=start_timeout_s).result()
        return lost

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], greedy: bool = False,
                 rows: list[dict] | None = None) -> list[Generation]:
        return self.generate_async(prompt_ids, seeds, greedy=greedy, rows=rows).result()

    def generate_async(
        self, prompt_ids: list[list[int]], seeds: list[int], greedy: bool = False, rows: list[dict] | None = None
    ) -> Pending[list[Generation]]:
        """Spread the prompts over the engines in contiguous chunks; results come back in prompt order.
        ``rows`` ({"prompt", "metadata"} of each prompt) make the environments of multi-turn samples."""
        n = len(self)
        row_parts = [None] * n if rows is None else _chunks(rows, n)
        return self.scatter_async(
            "generate", _chunks(prompt_ids, n), _chunks(seeds, n), [greedy] * n, row_parts, combine=_flatten
        )

    def stream(
        self, prompt_ids: list[list[int]], seeds: list[int], chunk: int, queued: int = 0, rows: list[dict] | None = None
    ) -> GenerationStream:
        """``generate_async`` as a stream: responses come back as they finish (``GenerationStream``),
        within the group's timeout once per generation ``queued`` before it on the engines, plus its own."""
        n = len(self)
        parts, offsets, start = _chunks(list(zip(prompt_ids, seeds)), n), [], 0
        row_parts = [None] * n if rows is None else _chunks(rows, n)
        streams = []
        for actor, part, part_rows in zip(self.actors, parts, row_parts):
            offsets.append(start)
            start += len(part)
            ids, part_seeds = [p for p, _ in part], [s for _, s in part]
            streams.append(actor.generate_stream.options(num_returns="streaming").remote(ids, part_seeds, chunk, part_rows))
        return GenerationStream(self.role, streams, offsets, [len(p) for p in parts], self.timeout_s * (1 + queued))

    def sequence_logprobs_async(self, token_ids: list[list[int]]) -> Pending[list[list[list[float]]]]:
        """Every engine's logprobs of the same sequences (one list per engine)."""
        return self.call_async("sequence_logprobs", token_ids)


class GenerationStream:
    """The responses of one streamed generation, in the order they finish, each chunk as
    (engine rank, [(sample index, Generation)]); the whole stream is bounded by ``timeout_s``."""

    def __init__(self, role: str, streams: list, offsets: list[int], counts: list[int], timeout_s: float) -> None:
        self.role, self.streams, self.offsets, self.timeout_s = role, streams, offsets, timeout_s
        self.left = dict(enumerate(counts))  # engine rank -> responses still to come

    def chunks(self) -> Iterator[tuple[int, list[tuple[int, Generation]]]]:
        deadline = time.monotonic() + self.timeout_s
        while live := [rank for rank, n in self.left.items() if n > 0]:
            waiting = [self.streams[rank] for rank in live]
            ready, _ = ray.wait(waiting, num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                raise RoleError(
                    f"{self.role}.generate_stream timed out after {self.timeout_s:.0f}s (engine ranks {live} "
                    f"still generating); raise timeouts.generate_s if the work is just slow", self.role,
                    "generate_stream",
                )
            rank = live[waiting.index(ready[0])]
            part = get_one(self.role, "generate_stream", rank, next(self.streams[rank]))
            self.left[rank] -= len(part)
            yield rank, [(self.offsets[rank] + i, g) for i, g in part]


class TrainerGroup(WorkerGroup):
    """A DeepSpeed data-parallel group: every call is issued on all ranks, each with its shard (``train``:
    the whole batch, which the ranks deal among themselves)."""

    collective = True

    def setup_async(self, start_timeout_s: float) -> Pending[list[int]]:
        """Every rank joins the data-parallel group hosted by rank 0 and builds its DeepSpeed engine."""
        host, port = self._on_rank0("endpoint", start_timeout_s)
        return self.call_async("setup", host, port, timeout_s=start_timeout_s)

    def _train_async(self, batch: Experience | RankingBatch, combine: Callable = _mean_stats,
                     **common) -> Pending:
        """``train`` on every rank, each given the whole batch (one copy in Ray's object store): the
        ranks deal each minibatch among themselves (``DeepSpeedRank._minibatches``), so the
        minibatches do not depend on the world size. Each rank's statistics are already the
        whole batch's (``DeepSpeedRank.accumulate``); their mean over ranks is that too."""
        whole = ray.put(batch) if len(self) > 1 else batch
        return self.call_async("train", whole, combine=combine, **common)

    def save_checkpoint_async(self, directory: str) -> Pending[list[None]]:
        """Every rank writes its DeepSpeed partition (model, optimizer, schedule) to ``directory``."""
        return self.call_async("save_checkpoint", directory)

    def load_checkpoint_async(self, directory: str, universal: str = "") -> Pending[int]:
        """Every rank restores its partition (from ``universal``, the checkpoint's universal form,
        when it was written with another shape); the result is the optimizer steps taken so far."""
        return self.call_async("load_checkpoint", directory, universal, combine=lambda steps: steps[0])

    def convert_checkpoint_async(self, directory: str) -> Pending[str]:
        """Rank 0 converts the DeepSpeed checkpoint in ``directory`` to its universal form (once:
        it is kept beside it) and returns that form's path."""
        return self.call_on_async(0, "convert_checkpoint", directory)

    def save_async(
        self, path: str, extra_files: dict[str, str] | None = None, replace: bool = False
    ) -> Pending[str]:
        """Write the model as a Hugging Face directory at ``path`` (rank 0 writes; all gather);
        ``replace`` swaps out an existing directory once the new one is complete."""
        return self.call_async("save_model", path, extra_files, replace, combine=lambda paths: paths[0])

    def endpoint(self) -> tuple[str, int]:
        """Rank 0's node IP and a free port, for a rendezvous rank 0 hosts."""
        return self._on_rank0("endpoint")

    def _on_rank0(self, method: str, timeout_s: float | None = None):
        ref = getattr(self.actors[0], method).remote()
        return Pending(self.role, method, [ref], timeout_s or self.timeout_s, lambda r: r[0]).result()


class PolicyGroup(TrainerGroup):
    def logprobs_async(
        self, exp: Experience, temperature: float | None = None
    ) -> Pending[tuple[torch.Tensor, torch.Tensor]]:
        """(logprobs, entropy) of the whole batch, computed data-parallel; at the rollout
        temperature unless ``temperature`` is given."""
        return self.scatter_async(
            "logprobs", exp.split(len(self)), temperature=temperature,
            combine=lambda outs: (concat([o[0] for o in outs]), concat([o[1] for o in outs])),
        )

    def train_async(
        self, exp: Experience, epochs: int, algo: AlgoConfig, kl_coef: float
    ) -> Pending[tuple[dict[str, float], torch.Tensor, torch.Tensor | None]]:
        """PPO epochs of the policy with ``algo``'s loss options; ``kl_coef`` weighs a KL loss term.
        The stats, and the pi_old the update used with its entropy (``PolicyTrainer.train``: the
        old logprobs of ``exp``, or, without them, those the update computed; entropy None when
        given), of the whole batch."""
        def combine(outs: list) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
            return _mean_stats([o[0] for o in outs]), outs[0][1], outs[0][2]  # every rank returns the whole pi_old

        return self._train_async(exp, combine=combine, epochs=epochs, algo=algo, kl_coef=kl_coef)

    def weight_specs(self) -> list[ParamSpec]:
        return self._on_rank0("weight_specs")


    def reference_logprobs_async(self, exp: Experience) -> Pending[torch.Tensor]:
        """(B, T) logprobs of the whole batch under the base model, the LoRA adapters disabled
        (``PolicyTrainer.reference_logprobs``), computed data-parallel."""
        return self.scatter_async("reference_logprobs", exp.split(len(self)), combine=concat)


class BaseModelReference:
    """The KL reference of a LoRA run whose reference is its start (``config.reference_on_policy``):
    the policy ranks with their adapters disabled, no actor of its own. It answers a
    ``ReferenceGroup``'s calls, each on every policy rank (under ZeRO-3 their gathers pair up)."""

    def __init__(self, policy: PolicyGroup) -> None:
        self.policy = policy

    def __len__(self) -> int:
        return 1

    def logprobs_async(self, exp: Experience) -> Pending[torch.Tensor]:
        return self.policy.reference_logprobs_async(exp)

    def logprobs_on_async(self, rank: int, exp: Experience) -> Pending[torch.Tensor]:
        return self.policy.reference_logprobs_async(exp)


class SFTGroup(TrainerGroup):
    def train_async(self, exp: Experience) -> Pending[dict[str, float]]:
        """One optimizer step on a batch of demonstrations, dealt across the ranks."""
        return self._train_async(exp)

    def eval_loss_async(self, exp: Experience) -> Pending[float]:
        """Mean NLL per response token of held-out demonstrations."""

        def combine(parts: list[tuple[float, float]]) -> float:
            return sum(p[0] for p in parts) / max(sum(p[1] for p in parts), 1.0)

        return self.scatter_async("eval_loss", exp.split(len(self)), combine=combine)


class RewardModelGroup(TrainerGroup):
    def train_async(self, rankings: RankingBatch) -> Pending[dict[str, float]]:
        """One optimizer step on a batch of rankings (pairs: rankings of two), dealt across the ranks."""
        return self._train_async(rankings)

    def scores_async(self, rankings: RankingBatch) -> Pending[torch.Tensor]:
        """Scores (B, K) of every response of every ranking (0 in empty slots)."""
        return self.scatter_async("scores", rankings.split(len(self)), combine=concat)


class CriticGroup(TrainerGroup):
    def train_async(self, exp: Experience, epochs: int) -> Pending[dict[str, float]]:
        """Clipped value-loss epochs of the critic."""
        return self._train_async(exp, epochs=epochs)

    def values_async(self, exp: Experience) -> Pending[torch.Tensor]:
        return self.scatter_async("values", exp.split(len(self)), combine=concat)


class ReferenceGroup(WorkerGroup):
    def logprobs_async(self, exp: Experience) -> Pending[torch.Tensor]:
        """(B, T) reference logprobs of the whole batch, split across the actors."""
        return self.scatter_async("logprobs", exp.split(len(self)), combine=concat)

    def logprobs_on_async(self, rank: int, exp: Experience) -> Pending[torch.Tensor]:
        """``logprobs_async`` of one micro-batch on reference actor ``rank`` alone (a part of a stream)."""
        return self.call_on_async(rank, "logprobs", exp)


class RewardGroup(WorkerGroup):
    def score_on_async(
        self, rank: int, prompts: list[str], responses: list[str], metadata: list[dict]
    ) -> Pending[list[float]]:
        """``score_async`` of a few samples on reward actor ``rank`` alone (a chunk of a stream)."""
        return self.call_on_async(rank, "score", prompts, responses, metadata)

    def score_async(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> Pending[list[float]]:
        """One score per sample; NaN marks a sample dropped by reward.on_invalid=drop."""
        n = len(self)
        return self.scatter_async(
            "score", _chunks(prompts, n), _chunks(responses, n), _chunks(metadata, n), combine=_flatten
        )


class Broadcast:
    """A group transport (gloo, nccl): trainer rank 0 broadcasts every full tensor to every engine worker."""

    def __init__(self, policy: PolicyGroup, engines: GenerationGroup, info: dict, timeout_s: float) -> None:
        self.policy, self.engines, self.info, self.timeout_s = policy, engines, info, timeout_s

    def send_async(self) -> list[Pending]:
        """Both ends at once (a rendezvous), issued without waiting."""
        receiving = self.engines.call_async("update_weights", self.info, timeout_s=self.timeout_s)
        sending = self.policy.call_async("broadcast_weights", timeout_s=self.timeout_s)
        return [sending, receiving]

    def send(self) -> None:
        """Both ends, waited for until each has finished: a recovery (``WeightSync.reconnect``) needs
        trainer rank 0 and the engines out of the broadcast before they join a new group."""
        wait_collective(*self.send_async(), settle=True)

    def release(self) -> None:
        """Nothing outlives a broadcast."""


class Handles(Broadcast):
    """A handle transport (ipc, colocated GPUs): every trainer rank exports handles of full copies on
    its GPU; every engine loads from the one on its own GPU. The copies are freed once the engines
    finished."""

    def __init__(
        self, policy: PolicyGroup, engines: GenerationGroup, info: dict, timeout_s: float, transport: HandleTransport
    ) -> None:
        super().__init__(policy, engines, info, timeout_s)
        self.transport = transport

    def send(self) -> None:
        per_rank = self.policy.call_async("export_weight_handles", timeout_s=self.timeout_s).result()
        info = self.transport.with_handles(self.info, per_rank)
        self.engines.call_async("update_weights", info, timeout_s=self.timeout_s).result()

    def release(self) -> None:
        self.policy.call_async("release_weight_handles", timeout_s=self.timeout_s).result()


class SyncInFlight:
    """A weight sync issued without waiting (``WeightSync.sync_async``): its calls are queued on
    the engines and trainers in order; ``wait`` waits for them and checks the probe, if any."""

    def __init__(self, sync: WeightSync, version: int, pending: list[Pending], probe: tuple | None) -> None:
        self.sync, self.version, self.pending, self.probe = sync, version, pending, probe

    def wait(self) -> None:
        # Not settled: a lost engine restarts every role (train.run_with_restarts), which stops
        # the ends still in the broadcast.
        wait_collective(*self.pending, settle=False)
        if self.probe is not None:
            engine_lps, (trainer_lps, _) = wait_all(*self.probe)
            self.sync.check_probe(engine_lps, trainer_lps, self.version)
        self.pending, self.probe = [], None


class WeightSync:
    """The trainer -> every engine worker, through vLLM's weight-transfer API and the ``transport``
    (``resources.weight_sync_backend``, ``rlhf_dist.weight_sync``); every ``verify_every`` syncs, a
    check that every engine serves the trainer's policy."""

    def __init__(
        self, policy: PolicyGroup, engines: GenerationGroup, transport: str, workers_per_engine: int, timeout_s: float,
        *, probe: list[list[int]], verify_every: int, tolerance: float, bucket_bytes: int,
    ) -> None:
        self.policy, self.engines, self.timeout_s = policy, engines, timeout_s
        self.transport = load_transport(transport)
        self.workers_per_engine, self.bucket_bytes = workers_per_engine, bucket_bytes
        self.probe, self.verify_every, self.tolerance = probe, verify_every, tolerance
        self.version = 0  # the policy version the engines serve (0: the initial weights)
        self.probe_gap: tuple[int, float] | None = None  # (version, worst gap) of the last verification
        self._connect()
        info = self.transport.update_info(policy.weight_specs(), bucket_bytes)
        if isinstance(self.transport, HandleTransport):
            self.sender: Broadcast = Handles(policy, engines, info, timeout_s, self.transport)
        else:
            self.sender = Broadcast(policy, engines, info, timeout_s)

    def _connect(self) -> None:
        host, port = self.policy.endpoint()
        # Group rank 0 is trainer rank 0; engine i's workers follow at 1 + i * workers_per_engine.
        world = 1 + len(self.engines) * self.workers_per_engine
        # The rendezvous needs both ends at once: issue both, then wait for both.
        infos = [
            self.transport.engine_init_info(host, port, 1 + i * self.workers_per_engine, world, self.timeout_s,
                                            self.bucket_bytes)
            for i in range(len(self.engines))
        ]
        joins = self.engines.scatter_async("init_weight_transfer", infos, timeout_s=self.timeout_s)
        opened = self.policy.call_async(
            "init_weight_sender", self.transport.name, host, port, world, self.timeout_s, self.bucket_bytes,
            timeout_s=self.timeout_s,
        )
        wait_all(opened, joins)

    def reconnect(self) -> None:
        """A new group with the current engines (after some were replaced), then the current weights."""
        self.engines.call_async("shutdown_weight_transfer", timeout_s=self.timeout_s).result()
        self._connect()
        self.sync(self.version)

    def sync(self, version: int) -> None:
        """Send the current policy weights as ``version``, one stage at a time (a lost engine fails
        the first stage, before the trainers join a broadcast with it); on return every engine
        serves them (and is awake)."""
        self._sync_in_steps(version)

    def sync_async(self, version: int) -> SyncInFlight:
        """Issue a sync of the current policy weights as ``version`` without waiting. The engines
        apply it after any call already queued on them (a generation in flight) and before any
        issued later; so do the trainers. ``SyncInFlight.wait`` settles it. Sleeping engines and a
        handle transport (ipc) need each stage done before the next: then it is done before this returns."""
        if isinstance(self.transport, HandleTransport) or self.engines.asleep:
            self._sync_in_steps(version)
            return SyncInFlight(self, version, [], None)
        engines = self.engines
        pending = [
            engines.call_async("start_weight_update", timeout_s=self.timeout_s),
            *self.sender.send_async(),
            engines.call_async("finish_weight_update", version, timeout_s=self.timeout_s),
        ]
        self.version = version
        return SyncInFlight(self, version, pending, self._probe_async() if self._verify_due(version) else None)

    def _verify_due(self, version: int) -> bool:
        return bool(self.verify_every) and version % self.verify_every == 0

    def _sync_in_steps(self, version: int) -> None:
        """The sync one stage at a time (also what sleeping engines, rollout.sleep_level, and a
        handle transport need: each stage done before the next is issued)."""
        self.engines.wake(["weights"])  # sleeping engines need their weight memory back first
        self.engines.call_async("start_weight_update", timeout_s=self.timeout_s).result()
        self.sender.send()
        self.engines.call_async("finish_weight_update", version, timeout_s=self.timeout_s).result()
        self.sender.release()
        self.engines.wake()
        self.version = version
        if self._verify_due(version):
            self.verify()

    def _probe_async(self) -> tuple[Pending, Pending]:
        """Every engine's and the trainer's logprobs of the probe sequences (temperature 1, as
        vLLM's prompt logprobs)."""
        exp = collate([p[:1] for p in self.probe], [p[1:] for p in self.probe], pad_id=0)
        return self.engines.sequence_logprobs_async(self.probe), self.policy.logprobs_async(exp, temperature=1.0)

    def verify(self) -> float:
        """Every engine's logprobs of the probe sequences against the trainer's; raises one line
        naming the worst engine if its gap exceeds the tolerance. Returns the worst gap (mean
        |difference| over a sequence's tokens)."""
        engine_lps, (trainer_lps, _) = wait_all(*self._probe_async())
        return self.check_probe(engine_lps, trainer_lps, self.version)

    def probe_gap_of(self, version: int) -> float | None:
        """The worst probe gap of the verification of weight ``version`` (None: not verified)."""
        return self.probe_gap[1] if self.probe_gap and self.probe_gap[0] == version else None

    def check_probe(self, engine_lps: list, trainer_lps: torch.Tensor, version: int) -> float:
        worst = worst_probe_gap(engine_lps, trainer_lps)
        self.probe_gap = version, worst.gap
        if not worst.gap <= self.tolerance:
            raise RoleError(
                f"weight_sync.verify: engine {worst.engine} does not serve the trainer's policy after weight "
                f"version {version}: probe sequence {worst.sequence} mean |logprob gap| {worst.gap:.3g} > "
                f"{self.tolerance:g} (weight_sync.verify_tol)", "generation", "weight_sync.verify",
            )
        return worst.gap
