"""hydra/launcher=ray_jobs (hydra_plugins/rlhf_dist_ray_jobs) through Hydra, in this process: whole
sweeps, the basic sweeper's and Optuna's, against Ray's job client played by a fake (the pure parts:
tests/unit/driver/test_sweep_jobs.py; a real cluster: tests/integration/test_multi_node.py)."""

from __future__ import annotations

import json
import logging
import re
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins

from hydra_plugins.rlhf_dist_ray_jobs import ray_jobs_launcher
from tests.conftest import REPO


class FakeCluster:
    """Ray's job client as the launcher calls it. A job 'runs' its trial's command on its first look:
    it writes what the run writes (.hydra/overrides.yaml, summary.json with reward/last_fifth_mean
    = seed / 10); a trial with a seed in ``failing`` exits 1 with a last log line that says why. It
    records the most jobs running at once."""

    def __init__(self, failing: frozenset[int] = frozenset()) -> None:
        self.failing, self.jobs, self.running, self.most_running = failing, {}, set(), 0
        self.elsewhere: frozenset[int] = frozenset()  # seeds whose run writes where the launcher cannot see

    def submit_job(self, *, entrypoint: str, submission_id: str, **resources) -> str:
        self.jobs[submission_id] = {"argv": shlex.split(entrypoint), "resources": resources, "looks": 0}
        self.running.add(submission_id)
        self.most_running = max(self.most_running, len(self.running))
        return submission_id

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        job = self.jobs[job_id]
        job["looks"] += 1
        if job["looks"] == 1:
            return SimpleNamespace(status="RUNNING", message="")
        self.running.discard(job_id)
        argv = job["argv"]
        overrides = argv[argv.index("--config-name") + 2:]
        parsed = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(overrides)}
        run_dir, seed = Path(parsed["hydra.run.dir"]), parsed["seed"]
        if seed in self.elsewhere:
            return SimpleNamespace(status="SUCCEEDED", message="Job finished successfully.")
        (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([o for o in overrides if "hydra." not in o]))
        failed = seed in self.failing
        summary = {"status": "failed", "error": "boom"} if failed else {"status": "completed",
                                                                        "reward/last_fifth_mean": seed / 10}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        if failed:
            return SimpleNamespace(status="FAILED", message="Job entrypoint command failed with exit code 1")
        return SimpleNamespace(status="SUCCEEDED", message="Job finished successfully.")

    def get_job_logs(self, job_id: str) -> str:
        return "roles started\nrlhf_dist: error: RoleError: boom\n"

    def stop_job(self, job_id: str) -> bool:
        return False


