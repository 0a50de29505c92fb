"""A sweep's trials as Ray jobs: the pure parts of the launcher ``hydra/launcher=ray_jobs``
(``hydra_plugins/rlhf_dist_ray_jobs``): a trial's command line, the schedule that keeps
``max_concurrent`` trials running, and what a finished trial returns to the sweeper.

A trial runs as ``python -m <the sweep's command>`` in a job of its own: the trial's overrides, a
join of the running cluster (``resources.ray_address=auto``) and the Hydra settings that make it the
job a launcher would have run in-process: its run dir ``<sweep dir>/<subdir>`` (so the sweep summary
and the W&B group see it as before), ``hydra.job.num`` and ``hydra.job.id``, the sweep dir. The
child writes ``.hydra/`` (config, overrides) itself, as any run does.

Here rather than beside the launcher: Hydra's plugin scan runs every module of a plugin package again
when something imported it first, which would give its exceptions a second class.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Quote, QuotedString

from rlhf_dist.driver.sweep import sweep_objective

# Ray's terminal job statuses (ray.job_submission.JobStatus), and the ones the launcher adds
SUCCEEDED, FAILED, STOPPED = "SUCCEEDED", "FAILED", "STOPPED"
TIMED_OUT, NOT_SUBMITTED, LOST, NO_SUMMARY = "TIMED_OUT", "NOT_SUBMITTED", "LOST", "NO_SUMMARY"
TERMINAL = frozenset({SUCCEEDED, FAILED, STOPPED})
# Hydra settings of the sweep that are no business of a trial's run: the sweep's own machinery, and
# what the launcher sets for each trial.
SWEEP_ONLY = ("hydra.mode", "hydra/launcher", "hydra.launcher", "hydra/sweeper", "hydra.sweeper", "hydra.sweep",
              "hydra.run", "hydra.job.num", "hydra.job.id")
JOIN = "resources.ray_address"
RAY_PREAMBLE = "Running entrypoint for job "  # the job manager's line before the entrypoint's output


class JobApiError(Exception):
    """A call of Ray's job API failed or timed out; the message is one line naming the trial and the
    operation."""


@dataclass(frozen=True)
class Trial:
    num: int  # hydra.job.num: the trial's index in the sweep
    overrides: tuple[str, ...]  # the sweeper's overrides for it
    run_dir: Path  # <sweep dir>/<hydra.sweep.subdir>, absolute

    @property
    def label(self) -> str:
        """How the launcher's lines name the trial: ``#1 (seed=2)``."""
        return f"#{self.num} ({' '.join(self.overrides) or 'no overrides'})"


@dataclass(frozen=True)
class Outcome:
    trial: Trial
    status: str  # a Ray job status, or TIMED_OUT / NOT_SUBMITTED / LOST / NO_SUMMARY
    message: str  # Ray's message about the job, or what went wrong
    job_id: str = ""  # the Ray submission id ("" if it was never submitted)

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED


class Jobs(Protocol):
    """Ray's job API as the schedule uses it; every method raises ``JobApiError`` in one line."""

    def submit(self, trial: Trial) -> str: ...  # the submission id

    def status(self, trial: Trial, job_id: str) -> tuple[str, str]: ...  # (status, Ray's message)

    def stop(self, trial: Trial, job_id: str) -> None: ...


def hydra_quoted(value: str) -> str:
    """``value`` as one Hydra override value, whatever it holds (a run dir named after the trial's
    overrides has ``=`` and ``,`` in it, which Hydra would read as a sweep)."""
    return QuotedString(text=value, quote=Quote.single).with_quotes()


def override_keys(overrides: Iterable[str]) -> list[str]:
    """The key or group each override sets (``+a.b=1`` -> ``a.b``, ``hydra/launcher=x`` -> ``hydra/launcher``)."""
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]


def trial_hydra_overrides(sweep_hydra_overrides: Sequence[str]) -> list[str]:
    """The sweep's ``hydra.*`` overrides a trial's run keeps (e.g. ``hydra.job.chdir``, logging)."""
    keys = override_keys(sweep_hydra_overrides)
    return [o for o, key in zip(sweep_hydra_overrides, keys)
            if not any(key == s or key.startswith(s + ".") for s in SWEEP_ONLY)]


def trial_command(python: str, module: str, config_name: str, config_dirs: Sequence[str], trial: Trial,
                  sweep_dir: Path, hydra_overrides: Sequence[str]) -> list[str]:
    """The argv of a trial's run: the sweep's command (``python -m rlhf_dist.train --config-name
    config``) with the trial's overrides, a join of the cluster unless they choose an address, the
    sweep's other Hydra overrides, and the job's place in the sweep."""
    join = [] if JOIN in override_keys(trial.overrides) else [f"{JOIN}=auto"]
    return [python, "-m", module, "--config-name", config_name, *(a for d in config_dirs for a in ("--config-dir", d)),
            *trial.overrides, *join, *trial_hydra_overrides(hydra_overrides),
            f"hydra.run.dir={hydra_quoted(str(trial.run_dir))}", f"hydra.sweep.dir={hydra_quoted(str(sweep_dir))}",
            f"hydra.job.num={trial.num}", f"hydra.job.id={trial.num}"]


