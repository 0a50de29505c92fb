"""The multi-node path, on a real Ray cluster of three nodes on this machine (scripts/local_cluster.py:
a head with the job API and two workers, each its own raylet), started once for every check:

- a run submitted through Ray's job API (scripts/submit_job.sh, resources=local_nodes) puts each
  role on the node its preset names (nodes.json), and its metrics equal the single-node run's;
- every step's scored batch is dumped (rollout.dump=true) and reads back as trained on;
- replaying those dumps (rollout.replay_from), with no engines or reward actors, gives the same
  metrics again;
- the node of the policy and critic ranks disappears mid-run (its raylet SIGKILLed, as a machine
  goes down) and a replacement node joins: every role restarts from the last checkpoint and the
  run completes with the same metrics as the uninterrupted single-node run (tolerance 0, as in
  test_reliability: placement changes no number);
- a sweep through hydra/launcher=ray_jobs runs its two trials as two Ray jobs side by side (their
  steps overlap in time), each in its job dir of the sweep, listed in the sweep summary.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest

from rlhf_dist.rollout import dump
from scripts.local_cluster import LocalCluster, node_resource
from tests.conftest import REPO
from tests.integration.test_reliability import assert_same_run, rows
from tests.wandb_reader import read_offline_run

pytestmark = pytest.mark.slow

STEPS = 6
TRAINER_NODE = 2  # resources=local_nodes: the policy and critic ranks on rlhf_node_2
RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    nodes = LocalCluster(cpus=4, logs=str(tmp_path_factory.mktemp("ray_nodes"))).start(workers=2)
    try:
        yield nodes
    finally:
        nodes.stop()


def node_ids(cluster: LocalCluster) -> dict[str, str]:
    """Node resource (rlhf_node_<i>) -> the id of the live node that has it."""
    return {r: n["NodeID"] for n in cluster.alive_nodes() for r in n["Resources"] if r.startswith("rlhf_node_")}


def wait_for(condition, what: str, job: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not condition():
        assert job.poll() is None, f"the job ended ({job.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_a_job_on_three_nodes_equals_the_single_node_run_and_survives_losing_the_trainer_node(
    cluster, default_run, tmp_path
):
    out = tmp_path / "run"
    console = (tmp_path / "job.console").open("w")
    job = subprocess.Popen(
        ["bash", "scripts/submit_job.sh", "--", "resources=local_nodes", f"total_steps={STEPS}",
         "checkpoint.every_steps=1", f"hydra.run.dir={out}", "logger.progress_bar=false", "rollout.dump=true"],
        cwd=REPO, stdout=console, stderr=subprocess.STDOUT, env={**os.environ, "RAY_ADDRESS": cluster.job_api},
    )
    try:
        # Each role on the node its preset names: node ids from the cluster's actor table.
        wait_for(lambda: (out / "nodes.json").exists(), "the actors' nodes", job)
        placed, ids = json.loads((out / "nodes.json").read_text()), node_ids(cluster)
        expected = {"generation": 1, "policy": TRAINER_NODE, "critic": TRAINER_NODE, "reference": 0, "reward": 0}
        assert placed == {role: [ids[node_resource(i)]] * len(placed[role]) for role, i in expected.items()}
        assert len(placed["policy"]) == len(placed["critic"]) == 2
        # The trainers' node goes down after step 2; a replacement joins.
        wait_for(lambda: len(rows(out)) >= 3, "step 2", job)  # checkpointed after every step
        lost = ids[node_resource(TRAINER_NODE)]
        cluster.kill_node(TRAINER_NODE)
        cluster.add_worker(TRAINER_NODE)
        assert job.wait(timeout=RUN_TIMEOUT_S) == 0, (tmp_path / "job.console").read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
    text = (tmp_path / "job.console").read_text()
    assert "succeeded" in text, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["restarts/roles"] == 1, summary
    replaced = json.loads((out / "nodes.json").read_text())
    assert replaced["policy"][0] != lost and replaced["policy"][0] == node_ids(cluster)[node_resource(TRAINER_NODE)]
    assert_same_run(rows(out), rows(default_run)[:STEPS])
    # every step's batch was dumped as trained on (rollout.dump=true; the steps redone after the
    # restart rewrote theirs): its scores are the step's reward (reward/mean is a float32 mean)
    for row in rows(out):
        batch = dump.read(out / "rollouts" / f"step_{row['step']:06d}.safetensors")
        assert len(batch.generations) == 64
        assert statistics.fmean(batch.scores) == pytest.approx(row["reward/mean"], rel=1e-6, abs=1e-7)
    # Replayed (rollout.replay_from, a local cluster of its own, no engines or reward actors):
    # the same losses and every other metric, step for step.
    replay = tmp_path / "replay"
    proc = subprocess.run([sys.executable, "-m", "rlhf_dist.train", f"rollout.replay_from={out}", f"total_steps={STEPS}",
                           f"hydra.run.dir={replay}", "logger.progress_bar=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads((replay / "actors.json").read_text())) == {"policy", "critic", "reference"}
    assert_same_run(rows(replay), rows(default_run)[:STEPS])


# A trial of the launcher test: GRPO without a KL (no critic, no reference actor) and one policy rank,
# so each trial places 3 actors of 1 CPU (generation, policy, reward) and two fit the 12 CPUs at once.
# A step of the tiny model takes about 2 s on 2 cores with two trials side by side; their first steps
# began 0.6 s and 4.8 s apart in two runs (whichever trial's roles come up first): 8 steps give spans of
# about 15 s, which overlap by 10 s or more. Logged to W&B offline, to read each trial's group back.
SWEEP_TRIAL = ["algo=grpo", "algo.kl_coef=0", "reference.monitor=false", "trainer.world_size=1", "total_steps=8",
               "logger.progress_bar=false", "logger=wandb", "logger.mode=offline"]


def step_span(run_dir) -> tuple[float, float]:
    """When the run's first step began and its last step ended (Unix seconds, from metrics.jsonl)."""
    steps = rows(run_dir)
    return steps[0]["time/end"] - steps[0]["time/step"], steps[-1]["time/end"]


