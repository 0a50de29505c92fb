"""Fan a call out to the actors of one role and gather the results, bounded by a timeout.

Every remote wait in the system goes through ``Pending.result``: it either
returns within its timeout or raises ``RoleError`` naming the role and the
operation, never hangs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ray

T = TypeVar("T")


class RoleError(RuntimeError):
    """A remote call of one role failed or timed out; the message names role and operation.

    ``lost_actor`` is set when the actor process itself is gone (killed, crashed, its node
    lost), as opposed to a call that raised or timed out: the first can be recovered by
    restarting the actor, the others would fail the same way again."""

    def __init__(self, message: str, role: str = "", op: str = "", lost_actor: bool = False) -> None:
        super().__init__(message)
        self.role, self.op, self.lost_actor = role, op, lost_actor


def _first_line(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


@dataclass
class Pending(Generic[T]):
    """Futures of one fanned-out call; ``result`` waits (bounded) and combines them."""

    role: str
    op: str
    refs: list[ray.ObjectRef]
    timeout_s: float
    combine: Callable[[list[Any]], T]
    ranks: list[int] | None = None  # the actor rank of each ref (None: refs[i] is rank i)
    # The ranks' calls are one collective (a DeepSpeed group's): when one fails, a lost peer is the
    # error to report (``lost_peer``).
    collective: bool = False

    def result(self) -> T:
        return wait_all(self)[0]

    def rank_of(self, ref: ray.ObjectRef) -> int:
        i = self.refs.index(ref)
        return i if self.ranks is None else self.ranks[i]


def _get(pending: Pending, ref: ray.ObjectRef) -> Any:
    return get_one(pending.role, pending.op, pending.rank_of(ref), ref)


def get_one(role: str, op: str, rank: int, ref: ray.ObjectRef) -> Any:
    """The value of a ready ``ref`` of actor ``rank``; a failure as a one-line ``RoleError``."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as e:
        raise actor_error(role, op, rank, e) from e
    except Exception as e:  # RayTaskError: the call raised; report role, op, rank and cause
        raise RoleError(f"{role}.{op} failed on actor rank {rank}: {_first_line(e)}", role, op) from e


_ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# Where Ray's error text names the actor's node: "(pid=4918, ip=10.0.0.5, actor_id=...)" in the
# header of a constructor's traceback, "\tip: 10.0.0.5" in the record of a dead process.
_NODE_IP = re.compile(r"\bip(?:=|: )([0-9A-Fa-f.:]+[0-9A-Fa-f])")
_FRAME = re.compile(r'^  File ".*", line \d+|ray::\S+ \(pid=\d+')  # a traceback frame, or Ray's task header


def actor_error(role: str, op: str, rank: int, e: ray.exceptions.RayActorError) -> RoleError:
    """Actor ``rank`` of ``role`` is gone (``e``): a one-line ``RoleError`` naming its node.

    If its constructor raised (a bad model path, an architecture the guards refuse, out of memory,
    an import error): "<role> rank <r> on node <ip> failed to start: <exception>", not ``lost_actor``
    (a restart would fail the same way). Ray 2.60 keeps no exception object for that
    (``ActorDiedError`` with ``actor_init_failed``), only its traceback's text, which ends with the
    exception. Otherwise its process died (killed, crashed, its node lost): ``lost_actor``, a
    restart can help."""
    text = _ANSI_COLOUR.sub("", str(e))
    ip = _NODE_IP.search(text)
    if e.actor_init_failed:
        node = f" on node {ip.group(1)}" if ip else ""
        return RoleError(f"{role} rank {rank}{node} failed to start: {raised(text)}", role, op)
    exit_type = re.search(r"Worker exit type: (\w+)", text)
    how = (f", exit type {exit_type.group(1)}" if exit_type else "") + (f", node {ip.group(1)}" if ip else "")
    # e.g. killed by the OOM killer while it loaded its model (no exception to show)
    when = " while starting" if "The actor never ran" in text else ""
    return RoleError(f"{role}.{op}: actor rank {rank} died{when} ({type(e).__name__}{how})", role, op,
                     lost_actor=True)


def raised(traceback_text: str) -> str:
    """The exception a formatted traceback ends with, on one line ("ValueError: bad path"): what
    follows the last frame (or Ray's task header) and that frame's indented source and carets."""
    lines = traceback_text.rstrip().splitlines()
    last_frame = max((i for i, line in enumerate(lines) if _FRAME.search(line)), default=-1)
    rest = lines[last_frame + 1 :]
    while rest and (not rest[0].strip() or rest[0][0].isspace()):
        rest = rest[1:]
    return " ".join(line.strip() for line in rest if line.strip()) or (lines[-1].strip() if lines else "")


