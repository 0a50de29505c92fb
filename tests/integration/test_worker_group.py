"""Remote waits are bounded and name the role and operation (real Ray actors, no engines needed)."""

from __future__ import annotations

import os
import time

import pytest
import ray

from rlhf_dist.roles.worker_group import RoleError, WorkerGroup, wait_collective


class _Worker:
    def work(self, seconds: float) -> int:
        time.sleep(seconds)
        return 7

    def fail(self) -> None:
        raise ValueError("bad sample 3")


@pytest.fixture(scope="module")
def group():
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
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

    def reset_or_die(self, seconds: float) -> None:
        if self.rank == 1:  # what a gloo peer raises when the other rank's process is gone
            raise RuntimeError("gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
        self.die_after(seconds)


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


class _Collective(WorkerGroup):
    collective = True  # as a DeepSpeed group's calls (roles.groups.TrainerGroup)


def test_a_collective_rank_that_fails_first_gives_way_to_the_peer_that_was_lost(group):
    # The node of a DeepSpeed group's ranks goes down: a rank still alive for a moment fails its
    # collective ("Connection reset by peer") before Ray reports its peer lost. Reported as that
    # failure, the run would end; the loss is what restarts the roles from a checkpoint.
    ranks = _Collective("policy", [ray.remote(_Ranked).options(num_cpus=0.25).remote(r) for r in range(2)], 30)
    assert ranks.call_async("ping").result() == [0, 1]
    start = time.monotonic()
    with pytest.raises(RoleError, match=r"^policy\.reset_or_die: actor rank 0 died \(") as lost:
        ranks.call_async("reset_or_die", 1.0).result()
    assert lost.value.lost_actor and time.monotonic() - start < 30
    # calls that are no collective report the first failure, at once
    plain = WorkerGroup("reward", [ray.remote(_Ranked).options(num_cpus=0.25).remote(r) for r in range(2)], 30)
    with pytest.raises(RoleError, match=r"^reward\.reset_or_die failed on actor rank 1: RuntimeError: .*reset by peer"):
        plain.call_async("reset_or_die", 1.0).result()
    plain.kill()


class _Starts:
    """An actor of any role whose constructor raises when told to (what a bad model path does)."""

    def __init__(self, fail: bool) -> None:
        if fail:
            raise ValueError("reward model '/m': no config.json\n(a Hugging Face model directory has one)")

    def pid(self) -> int:
        return os.getpid()

    def endpoint(self) -> tuple[str, int]:
        return "127.0.0.1", 0

    def setup(self, host: str, port: int) -> None:
        pass


def test_a_constructor_that_raises_is_one_line_naming_role_rank_and_node(group):
    # Every role's start as cluster.start_roles / start_trainer_group waits for it: the inference
    # roles' first call ("pid"), the trainers' setup (rank 0's "endpoint", then every rank's "setup").
    from rlhf_dist.cluster.start import wait_started
    from rlhf_dist.roles import groups
    from tests.conftest import compose_config

    cfg = compose_config(["timeouts.actor_start_s=60"])
    node = ray.util.get_node_ip_address()
    starts = ray.remote(_Starts).options(num_cpus=0.1)
    inference = {"generation": groups.GenerationGroup, "reference": groups.ReferenceGroup, "reward": groups.RewardGroup}
    trainers = {"policy": groups.PolicyGroup, "critic": groups.CriticGroup, "sft": groups.SFTGroup,
                "reward_model": groups.RewardModelGroup}
    # Rank 1 of the trainers fails (rank 0 hosts the rendezvous and starts), rank 0 of the others.
    started = {role: cls(role, [starts.remote(True)], 60) for role, cls in inference.items()}
    started |= {role: cls(role, [starts.remote(False), starts.remote(True)], 60) for role, cls in trainers.items()}
    for role, g in started.items():
        trainer = role in trainers
        with pytest.raises(RoleError) as excinfo:
            wait_started(cfg, [] if trainer else [g], trainers=(g,) if trainer else ())
        assert str(excinfo.value) == (
            f"{role} rank {1 if trainer else 0} on node {node} failed to start: ValueError: reward model '/m': no config.json "
            "(a Hugging Face model directory has one)"
        )
        assert not excinfo.value.lost_actor  # a restart would fail the same way
        g.kill()


def test_a_real_role_that_cannot_load_its_model_reports_the_loaders_message(group, tmp_path):
    # The reference role as cluster.start_roles starts it: its placement slot, its actor environment.
    from ray.util.placement_group import remove_placement_group

    from rlhf_dist.cluster.placement import place
    from rlhf_dist.cluster.start import start_reference, wait_started
    from tests.conftest import compose_config

    cfg = compose_config(["resources.reference.cpus=0.25", "timeouts.actor_start_s=120"])
    slots = place(cfg.resources, {"reference": 1}, 60)["reference"]
    reference = start_reference(cfg, str(tmp_path / "no-model"), slots)
    with pytest.raises(RoleError) as excinfo:
        wait_started(cfg, [reference])
    reference.kill()
    remove_placement_group(slots[0].pg)
    # transformers' own words (OSError: Repo id must be in the form ... '<path>'. ...), on one line
    message = str(excinfo.value)
    assert message.startswith(f"reference rank 0 on node {ray.util.get_node_ip_address()} failed to start: OSError: ")
    assert f"'{tmp_path / 'no-model'}'" in message and "\n" not in message, message