def test_a_sweep_runs_its_trials_side_by_side_as_ray_jobs(cluster, tiny_policy, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "rlhf_dist.train", "-m", "seed=1,2", *SWEEP_TRIAL, "hydra/launcher=ray_jobs",
           "hydra.launcher.max_concurrent=2", "hydra.launcher.poll_s=1", f"hydra.launcher.trial_timeout_s={RUN_TIMEOUT_S}",
           f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 60, check=False,
                          env={**os.environ, "RAY_ADDRESS": cluster.job_api})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # each trial in its job dir of the sweep, written by the trial's own run (.hydra/overrides.yaml: the
    # sweeper's overrides and the join of the cluster), and in the sweep summary
    summary = {r["job"]: r for r in json.loads((sweep_dir / "sweep_summary.json").read_text())}
    assert sorted(summary) == ["0", "1"] and all(r["status"] == "completed" for r in summary.values())
    for job, seed in (("0", 1), ("1", 2)):
        assert summary[job]["overrides"].startswith(f"seed={seed} algo=grpo ")
        assert summary[job]["overrides"].endswith(" resources.ray_address=auto")
        # their actors on the cluster's nodes (not on a cluster of their own), their W&B runs in one group
        placed = json.loads((sweep_dir / job / "nodes.json").read_text())
        assert set().union(*placed.values()) <= set(node_ids(cluster).values())
        assert read_offline_run(sweep_dir / job / "wandb")["group"] == sweep_dir.name
    (first0, last0), (first1, last1) = step_span(sweep_dir / "0"), step_span(sweep_dir / "1")
    assert max(first0, first1) < min(last0, last1), (first0, last0, first1, last1)  # the steps overlap
