"""Recovery from lost actors, bounded by ``max_restarts`` over the whole run.

Two policies share one budget type: a lost engine is replaced in place (``Roles.replace_lost_engines``,
within ``EngineRecovery``'s budget); any other lost actor restarts every role from the newest
checkpoint (``train.run_with_restarts``). Each has its own ``Restarts`` counter, made once per run, so a full
restart of the roles does not reset the engine count.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


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


class Running(Protocol):
    """What ``record`` reads: the process id of every actor, by role (``cluster.start.Roles``)."""

    def processes(self, timeout_s: float) -> dict[str, list[int]]: ...

    def nodes(self) -> dict[str, list[str]]: ...


class EngineRecovery:
    """The budget and the reporting of engine replacements (``Roles.replace_lost_engines`` does
    them): ``restarts`` counts them over the whole run, ``notify`` reports each; ``actors_file``
    (if any) gets every actor's process id after each (re)start (``record``), for whoever watches
    or kills them from outside."""

    def __init__(
        self, restarts: Restarts, start_timeout_s: float,
        notify: Callable[[str], None] = to_stderr, actors_file: Path | None = None,
    ) -> None:
        self.restarts, self.start_timeout_s = restarts, start_timeout_s
        self.notify, self.actors_file = notify, actors_file

    def record(self, running: Running) -> None:
        """Write every actor's process id to ``actors_file``, and its Ray node id to ``nodes.json``
        beside it (each atomically), if there is one."""
        if self.actors_file is not None:
            for path, content in ((self.actors_file.with_name("nodes.json"), running.nodes()),
                                  (self.actors_file, running.processes(self.start_timeout_s))):
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(content, indent=1) + "\n")
                os.replace(tmp, path)