@pytest.fixture
def in_process():
    """Hydra run in this process: its logging set up for the sweep is undone afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:], root.level = handlers, level
    GlobalHydra.instance().clear()


@pytest.fixture
def fake_cluster(monkeypatch, in_process):
    cluster = FakeCluster(failing=frozenset({2}))
    Plugins.instance()  # Hydra's first plugin scan runs the launcher's module again: before the patch
    monkeypatch.setattr(ray_jobs_launcher.RayJobs, "_connect", lambda self: cluster)
    return cluster


def sweep(monkeypatch, *overrides: str) -> None:
    """``python -m rlhf_dist.train -m hydra/launcher=ray_jobs ...`` in this process."""
    import rlhf_dist.train

    GlobalHydra.instance().clear()
    monkeypatch.setattr(sys, "argv", ["rlhf_dist.train", "-m", "hydra/launcher=ray_jobs", "hydra.launcher.poll_s=0.001",
                                      "hydra.launcher.entrypoint_num_cpus=0.5", *overrides])
    monkeypatch.chdir(REPO)
    rlhf_dist.train.main()


def test_a_sweep_runs_its_trials_as_jobs_and_a_failed_one_stops_no_other(fake_cluster, monkeypatch, tmp_path, capsys):
    sweep_dir = tmp_path / "sweep"
    with pytest.raises(SystemExit) as ended:  # Hydra's basic sweeper raises the failed trial once all have run
        sweep(monkeypatch, "seed=1,2,3", "hydra.launcher.max_concurrent=2", f"hydra.sweep.dir={sweep_dir}")
    assert ended.value.code == 1
    assert fake_cluster.most_running == 2 and len(fake_cluster.jobs) == 3
    job = next(iter(fake_cluster.jobs.values()))
    assert job["resources"]["entrypoint_num_cpus"] == 0.5 and job["argv"][:3] == ["cd", str(REPO), "&&"]
    err = capsys.readouterr().err
    assert re.search(r"^rlhf_dist: trial #1 \(seed=2\) failed: FAILED: Job entrypoint command failed with exit "
                     r"code 1 \(ray job rlhf_dist-sweep-1-[0-9a-f]{6}\); last log lines: roles started \| "
                     r"rlhf_dist: error: RoleError: boom$", err, re.MULTILINE), err
    # the table of every trial is there though the sweeper ended the sweep on the failure
    rows = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert [(r["job"], r["status"], r.get("value")) for r in rows] == [
        ("2_seed=3", "completed", 0.3), ("0_seed=1", "completed", 0.1), ("1_seed=2", "failed", None)]


def test_an_optuna_sweep_gets_each_trials_value_from_its_job(fake_cluster, monkeypatch, tmp_path):
    sweep_dir = tmp_path / "optuna"
    fake_cluster.failing = frozenset()
    sweep(monkeypatch, "+sweep=optuna_ppo", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
          "seed=choice(1,4,7)", "hydra.launcher.max_concurrent=2",
          f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}")
    assert fake_cluster.most_running == 2 and len(fake_cluster.jobs) == 4
    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    rows = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert len(rows) == 4 and best["best_value"] == rows[0]["value"] == max(r["value"] for r in rows)
    assert best["best_params"]["seed"] * 0.1 == pytest.approx(best["best_value"], abs=1e-12)


def test_a_sweep_without_a_job_api_ends_in_one_line_before_any_trial(in_process, monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as ended:
        sweep(monkeypatch, "seed=1,2", "hydra.launcher.address=http://127.0.0.1:1", "hydra.launcher.request_timeout_s=5",
              f"hydra.sweep.dir={tmp_path}")
    assert ended.value.code == 1
    assert capsys.readouterr().err.splitlines() == [(
        "rlhf_dist: error: hydra/launcher=ray_jobs: no Ray job API answers at http://127.0.0.1:1 (ConnectionError: "
        "Failed to connect to Ray at address: http://127.0.0.1:1.); start the cluster (scripts/ray_cluster.sh head), "
        "or set hydra.launcher.address (or RAY_ADDRESS) to its job API")]
    assert not list(tmp_path.glob("*/.hydra"))


def test_a_bad_launcher_setting_is_a_config_error(in_process, monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as ended:
        sweep(monkeypatch, "seed=1,2", "hydra.launcher.max_concurrent=0", f"hydra.sweep.dir={tmp_path}")
    assert ended.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "rlhf_dist: config error: hydra.launcher.max_concurrent=0: must be at least 1"]


def test_a_trial_whose_summary_the_launcher_cannot_read_fails_saying_why(fake_cluster, monkeypatch, tmp_path, capsys):
    fake_cluster.failing, fake_cluster.elsewhere = frozenset(), frozenset({1})
    with pytest.raises(SystemExit):
        sweep(monkeypatch, "seed=1", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${hydra.job.num}")
    assert re.search(rf"^rlhf_dist: trial #0 \(seed=1\) failed: NO_SUMMARY: the job succeeded but {re.escape(str(tmp_path))}/0/"
                     r"summary.json cannot be read \(FileNotFoundError\); hydra.sweep.dir must be on storage every "
                     r"node shares \(ray job rlhf_dist-[^)]+\); last log lines: ", capsys.readouterr().err, re.MULTILINE)
