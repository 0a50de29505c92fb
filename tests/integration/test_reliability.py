"""Checkpoints, exact resume and actor failures, on the real stack, driven from outside.

Each run is ``python -m rlhf_dist.train`` in a subprocess. Failures are injected as a user or
the system would cause them: SIGTERM (a scheduler's preemption) and SIGKILL of the driver, SIGKILL
of an actor process (pids from the run's actors.json), SIGSTOP of an actor (a hang), and a full
filesystem under the checkpoints.

On CPU with a fixed seed a resumed or recovered run is expected to reproduce the uninterrupted
run's metrics exactly (tolerance 0). The uninterrupted run is README command 1's (the default
config, 20 steps, no checkpoint before step 10; made once per session by the ``default_run``
fixture, which test_default_run checks too): these runs differ from it only in total_steps and the
checkpoint settings, which change no step. Prompts and engine sampling seeds are keyed on the step,
trainer state (weights, Adam moments, LR schedule, step counters, RNG) is restored bit for bit
from float32 checkpoints, and every reduction (gloo, single-threaded torch) runs in a fixed order.
Only wall-clock figures (time/*, throughput/*) and the weight sync's probe gap (weight_sync/*: a check of
the engines, verified at other steps by a restarted or replayed run) differ.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_dist.checkpoint import verify
from tests.conftest import REPO

pytestmark = pytest.mark.slow

STEPS = 4
RUN = [f"total_steps={STEPS}", "checkpoint.every_steps=1", "logger.progress_bar=false"]  # else the default config
RUN_TIMEOUT_S = 600
# The injected hang: a reward or reference call takes ~0.01-0.2 s here, so 5 s is 25x that and
# a hang is reported 5 s after it starts.
HANG_TIMEOUT_S = 5


def launch(out: Path, *overrides: str, command: list[str] | None = None) -> subprocess.Popen:
    cmd = command or [sys.executable, "-m", "rlhf_dist.train", f"hydra.run.dir={out}", *RUN, *overrides]
    console = (out.parent / f"{out.name}.console").open("a")  # what a user sees: stdout and stderr in order
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, stdout=console, stderr=subprocess.STDOUT, env=env)


def run_job(out: Path, *overrides: str) -> subprocess.CompletedProcess:
    """README command 1's job with ``overrides`` (not this module's RUN), to its end: it must succeed."""
    cmd = [sys.executable, "-m", "rlhf_dist.train", f"hydra.run.dir={out}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=2 * RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def console_of(out: Path) -> str:
    return (out.parent / f"{out.name}.console").read_text()


def error_line(out: Path) -> str:
    """The one line a failed run ends with."""
    (line,) = [line for line in console_of(out).splitlines() if line.startswith("rlhf_dist: error:")]
    return line


def wait_until(proc: subprocess.Popen, condition, what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pid(out: Path, role: str, rank: int = 0) -> int:
    return json.loads((out / "actors.json").read_text())[role][rank]


def checkpoint(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def alive(process: int) -> bool:
    try:
        return Path(f"/proc/{process}/stat").read_text().split(")")[-1].split()[0] != "Z"  # a zombie is gone
    except FileNotFoundError:
        return False


def deterministic(row: dict) -> dict:
    """A row without its wall-clock figures and the sync's probe gap (a check of the engines, which a
    restarted or replayed run syncs, or not, at other steps)."""
    return {k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "weight_sync/"))}


def assert_same_run(got: list[dict], expected: list[dict]) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for g, e in zip(got, expected):
        assert deterministic(g) == deterministic(e), f"step {e['step']} differs"


@pytest.fixture(scope="module")
def uninterrupted(default_run) -> list[dict]:
    """The first STEPS rows of README command 1's run: no fault, no checkpoint before step 10."""
    return rows(default_run)[:STEPS]


