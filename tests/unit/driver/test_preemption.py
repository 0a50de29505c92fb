"""SIGTERM/SIGINT handling (rlhf_dist/driver/preemption.py, cli.run_guarded): the first signal asks the
loop to stop between steps, the second exits at once; the command ends with one line and 128 + the
signal number. Real signals, sent to this process or to a child process."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_dist.checkpoint import Checkpointer
from rlhf_dist.cli import resume_command
from rlhf_dist.config import CheckpointConfig
from rlhf_dist.driver.preemption import Interrupted, Preemption
from tests.conftest import REPO


@pytest.fixture
def handlers():
    """Python's default SIGTERM/SIGINT handlers during the test (pytest started in the background
    ignores SIGINT), this process's own ones restored after it."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def deliver(signum: int) -> None:
    os.kill(os.getpid(), signum)
    time.sleep(0.01)  # Python runs the handler at the next bytecode of the main thread


def test_first_signal_only_asks_to_stop_the_second_exits_at_once(handlers):
    lines, exits = [], []
    stop = Preemption(write=lines.append, exit_now=exits.append)
    stop.install()
    stop.check("0 of 4 steps done")  # no signal yet: nothing happens
    deliver(signal.SIGTERM)
    assert stop.requested and stop.signum == signal.SIGTERM and exits == []
    assert lines == ["rlhf_dist: SIGTERM received: stopping after the current step (send it again to exit at once)"]
    with pytest.raises(Interrupted) as e:
        stop.check("2 of 4 steps done")
    assert str(e.value) == "interrupted by SIGTERM with 2 of 4 steps done"
    assert e.value.exit_code == 128 + 15 == 143
    deliver(signal.SIGINT)  # the second signal, whichever it is, exits with its own code: 128 + 2
    assert exits == [130]
    assert lines[-1] == "rlhf_dist: SIGINT again: exiting now; the newest complete checkpoint is intact"


def test_rearm_reinstalls_after_another_handler_took_over(handlers):
    """ray.init replaces the SIGTERM handler with its own (sys.exit(15)); rearm puts ours back."""
    stop = Preemption(write=lambda _: None, exit_now=lambda _: None)
    Preemption(write=lambda _: None).rearm()  # never installed: rearm installs nothing
    assert signal.getsignal(signal.SIGTERM) != stop.handle
    stop.install()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init does
    stop.rearm()
    deliver(signal.SIGTERM)
    assert stop.signum == signal.SIGTERM


def test_a_signal_ignored_at_start_stays_ignored(handlers):
    """A background job of a non-interactive shell starts with SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = Preemption(write=lambda _: None, exit_now=lambda _: None)
    stop.install()
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    deliver(signal.SIGINT)
    assert not stop.requested
    deliver(signal.SIGTERM)
    assert stop.signum == signal.SIGTERM
    stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_resume_command():
    python = shlex.quote(sys.executable)
    overrides = ["total_steps=4", "resume=auto", "data.prompts=/my data/p.jsonl"]
    # An earlier resume= is dropped; a value with a space is quoted so that the line can be pasted.
    assert resume_command("rlhf_dist.train", overrides, Path("/runs/a"), "resume=auto") == (
        f"resume with: {python} -m rlhf_dist.train total_steps=4 'data.prompts=/my data/p.jsonl' resume=auto "
        "hydra.run.dir=/runs/a")
    assert resume_command("rlhf_dist.pipeline", [], Path("/runs/p"), "", "config") == (
        f"resume with: {python} -m rlhf_dist.pipeline --config-name config hydra.run.dir=/runs/p")
    assert resume_command("rlhf_dist.sft", overrides, Path("/runs/s"), None) == (
        "rlhf_dist.sft keeps no checkpoints: run it again (in a new hydra.run.dir) to start over")


def test_a_stopping_run_checkpoints_unless_checkpoints_are_off(tmp_path):
    every_3 = Checkpointer(CheckpointConfig(every_steps=3), tmp_path, {})
    assert [every_3.due(n, 10) for n in (1, 2, 3, 10)] == [False, False, True, True]
    assert every_3.due(2, 10, stopping=True)
    assert not Checkpointer(CheckpointConfig(every_steps=0), tmp_path, {}).due(2, 10, stopping=True)


# A stage without Ray: "steps" of 0.3 s that poll the flag, run as `cli.run_guarded` runs a stage.
STAGE = """
import signal, sys, time
from pathlib import Path
from rlhf_dist.cli import run_guarded
from rlhf_dist.driver.preemption import PREEMPTION

def stage(cfg, out_dir, group):
    for step in range(1000):
        PREEMPTION.check(f"{step} of 1000 steps done")
        print(f"step {step}", flush=True)
        time.sleep(float(sys.argv[1]))
    return {}

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the test runs in the background
PREEMPTION.install()
run_guarded(stage, None, Path("."), "", "resume with: the command")
"""


def start_stage(step_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", STAGE, str(step_s)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "step 0\n"
    return proc


def test_sigterm_ends_a_stage_between_steps_with_one_line_and_exit_143():
    proc = start_stage(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 143
    assert out == "" and err.splitlines() == [
        "rlhf_dist: SIGTERM received: stopping after the current step (send it again to exit at once)",
        "rlhf_dist: interrupted by SIGTERM with 1 of 1000 steps done; resume with: the command",
    ]


def test_a_second_signal_exits_at_once():
    proc = start_stage(60.0)  # a step that would take a minute
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 5 and proc.returncode == 143
    assert err.splitlines()[-1] == "rlhf_dist: SIGTERM again: exiting now; the newest complete checkpoint is intact"
    assert "Traceback" not in err