def entrypoint(cwd: str, argv: Sequence[str]) -> str:
    """The Ray job's shell command: the trial runs from the directory the sweep was started in (each
    node has the checkout at the same path, as ``scripts/submit_job.sh`` assumes)."""
    return f"cd {shlex.quote(cwd)} && {shlex.join(argv)}"


def read_objective(run_dir: Path, objective: str) -> float | None:
    """A finished trial's value for the sweeper, from its ``summary.json``, as the command itself
    returns it (``sweep_objective``). FileNotFoundError if the run wrote none."""
    return sweep_objective(json.loads((run_dir / "summary.json").read_text()), objective)


def log_tail(logs: str, lines: int) -> str:
    """The last ``lines`` non-empty lines of a job's log, on one line; the lines Ray's job manager adds
    at the start (the runtime environment, the entrypoint) are left out: a run that fails at once
    would show only those."""
    kept = [line.strip() for line in logs.splitlines() if line.strip() and not line.startswith(RAY_PREAMBLE)
            and "\tINFO job_manager.py:" not in line]
    return " | ".join(kept[-lines:] if lines > 0 else [])


def failure_line(outcome: Outcome, tail: str) -> str:
    """The one line that reports a failed trial: its status, Ray's message, its job and its log's end."""
    # Ray's message for a failed entrypoint goes on with the log's end over many lines: its first line
    first = outcome.message.strip().splitlines()[0].split(", last available logs")[0] if outcome.message.strip() else ""
    message = f": {first}" if first else ""
    job = f" (ray job {outcome.job_id})" if outcome.job_id else ""
    last = f"; last log lines: {tail}" if tail else ""
    return f"rlhf_dist: trial {outcome.trial.label} failed: {outcome.status}{message}{job}{last}"


T = TypeVar("T")


def run_trials(trials: Sequence[Trial], jobs: Jobs, max_concurrent: int, timeout_s: float,
               clock: Callable[[], float], wait: Callable[[], None], on_end: Callable[[Outcome], T]) -> list[T]:
    """Submit ``trials`` in order, at most ``max_concurrent`` running at once; poll the running ones
    (``wait`` between rounds) until every one has ended; ``on_end`` is called as each ends and the
    results come back in the order of ``trials``. A trial that fails, cannot be submitted, or whose
    status cannot be read ends alone: the others go on. One running longer than ``timeout_s``
    (0: no limit, by ``clock``) is stopped. If this is interrupted (Ctrl-C), the running jobs are
    stopped."""
    waiting, running, results = deque(trials), {}, {}
    try:
        while waiting or running:
            while waiting and len(running) < max_concurrent:
                trial = waiting.popleft()
                try:
                    running[trial.num] = (trial, jobs.submit(trial), clock())
                except JobApiError as e:
                    results[trial.num] = on_end(Outcome(trial, NOT_SUBMITTED, str(e)))
            for num, (trial, job_id, started) in list(running.items()):
                outcome = poll(jobs, trial, job_id, clock() - started, timeout_s)
                if outcome is not None:
                    del running[num]
                    results[num] = on_end(outcome)
            if running:
                wait()
    finally:
        for trial, job_id, _ in running.values():
            stop_quietly(jobs, trial, job_id)
    return [results[t.num] for t in trials]


def poll(jobs: Jobs, trial: Trial, job_id: str, elapsed_s: float, timeout_s: float) -> Outcome | None:
    """The trial's outcome if it has ended (or now ends: timed out, status unreadable), else None."""
    try:
        status, message = jobs.status(trial, job_id)
    except JobApiError as e:
        stop_quietly(jobs, trial, job_id)  # not left running unwatched
        return Outcome(trial, LOST, str(e), job_id)
    if status in TERMINAL:
        return Outcome(trial, status, message, job_id)
    if timeout_s and elapsed_s > timeout_s:
        stop_quietly(jobs, trial, job_id)
        return Outcome(trial, TIMED_OUT, f"still {status} after {timeout_s:g}s (hydra.launcher.trial_timeout_s): "
                                         "stopped", job_id)
    return None


def stop_quietly(jobs: Jobs, trial: Trial, job_id: str) -> None:
    """Stop a trial's job; if that fails, one line says so (the trial's own outcome is the news)."""
    try:
        jobs.stop(trial, job_id)
    except JobApiError as e:
        print(f"rlhf_dist: warning: {e}; the job may still be running: ray job stop {job_id}", file=sys.stderr,
              flush=True)