def wait_all(*pending: Pending, finished: dict[int, float] | None = None) -> list[Any]:
    """Results of several pending calls issued together, each bounded by its own timeout.

    The first failure on any rank of any call raises at once (a dead rank must not leave the
    controller waiting out its peers' timeouts, which may be blocked in a collective with it).
    ``finished`` (if given) gets, for the i-th call, the ``time.perf_counter()`` when its last rank answered."""
    start = time.monotonic()
    deadline = {id(p): start + p.timeout_s for p in pending}
    owner = {ref: p for p in pending for ref in p.refs}
    values: dict[ray.ObjectRef, Any] = {}
    waiting = list(owner)
    while waiting:
        remaining = min(deadline[id(owner[r])] for r in waiting) - time.monotonic()
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(remaining, 0.0))
        if not ready:
            late = min((owner[r] for r in waiting), key=lambda p: deadline[id(p)])
            if deadline[id(late)] > time.monotonic():
                continue
            idx = [late.rank_of(r) for r in late.refs if r in waiting]
            raise RoleError(
                f"{late.role}.{late.op} timed out after {late.timeout_s:.0f}s "
                f"(actor ranks {idx} did not answer); raise timeouts.* if the work is just slow",
                late.role, late.op,
            )
        for ref in ready:
            try:
                values[ref] = _get(owner[ref], ref)
            except RoleError as e:
                if owner[ref].collective and not e.lost_actor:
                    raise lost_peer(owner[ref], [r for r in waiting if r in owner[ref].refs], e) from e.__cause__
                raise
            if finished is not None and all(r in values for r in owner[ref].refs):
                finished[pending.index(owner[ref])] = time.perf_counter()
    return [p.combine([values[r] for r in p.refs]) for p in pending]


PEER_LOSS_S = 60.0  # Ray marks the actors of a node gone within ~30 s of the node's last heartbeat


def lost_peer(pending: Pending, others: list[ray.ObjectRef], first: RoleError) -> RoleError:
    """The error to report for a collective call whose rank failed with ``first``: the ranks of a
    collective fail together, a survivor often first ("Connection reset by peer" when a peer's
    process or node is gone) and before Ray reports the peer lost. So the ranks still running
    (``others``) are waited for, up to ``PEER_LOSS_S``, and the first that turns out lost is
    returned (an error a restart can recover from); else ``first``."""
    part = Pending(pending.role, pending.op, others, min(pending.timeout_s, PEER_LOSS_S), list,
                   [pending.rank_of(r) for r in others])
    return next((e for e in _failures([part]) if e.lost_actor), first)


def wait_collective(*pending: Pending, settle: bool) -> list[Any]:
    """``wait_all`` for calls that are the ends of one collective (a weight broadcast: the engines
    receiving, trainer rank 0 sending). Its ends fail together and in no set order: an engine lost
    mid-broadcast fails the sender at once ("Connection closed by peer"), often before Ray reports
    the engine lost. So after the first failure the other ends are waited for (each at most its
    call's timeout from then) until one turns out lost, and that error is raised, the one a
    recovery can act on; else the first. ``settle``: wait for every end all the same, so that none
    is still running in the collective and no failure is left unread (Ray would log it)."""
    try:
        return wait_all(*pending)
    except RoleError as first:
        lost = first if first.lost_actor else None
        if settle or lost is None:
            for error in _failures(pending):
                lost = lost or (error if error.lost_actor else None)
                if lost is not None and not settle:
                    break
        if lost is None or lost is first:
            raise
        raise lost  # its own cause, the actor's death, stays


def _failures(pending: Sequence[Pending]) -> Iterator[RoleError]:
    """The errors of the ranks of ``pending`` as they answer, each waited for at most its call's
    timeout from now (a rank that has not answered by then is left running)."""
    start = time.monotonic()
    owner = {ref: p for p in pending for ref in p.refs}
    waiting = list(owner)
    while waiting:
        remaining = max(start + owner[r].timeout_s for r in waiting) - time.monotonic()
        ready, waiting = ray.wait(waiting, num_returns=1, timeout=max(remaining, 0.0))
        if not ready:
            return
        try:
            _get(owner[ready[0]], ready[0])
        except RoleError as e:
            yield e


class WorkerGroup:
    """The actors of one role, addressed by rank."""

    collective = False  # every call on all ranks is one collective (``Pending.collective``)

    def __init__(self, role: str, actors: Sequence[ray.actor.ActorHandle], timeout_s: float) -> None:
        self.role, self.actors, self.timeout_s = role, list(actors), timeout_s

    def __len__(self) -> int:
        return len(self.actors)

    def call_async(
        self, method: str, *args: Any, combine: Callable[[list[Any]], Any] = list, timeout_s: float | None = None,
        **kwargs: Any,
    ) -> Pending:
        """The same call on every actor."""
        refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return Pending(self.role, method, refs, timeout_s or self.timeout_s, combine, collective=self.collective)

    def call_on_async(self, rank: int, method: str, *args: Any) -> Pending:
        """A call on actor ``rank`` alone (e.g. a part of a stream); its result is the value itself."""
        ref = getattr(self.actors[rank], method).remote(*args)
        return Pending(self.role, method, [ref], self.timeout_s, lambda r: r[0], [rank])

    def scatter_async(
        self, method: str, *shards: Sequence[Any], combine: Callable[[list[Any]], Any] = list,
        timeout_s: float | None = None, **common: Any,
    ) -> Pending:
        """Actor ``i`` gets the ``i``-th item of every shard list (and ``common`` as keywords)."""
        for shard in shards:
            if len(shard) != len(self.actors):
                raise ValueError(f"{self.role}.{method}: {len(shard)} shards for {len(self.actors)} actors")
        refs = [getattr(a, method).remote(*args, **common) for a, *args in zip(self.actors, *shards)]
        return Pending(self.role, method, refs, timeout_s or self.timeout_s, combine, collective=self.collective)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
