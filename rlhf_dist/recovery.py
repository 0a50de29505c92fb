"""Recovery from lost actors, bounded by ``max_restarts`` over the whole run.

Two policies share one budget type: a lost engine is replaced in place (``EngineRecovery``, called
by ``Roles.generate``); any other lost actor restarts every role from the newest checkpoint
(``train.run_with_restarts``). Each has its own ``Restarts`` counter, made once per run, so a full
restart of the roles does not reset the engine count.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_dist.worker_group import RoleError

if TYPE_CHECKING:
    from rlhf_dist.cluster import Roles


@dataclass
class Restarts:
    """How often something was restarted: at most ``limit`` times."""

    limit: int
    count: int = 0

    def take(self) -> bool:
        """Count one more restart; False (nothing counted) once ``limit`` are spent."""
        if self.count >= self.limit:
            return False
        self.count += 1
        return True


def to_stderr(text: str) -> None:
    print(text, file=sys.stderr)


class EngineRecovery:
    """Replaces engine processes lost during a call: each in its placement slot, then every
    engine joins a new weight-transfer group and receives the current policy weights.
    ``notify`` reports each replacement; ``actors_file`` (if any) gets every actor's process id
    after each (re)start (``record``), for whoever watches or kills them from outside."""

    def __init__(
        self, restarts: Restarts, start_timeout_s: float,
        notify: Callable[[str], None] = to_stderr, actors_file: Path | None = None,
    ) -> None:
        self.restarts, self.start_timeout_s = restarts, start_timeout_s
        self.notify, self.actors_file = notify, actors_file

    def replace_lost_engines(self, roles: Roles, error: RoleError) -> bool:
        """Recover from ``error`` of a generation call; False when it cannot (not a lost actor, or
        no restarts left): the caller re-raises. True: the engines are back, the call can be retried."""
        if not error.lost_actor or not self.restarts.take():
            return False
        started = time.perf_counter()
        lost = roles.generation.respawn_lost(self.start_timeout_s)
        roles.weights.reconnect()
        self.record(roles)
        self.notify(f"rlhf_dist: {error}; replaced engine ranks {lost} and re-synced weights version "
                    f"{roles.weights.version} in {time.perf_counter() - started:.0f}s "
                    f"(restart {self.restarts.count}/{self.restarts.limit}), retrying")
        return True

    def record(self, roles: Roles) -> None:
        """Write every actor's process id to ``actors_file`` (atomically), if there is one."""
        if self.actors_file is not None:
            tmp = self.actors_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(roles.processes(self.start_timeout_s), indent=1) + "\n")
            os.replace(tmp, self.actors_file)
