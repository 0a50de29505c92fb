"""Remote waits are bounded and name the role and operation (real Ray actors, no engines needed)."""

from __future__ import annotations

import os
import time

import pytest
import ray

from rlhf_dist.worker_group import RoleError, WorkerGroup, wait_collective


class _Worker:
    def work(self, seconds: float) -> int:
        time.sleep(seconds)
        return 7

    def fail(self) -> None:
        raise ValueError("bad sample 3")


@pytest.fixture(scope="module")
def group():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    actors = [ray.remote(_Worker).options(num_cpus=0.5).remote() for _ in range(2)]
    yield WorkerGroup("reward", actors, timeout_s=30)
    ray.shutdown()


def test_results_in_rank_order(group):
    assert group.call_async("work", 0.0).result() == [7, 7]


def test_timeout_names_role_and_operation(group):
    start = time.monotonic()
    with pytest.raises(RoleError, match=r"^reward\.work timed out after 1s \(actor ranks \[0, 1\] did not answer\)"):
        group.call_async("work", 8.0, timeout_s=1.0).result()
    assert time.monotonic() - start < 6  # bounded by the timeout, not by the 8 s call


def test_remote_exception_names_role_operation_rank_and_cause(group):
    # Both ranks fail; whichever failure arrives first is reported (the wait ends at the first one).
    with pytest.raises(RoleError, match=r"^reward\.fail failed on actor rank [01]: ValueError: bad sample 3$"):
        group.call_async("fail").result()


class _Ranked:
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def ping(self) -> int:
        return self.rank

    def work_or_fail(self, seconds: float) -> int:
        if self.rank == 1:
            raise ValueError("rank 1 broke")
        time.sleep(seconds)  # rank 0: e.g. blocked in a collective with rank 1
        return 7

    def die_after(self, seconds: float) -> None:
        time.sleep(seconds)
        os._exit(1)


def test_first_failure_ends_the_wait_without_waiting_for_the_others(group):
    actors = [ray.remote(_Ranked).options(num_cpus=0.25).remote(r) for r in range(2)]
    ranked = WorkerGroup("policy", actors, timeout_s=30)
    start = time.monotonic()
    with pytest.raises(RoleError, match=r"^policy\.work_or_fail failed on actor rank 1: ValueError: rank 1 broke$"):
        ranked.call_async("work_or_fail", 20.0).result()
    assert time.monotonic() - start < 10  # not the 20 s of rank 0, nor the 30 s timeout
    ranked.kill()


def _until_dead(actor, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=within_s)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.1)
    pytest.fail(f"the killed actor still answered after {within_s:.0f}s")


def test_a_killed_actor_is_reported_as_lost(group):
    actors = [ray.remote(_Ranked).options(num_cpus=0.25).remote(r) for r in range(2)]
    ranked = WorkerGroup("reference", actors, timeout_s=30)
    assert ranked.call_async("ping").result() == [0, 1]
    ray.kill(actors[0], no_restart=True)
    _until_dead(actors[0])  # ray.kill is asynchronous: a call made right after it may still be served
    with pytest.raises(RoleError, match=r"^reference\.ping: actor rank 0 died \(") as excinfo:
        ranked.call_async("ping").result()
    assert excinfo.value.lost_actor and excinfo.value.role == "reference"
    ranked.kill()


def test_a_call_on_one_actor_names_that_actors_rank(group):
    actors = [ray.remote(_Ranked).options(num_cpus=0.25).remote(r) for r in range(2)]
    ranked = WorkerGroup("reference", actors, timeout_s=30)
    assert ranked.call_on_async(1, "ping").result() == 1
    with pytest.raises(RoleError, match=r"^reference\.work_or_fail failed on actor rank 1: ValueError: rank 1 broke$"):
        ranked.call_on_async(1, "work_or_fail", 0.0).result()
    timed_out = WorkerGroup("reference", actors, timeout_s=1)
    with pytest.raises(RoleError, match=r"\(actor ranks \[0\] did not answer\)"):
        timed_out.call_on_async(0, "work_or_fail", 8.0).result()
    ranked.kill()


def test_the_ends_of_a_collective_report_the_lost_one_even_when_another_fails_first(group):
    # A weight broadcast: the sender (policy rank 1 here) fails at once when a receiver dies ("Connection
    # closed by peer"), before Ray reports the receiver lost; that loss is what a recovery acts on.
    senders = WorkerGroup("policy", [ray.remote(_Ranked).options(num_cpus=0.25).remote(r) for r in range(2)], 30)
    receivers = WorkerGroup("generation", [ray.remote(_Ranked).options(num_cpus=0.25).remote(0)], 30)
    assert senders.call_async("ping").result() == [0, 1] and receivers.call_async("ping").result() == [0]
    lost = r"^generation\.die_after: actor rank 0 died \("
    # settle: every end is waited for (policy rank 0 works 3 s) before the error is raised
    start = time.monotonic()
    with pytest.raises(RoleError, match=lost) as settled:
        wait_collective(senders.call_async("work_or_fail", 3.0), receivers.call_async("die_after", 1.0), settle=True)
    assert settled.value.lost_actor and 3 <= time.monotonic() - start < 20
    # not settled: raised once the loss is known, without waiting for rank 0's 20 s
    receivers = WorkerGroup("generation", [ray.remote(_Ranked).options(num_cpus=0.25).remote(0)], 30)
    assert receivers.call_async("ping").result() == [0]
    start = time.monotonic()
    with pytest.raises(RoleError, match=lost):
        wait_collective(senders.call_async("work_or_fail", 20.0), receivers.call_async("die_after", 1.0), settle=False)
    assert time.monotonic() - start < 10
    senders.kill()
