"""scripts/bench_cpu.py: which role a process is, and CPU seconds per step from two reads."""

import os
import time

import pytest

from scripts import bench_cpu as C


def test_a_process_is_named_by_its_actor_class_or_its_part_of_the_run():
    assert C.role_of("ray::GenerationEngine.generate_stream ") == "GenerationEngine"
    assert C.role_of("ray::PolicyTrainer ") == "PolicyTrainer"
    assert C.role_of("ray::IDLE ") == "ray"  # Ray's idle workers are not an actor's
    assert C.role_of("ray::DashboardAgent ") == "ray"  # nor are its per-node agents
    assert C.role_of("/v/bin/python -m rlhf_dist.train hydra.run.dir=/x") == "controller"
    assert C.role_of("/v/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x") == "ray"
    assert C.role_of("/usr/bin/sshd -D") == "other"


def test_cpu_per_step_is_the_difference_of_the_two_reads_over_the_steps_between(tmp_path):
    cpu = C.RunCpu(tmp_path / "metrics.jsonl", warmup=1)
    first = {1: ("GenerationEngine", 10.0), 2: ("GenerationEngine", 4.0), 3: ("controller", 1.0), 4: ("other", 5.0)}
    last = {1: ("GenerationEngine", 13.0), 2: ("GenerationEngine", 5.0), 3: ("controller", 1.5),
            5: ("ReferenceModel", 0.8)}  # pid 4 exited (its CPU is lost); pid 5 started in the window (all of it counts)
    cpu.first, cpu.last = (1, 100.0, first), (5, 108.0, last)  # 4 steps in 8 s
    out = cpu.per_step()
    assert out["GenerationEngine"] == pytest.approx((3.0 + 1.0) / 4)
    assert out["controller"] == pytest.approx(0.5 / 4)
    assert out["ReferenceModel"] == pytest.approx(0.8 / 4)
    assert "other" not in out
    assert out["cpu/used"] == pytest.approx(5.3 / 4)
    assert out["cpu/available"] == pytest.approx((os.cpu_count() or 1) * 8.0 / 4)
    assert list(out)[:3] == ["GenerationEngine", "ReferenceModel", "controller"]  # largest first
    assert "| **all** | 1.325 of " in C.table(out)


def test_no_figures_until_both_reads_were_taken(tmp_path):
    assert C.RunCpu(tmp_path / "metrics.jsonl", warmup=1).per_step() is None


def test_the_watcher_reads_after_the_warm_up_and_at_the_last_step(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    with C.RunCpu(metrics, warmup=1, poll_s=0.01) as cpu:
        for _ in range(3):
            with metrics.open("a") as f:
                f.write("{}\n")
            time.sleep(0.2)
    assert cpu.first[0] == 1 and cpu.last[0] == 3
    assert os.getpid() in cpu.last[2]  # this process was read
