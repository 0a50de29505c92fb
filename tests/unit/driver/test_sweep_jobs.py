"""rlhf_dist.driver.sweep_jobs, the pure parts of hydra/launcher=ray_jobs: a trial's command line as
Hydra reads it, the schedule that keeps max_concurrent trials running, failed, lost and timed-out
trials ending alone, the line that reports one, and a trial's value (the launcher through Hydra's
sweepers: tests/unit/test_ray_jobs_launcher.py; on a real cluster: tests/integration/test_multi_node.py)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_dist.cli import sweep_group
from rlhf_dist.driver.sweep_jobs import (
    LOST,
    NOT_SUBMITTED,
    SUCCEEDED,
    TIMED_OUT,
    JobApiError,
    Outcome,
    Trial,
    entrypoint,
    failure_line,
    log_tail,
    read_objective,
    run_trials,
    trial_command,
)
from tests.conftest import REPO

# A run dir named after the trial's overrides, as conf/config.yaml's hydra.sweep.subdir names it:
# "=" and "," in it would read as a sweep if it were not quoted.
RUN_DIR = Path("/shared/multirun/d/t/3_algo.kl_coef=0.1,seed=2")
SWEEP_HYDRA = ["hydra.mode=MULTIRUN", "hydra/launcher=ray_jobs", "hydra.launcher.max_concurrent=2",
               "hydra.sweep.dir=/shared/multirun/d/t", "hydra.job.chdir=false", "hydra.verbose=true"]


def test_a_trial_runs_the_sweeps_command_as_that_job_of_the_sweep():
    trial = Trial(3, ("algo.kl_coef=0.1", "seed=2"), RUN_DIR)
    argv = trial_command("/venv/bin/python", "rlhf_dist.train", "config", ["/my/confs"], trial,
                         Path("/shared/multirun/d/t"), SWEEP_HYDRA)
    assert argv == [
        "/venv/bin/python", "-m", "rlhf_dist.train", "--config-name", "config", "--config-dir", "/my/confs",
        "algo.kl_coef=0.1", "seed=2", "resources.ray_address=auto",  # the trial's overrides; join the cluster
        "hydra.job.chdir=false", "hydra.verbose=true",  # the sweep's Hydra settings a run keeps
        f"hydra.run.dir='{RUN_DIR}'", "hydra.sweep.dir='/shared/multirun/d/t'", "hydra.job.num=3", "hydra.job.id=3",
    ]
    # The Ray job's shell command: from the sweep's directory, each word as it was
    command = entrypoint("/home/me/rlhf dist", argv)
    assert shlex.split(command) == ["cd", "/home/me/rlhf dist", "&&", *argv]


def test_a_trial_that_chooses_its_cluster_is_not_sent_to_another():
    trial = Trial(0, ("+resources.ray_address=10.0.0.5:6379",), RUN_DIR)
    argv = trial_command("python", "rlhf_dist.sft", "pipeline", [], trial, RUN_DIR.parent, [])
    assert [a for a in argv if "ray_address" in a] == ["+resources.ray_address=10.0.0.5:6379"]
    assert argv[:5] == ["python", "-m", "rlhf_dist.sft", "--config-name", "pipeline"]


def test_hydra_reads_the_trials_command_as_the_job_a_launcher_would_run(tmp_path):
    """The command, given to the real CLI (--cfg hydra: composed, not run): the run dir and the sweep
    dir read back exactly, the job number is set, the overrides Hydra records (.hydra/overrides.yaml)
    are the trial's plus the join, and the W&B group is the sweep dir's name, as in a multirun."""
    sweep_dir, run_dir = tmp_path / "sweep", tmp_path / "sweep" / "1_seed=2,algo.kl_coef=0.1"
    trial = Trial(1, ("seed=2", "algo.kl_coef=0.1"), run_dir)
    argv = trial_command(sys.executable, "rlhf_dist.train", "config", [], trial, sweep_dir, SWEEP_HYDRA)
    out = subprocess.run([*argv, "--cfg", "hydra"], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    hydra = OmegaConf.create(out.stdout).hydra
    assert (hydra.run.dir, hydra.sweep.dir, hydra.job.num, hydra.job.id) == (str(run_dir), str(sweep_dir), 1, "1")
    assert list(hydra.overrides.task) == ["seed=2", "algo.kl_coef=0.1", "resources.ray_address=auto"]
    assert (hydra.job.chdir, hydra.verbose) == (False, True)
    assert sweep_group(hydra) == "sweep"
    hydra.job.num = "???"  # as in a single run (no launcher gave it a number): no group
    assert sweep_group(hydra) == ""


class FakeJobs:
    """Ray's job API as the schedule sees it: trial ``num`` is RUNNING for ``polls[num]`` looks, then
    ``ends[num]`` (default SUCCEEDED); it records how many ran at once."""

    def __init__(self, polls: dict[int, int], ends: dict[int, str] | None = None) -> None:
        self.polls, self.ends = dict(polls), ends or {}
        self.running: set[int] = set()
        self.most_running, self.submitted, self.stopped = 0, [], []

    def submit(self, trial: Trial) -> str:
        self.submitted.append(trial.num)
        self.running.add(trial.num)
        self.most_running = max(self.most_running, len(self.running))
        return f"job{trial.num}"

    def status(self, trial: Trial, job_id: str) -> tuple[str, str]:
        if self.polls[trial.num] > 0:
            self.polls[trial.num] -= 1
            return "RUNNING", ""
        self.running.discard(trial.num)
        return self.ends.get(trial.num, SUCCEEDED), ""

    def stop(self, trial: Trial, job_id: str) -> None:
        self.stopped.append(job_id)
        self.running.discard(trial.num)


def trials(n: int) -> list[Trial]:
    return [Trial(i, (f"seed={i}",), Path(f"/sweep/{i}")) for i in range(n)]


def schedule(jobs, n: int, max_concurrent: int, timeout_s: float = 0.0, clock=lambda: 0.0, wait=lambda: None):
    ended: list[int] = []

    def on_end(outcome: Outcome) -> Outcome:
        ended.append(outcome.trial.num)
        return outcome

    results = run_trials(trials(n), jobs, max_concurrent, timeout_s, clock=clock, wait=wait, on_end=on_end)
    return results, ended


def test_at_most_max_concurrent_trials_run_and_the_next_starts_when_one_ends():
    # Each round submits into the free slots, then looks at every running trial once:
    # round 1: 0 and 1 submitted; 1 ends.     round 2: 2 submitted; 0 and 2 run on.
    # round 3: 0 ends.                          round 4: 3 submitted and ends (2 runs on).
    # round 5: 4 submitted and ends.           rounds 6-7: 2 ends at its sixth look.
    jobs = FakeJobs(polls={0: 2, 1: 0, 2: 5, 3: 0, 4: 0})
    results, ended = schedule(jobs, 5, max_concurrent=2)
    assert jobs.most_running == 2 and jobs.submitted == [0, 1, 2, 3, 4]
    assert ended == [1, 0, 3, 4, 2]
    assert [r.trial.num for r in results] == [0, 1, 2, 3, 4]  # in the sweeper's order, not the ending order
    assert all(r.succeeded and r.job_id == f"job{r.trial.num}" for r in results)


def test_one_trial_at_a_time_when_max_concurrent_is_one():
    jobs = FakeJobs(polls={0: 1, 1: 1, 2: 1})
    schedule(jobs, 3, max_concurrent=1)
    assert jobs.most_running == 1


def test_a_failed_trial_ends_alone_and_the_others_go_on():
    jobs = FakeJobs(polls={0: 1, 1: 0, 2: 2}, ends={1: "FAILED"})
    results, _ = schedule(jobs, 3, max_concurrent=2)
    assert [r.status for r in results] == [SUCCEEDED, "FAILED", SUCCEEDED]
    assert jobs.submitted == [0, 1, 2] and not jobs.stopped


class UnreliableJobs(FakeJobs):
    """Trial 0 cannot be submitted; trial 1's status cannot be read."""

    def submit(self, trial: Trial) -> str:
        if trial.num == 0:
            raise JobApiError("trial #0 (seed=0): submit at http://head:8265: timed out after 30s")
        return super().submit(trial)

    def status(self, trial: Trial, job_id: str) -> tuple[str, str]:
        if trial.num == 1:
            raise JobApiError(f"trial #1 (seed=1): status of ray job {job_id} at http://head:8265: ConnectionError")
        return super().status(trial, job_id)


