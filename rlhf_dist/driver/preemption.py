"""Stopping a run on SIGTERM (what schedulers send before SIGKILL) or SIGINT (Ctrl-C).

The first signal only sets a flag: the stage's loop finishes the step it is in (no remote wait
is cut short), checkpoints it, and raises ``Interrupted``; the stage's summary records
``status: interrupted`` and the command exits with 128 + the signal number, printing how to
resume. A second signal exits at once.

``ray.init`` replaces the driver's SIGTERM handler (with one that calls ``sys.exit(15)``, and a
native one that dumps a stack trace), so ``rearm`` installs ours again after every ``ray.init``.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped between steps because of a signal; ``done`` says how far it got."""

    def __init__(self, signum: int, done: str) -> None:
        self.signum, self.done = signum, done
        super().__init__(f"interrupted by {signal.Signals(signum).name} with {done}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # a shell's convention: 143 for SIGTERM, 130 for SIGINT


def _stderr(text: str) -> None:
    os.write(2, (text + "\n").encode())  # not print(): a handler may run while print holds its lock


class Preemption:
    """The process's SIGTERM/SIGINT handling: ``install`` it, poll ``requested`` between steps."""

    def __init__(self, write: Callable[[str], None] = _stderr, exit_now: Callable[[int], None] = os._exit) -> None:
        self.write, self.exit_now = write, exit_now
        self.signum = 0  # the first signal received, 0 for none
        self.installed: tuple[int, ...] = ()

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def install(self) -> None:
        """Handle SIGTERM and SIGINT, except one the process was started to ignore (a background
        job of a non-interactive shell ignores SIGINT, and should go on doing so)."""
        self.installed = tuple(s for s in SIGNALS if signal.getsignal(s) is not signal.SIG_IGN)
        self.rearm()

    def rearm(self) -> None:
        """Install the handlers again if ``install`` was called: needed after every ``ray.init``."""
        for signum in self.installed:
            signal.signal(signum, self.handle)

    def uninstall(self) -> None:
        for signum in self.installed:
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM else signal.default_int_handler)
        self.installed, self.signum = (), 0

    def handle(self, signum: int, frame: object = None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            self.write(f"rlhf_dist: {name} again: exiting now; the newest complete checkpoint is intact")
            self.exit_now(128 + signum)
            return
        self.signum = signum
        self.write(f"rlhf_dist: {name} received: stopping after the current step "
                   f"(send it again to exit at once)")

    def check(self, done: str) -> None:
        """Raise ``Interrupted`` if a signal came; ``done`` says how far the run got ("2 of 4 steps done")."""
        if self.requested:
            raise Interrupted(self.signum, done)


PREEMPTION = Preemption()  # signal handlers are per process: one instance, installed by the command