def test_hang_then_sigterm_then_sigkill_then_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    out, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    wandb = ("logger=wandb", "logger.mode=offline")

    # 1. The reward actor hangs (SIGSTOP) in step 1: the call times out naming role and operation,
    #    the driver exits non-zero, and the checkpoint of step 1 stays intact.
    proc = launch(out, *wandb, f"timeouts.inference_s={HANG_TIMEOUT_S}")
    wait_until(proc, lambda: checkpoint(ckpts, 1).exists(), "the first checkpoint")
    os.kill(pid(out, "reward"), signal.SIGSTOP)
    assert finish(proc) == 1
    assert error_line(out).startswith(
        f"rlhf_dist: error: reward.score timed out after {HANG_TIMEOUT_S}s (actor ranks [0] did not answer)")
    assert "Traceback" not in console_of(out)
    assert verify(checkpoint(ckpts, 1)) == ""
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"

    # 2. Resumed with checkpoints due only after the last step; the driver gets SIGTERM (a
    #    scheduler's preemption) while step 1 waits on the reward actor, stopped until the handler
    #    has run. The step finishes, is checkpointed (none was due), the actors stop, and the run
    #    ends with one line saying how to resume, exit 128 + 15.
    before = len(console_of(out))
    stale = pid(out, "reward")
    proc = launch(out, *wandb, "resume=auto", "checkpoint.every_steps=4")
    wait_until(proc, lambda: pid(out, "reward") != stale, "the resumed run's actors")
    actors = json.loads((out / "actors.json").read_text())
    os.kill(pid(out, "reward"), signal.SIGSTOP)  # step 1 cannot end before the signal is handled
    try:
        proc.send_signal(signal.SIGTERM)
        wait_until(proc, lambda: "rlhf_dist: SIGTERM received" in console_of(out)[before:], "the handler's line")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid(out, "reward"), signal.SIGCONT)
    assert finish(proc) == 143
    console = console_of(out)[before:]
    assert "Traceback" not in console and "*** SIGTERM received" not in console  # nor Ray's stack dump
    (line,) = [line for line in console.splitlines() if line.startswith("rlhf_dist: interrupted")]
    assert line.startswith("rlhf_dist: interrupted by SIGTERM with 2 of 4 steps done; resume with: ")
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command == [sys.executable, "-m", "rlhf_dist.train", *RUN, *wandb, "checkpoint.every_steps=4",
                       "resume=auto", f"hydra.run.dir={out}"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["steps"] == 2 and summary["interrupted_by"] == "SIGTERM"
    assert [r["step"] for r in rows(out)] == [0, 1] and verify(checkpoint(ckpts, 2)) == ""
    deadline = time.monotonic() + 30
    while any(alive(p) for pids in actors.values() for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for pids in actors.values() for p in pids if alive(p)], "actor processes left running"

    # 3. The command it printed resumes (here checkpointing every step again); the driver is
    #    SIGKILLed once step 3's checkpoint is complete.
    proc = launch(out, command=[*command, "checkpoint.every_steps=1"])
    wait_until(proc, lambda: checkpoint(ckpts, 3).exists(), "the checkpoint of step 3")
    proc.send_signal(signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL

    # 4. Resumed again: it continues from step 3 and the whole run equals the uninterrupted one.
    proc = launch(out, *wandb, "resume=auto")
    assert finish(proc) == 0, console_of(out)[-3000:]
    assert_same_run(rows(out), uninterrupted)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == STEPS
    assert summary["resumed_from"] == str(checkpoint(ckpts, 3))
    # keep_last=2 complete checkpoints, nothing half-written left behind
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000003", "step_000004"]
    # Every attempt logged into the same W&B run.
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (out / "wandb").glob("offline-run-*")}
    assert len(list((out / "wandb").glob("offline-run-*"))) == 4 and len(run_ids) == 1

    # The checkpoint's exported policy is the final policy, and vLLM serves it like transformers.
    last_export, final = checkpoint(ckpts, STEPS) / "policy", out / "policy"
    assert_same_weights(last_export, final)
    assert_vllm_matches_transformers(last_export, tmp_path)


def assert_same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(wa[k].equal(wb[k]) for k in wa)


GREEDY_CHECK = '''
import json, sys
import torch
from vllm import LLM, SamplingParams, TokensPrompt
from transformers import AutoModelForCausalLM, AutoTokenizer

if __name__ == "__main__":  # in vLLM's own layout its engine core is a spawned process
    path = sys.argv[1]
    ids = AutoTokenizer.from_pretrained(path)("review : the pasta was")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path)
    hf = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    llm = LLM(model=path, dtype="float32", kv_cache_memory_bytes=2**26, max_model_len=128, enforce_eager=True)
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=12, temperature=0.0))
    print("GREEDY " + json.dumps({"hf": hf, "vllm": list(out[0].outputs[0].token_ids)}), flush=True)
'''


def assert_vllm_matches_transformers(model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "greedy_check.py"
    script.write_text(GREEDY_CHECK)
    # The engine core in this process, as the local_cpu preset runs it: no second process to
    # import vLLM and torch again (~20 s here), the same engine and kernels.
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run([sys.executable, str(script), str(model_dir)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("GREEDY ")]
    tokens = json.loads(line.removeprefix("GREEDY "))
    assert len(tokens["vllm"]) > 0 and tokens["vllm"] == tokens["hf"]


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs for the checkpoints, so that the test can fill it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> None:
    with (disk / "filler").open("wb", buffering=0) as f:  # unbuffered: the write that fails raises here
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError:
            pass


def test_lost_engine_and_reference_recovered_then_a_full_disk_ends_the_run_cleanly(
    uninterrupted, small_disk, tmp_path
):
    out, ckpts = tmp_path / "run", small_disk / "checkpoints"
    # rollout.dump: each step's rollout is on disk once it is taken (changes no step; time/* only)
    proc = launch(out, f"checkpoint.dir={ckpts}", "checkpoint.keep_last=1", "rollout.dump=true")

    # A generation engine dies after step 0's rollout: replaced within step 1, weights re-synced,
    # step goes on. Killed once that rollout is on disk, the engine is idle until step 1's sync:
    # a window of step 0's update, log and checkpoint (seconds), where the step-0 row leaves only the
    # checkpoint's (a loaded machine could then let the kill land in the sync or step 1's generation).
    wait_until(proc, lambda: (out / "rollouts" / "step_000000.safetensors").exists(), "step 0's rollout")
    os.kill(pid(out, "generation"), signal.SIGKILL)
    # The reference actor dies after step 1: every role restarts from the checkpoint of step 2.
    wait_until(proc, lambda: checkpoint(ckpts, 2).exists(), "the checkpoint of step 2")
    reference = pid(out, "reference")
    os.kill(reference, signal.SIGKILL)
    # The restarted roles redo step 2. Then the engine dies in the middle of step 3's weight sync: it is
    # stopped once step 2's redone rollout is on disk (idle until step 3's sync: the controller then
    # waits in its start_weight_update, before any trainer sends), trainer rank 0 once the checkpoint
    # of step 3 is written; resumed, the engine starts the update and waits in the broadcast for the
    # trainer, and is killed there. The trainer's send, resumed, fails at once ("Connection closed by
    # peer"): the engine is replaced, every end joins a new group, and step 3 goes on. Meanwhile the
    # checkpoint filesystem fills up: the checkpoint of step 4 cannot be written.
    wait_until(proc, lambda: pid(out, "reference") != reference, "the restart")
    step_2 = out / "rollouts" / "step_000002.safetensors"  # written once before the restart: a new file is the redo's
    first_dump = step_2.stat().st_ino if step_2.exists() else None
    wait_until(proc, lambda: step_2.exists() and step_2.stat().st_ino != first_dump, "step 2's rollout, redone")
    engine, trainer = pid(out, "generation"), pid(out, "policy")
    os.kill(engine, signal.SIGSTOP)
    try:
        wait_until(proc, lambda: checkpoint(ckpts, 3).exists() and not checkpoint(ckpts, 2).exists(),
                   "the checkpoint of step 3")
        fill(small_disk)
        os.kill(trainer, signal.SIGSTOP)
    finally:
        os.kill(engine, signal.SIGCONT)
    time.sleep(2)  # the engine answers start_weight_update and enters update_weights (milliseconds here)
    os.kill(engine, signal.SIGKILL)
    os.kill(trainer, signal.SIGCONT)
    assert finish(proc) == 1

    console = console_of(out)
    # found by the first engine call after the kill: the start of step 1's weight sync
    assert "generation.start_weight_update: actor rank 0 died" in console
    assert "reference.logprobs: actor rank 0 died" in console
    # found in the broadcast: the engine's loss is reported, not the trainer's failed send that may come first
    assert "generation.update_weights: actor rank 0 died" in console
    assert console.count("replaced engine ranks [0]") == 2
    assert f"restarting every role from {checkpoint(ckpts, 2)} (restart 1/2)" in console
    error = error_line(out)
    assert error.startswith("rlhf_dist: error: checkpoint step_000004 not written (")
    assert error.endswith(f"0 MiB free in {ckpts}); the previous checkpoint {checkpoint(ckpts, 3)} is intact")
    assert "Traceback" not in console
    # Nothing logged is lost, the recovered steps equal the uninterrupted run, and the last
    # checkpoint verifies. (A rank still writing when the first one failed may leave files in
    # .tmp-step_000004: never taken for a checkpoint, removed by the next one.)
    assert_same_run(rows(out), uninterrupted)
    assert verify(checkpoint(ckpts, 3)) == ""
    assert [p.name for p in ckpts.iterdir() if not p.name.startswith(".tmp-")] == ["step_000003"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["restarts/roles"] == 1 and summary["restarts/engines"] == 2