def test_a_trial_the_job_api_fails_for_ends_alone_naming_it_and_the_call():
    jobs = UnreliableJobs(polls={0: 0, 1: 0, 2: 1})
    results, _ = schedule(jobs, 3, max_concurrent=2)
    assert [r.status for r in results] == [NOT_SUBMITTED, LOST, SUCCEEDED]
    assert results[0].message == "trial #0 (seed=0): submit at http://head:8265: timed out after 30s"
    assert results[0].job_id == ""
    assert results[1].message.startswith("trial #1 (seed=1): status of ray job job1")
    assert jobs.stopped == ["job1"]  # not left running unwatched


def test_a_trial_past_its_timeout_is_stopped_and_fails():
    # a clock the waits move on by 4 s: trial 0 never ends; it is looked at after 0, 4, 8 and 12 s, and
    # the fourth look (12 s > 10 s) stops it; trial 1 ends at its second look
    now = [0.0]
    jobs = FakeJobs(polls={0: 1000, 1: 1})
    results, _ = schedule(jobs, 2, max_concurrent=2, timeout_s=10.0, clock=lambda: now[0],
                          wait=lambda: now.__setitem__(0, now[0] + 4.0))
    assert [r.status for r in results] == [TIMED_OUT, SUCCEEDED]
    assert results[0].message == "still RUNNING after 10s (hydra.launcher.trial_timeout_s): stopped"
    assert jobs.stopped == ["job0"] and jobs.polls[0] == 1000 - 4


