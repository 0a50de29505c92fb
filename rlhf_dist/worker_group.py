"""Fan a call out to the actors of one role and gather the results, bounded by a timeout.

Every remote wait in the system goes through ``Pending.result``: it either
returns within its timeout or raises ``RoleError`` naming the role and the
operation, never hangs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import ray

T = TypeVar("T")


class RoleError(RuntimeError):
    """A remote call of one role failed or timed out; the message names role and operation."""


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

    def result(self) -> T:
        _, not_ready = ray.wait(self.refs, num_returns=len(self.refs), timeout=self.timeout_s)
        if not_ready:
            idx = [i for i, r in enumerate(self.refs) if r in not_ready]
            raise RoleError(
                f"{self.role}.{self.op} timed out after {self.timeout_s:.0f}s "
                f"(actor ranks {idx} did not answer); raise timeouts.* if the work is just slow"
            )
        outputs = []
        for rank, ref in enumerate(self.refs):
            try:
                outputs.append(ray.get(ref))
            except Exception as e:  # RayTaskError / RayActorError: report role, op and rank
                raise RoleError(f"{self.role}.{self.op} failed on actor rank {rank}: {_first_line(e)}") from e
        return self.combine(outputs)


def wait_all(*pending: Pending) -> list[Any]:
    """Results of several pending calls issued together (each bounded by its own timeout)."""
    return [p.result() for p in pending]


class WorkerGroup:
    """The actors of one role, addressed by rank."""

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
        return Pending(self.role, method, refs, timeout_s or self.timeout_s, combine)

    def scatter_async(
        self, method: str, *shards: Sequence[Any], combine: Callable[[list[Any]], Any] = list,
        timeout_s: float | None = None, **common: Any,
    ) -> Pending:
        """Actor ``i`` gets the ``i``-th item of every shard list (and ``common`` as keywords)."""
        for shard in shards:
            if len(shard) != len(self.actors):
                raise ValueError(f"{self.role}.{method}: {len(shard)} shards for {len(self.actors)} actors")
        refs = [getattr(a, method).remote(*args, **common) for a, *args in zip(self.actors, *shards)]
        return Pending(self.role, method, refs, timeout_s or self.timeout_s, combine)

    def kill(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