def test_an_interrupted_sweep_stops_the_trials_it_started():
    jobs = FakeJobs(polls={0: 5, 1: 5, 2: 5})

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        schedule(jobs, 3, max_concurrent=2, wait=interrupt)
    assert sorted(jobs.stopped) == ["job0", "job1"] and jobs.submitted == [0, 1]


def test_a_failed_trial_is_one_line_with_the_end_of_its_log():
    logs = "step 0\n\n(pid=12) noise\nTraceback ...\nrlhf_dist: error: reward.score timed out after 10s\n"
    # Ray's message for a failed entrypoint carries the log again, over several lines: its first line only
    message = "Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\nstep 0"
    line = failure_line(Outcome(Trial(1, ("seed=2",), RUN_DIR), "FAILED", message, "rlhf_dist-t-1-ab12cd"),
                        log_tail(logs, 2))
    assert line == ("rlhf_dist: trial #1 (seed=2) failed: FAILED: Job entrypoint command failed with exit code 1 "
                    "(ray job rlhf_dist-t-1-ab12cd); last log lines: Traceback ... | "
                    "rlhf_dist: error: reward.score timed out after 10s")
    assert "\n" not in line
    # a run that fails at once: its own line, not what Ray's job manager writes before it
    preamble = ("2026-12-07 15:51:24,970\tINFO job_manager.py:581 -- Runtime env is setting up.\n"
                "Running entrypoint for job rlhf_dist-t-0-54c1d7: cd /x && python -m rlhf_dist.train\n")
    assert log_tail(preamble + "rlhf_dist: config error: algo.minibatch_size=33: ...\n", 5) == (
        "rlhf_dist: config error: algo.minibatch_size=33: ...")
    assert failure_line(Outcome(Trial(0, (), RUN_DIR), NOT_SUBMITTED, "trial #0 (no overrides): submit at x: y"),
                        "") == "rlhf_dist: trial #0 (no overrides) failed: NOT_SUBMITTED: trial #0 (no overrides): submit at x: y"


def test_a_trials_value_is_what_its_command_returns_read_from_its_summary(tmp_path):
    import rlhf_dist.sft
    import rlhf_dist.train

    (tmp_path / "summary.json").write_text(json.dumps({"status": "completed", "reward/last_fifth_mean": 0.75,
                                                       "sft/final_eval_loss": 2.5}))
    # each command's objective, as its entry point returns it to an in-process sweeper
    assert read_objective(tmp_path, rlhf_dist.train.main.sweep_objective) == 0.75
    assert read_objective(tmp_path, rlhf_dist.sft.main.sweep_objective) == 2.5
    assert read_objective(tmp_path, "") is None  # a command without an objective (evaluate, label)
    with pytest.raises(FileNotFoundError):
        read_objective(tmp_path / "never_ran", "reward/last_fifth_mean")
