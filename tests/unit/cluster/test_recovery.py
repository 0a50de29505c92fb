"""Engine recovery and the restart budget, on stand-in groups (no Ray)."""

from __future__ import annotations

import json

import pytest

from rlhf_dist.cluster.restarts import EngineRecovery, Restarts
from rlhf_dist.cluster.start import Roles
from rlhf_dist.roles.worker_group import RoleError

LOST = RoleError("generation.generate: actor rank 1 died", "generation", "generate", lost_actor=True)


def test_restarts_count_up_to_their_limit():
    budget = Restarts(limit=2)
    assert [budget.take() for _ in range(3)] == [True, True, False]
    assert budget.count == 2  # a refused restart is not counted
    assert not Restarts(limit=0).take()


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Engines:
    """Fails the first ``failures`` generate calls with ``error``; respawns rank 1."""

    def __init__(self, failures: int, error: RoleError = LOST) -> None:
        self.failures, self.error, self.calls, self.respawned = failures, error, 0, 0

    def generate(self, prompt_ids, seeds, greedy=False, rows=None):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return [f"{p}:{s}" for p, s in zip(prompt_ids, seeds)]

    def generate_async(self, prompt_ids, seeds, greedy=False):
        return _Done(self.generate(prompt_ids, seeds, greedy))

    def respawn_lost(self, start_timeout_s):
        self.respawned += 1
        return [1]


class _Weights:
    version, reconnects = 3, 0

    def reconnect(self):
        self.reconnects += 1


def _roles(engines: _Engines, recovery: EngineRecovery) -> Roles:
    return Roles(engines, None, None, None, None, _Weights(), recovery)  # type: ignore[arg-type]


def test_a_lost_engine_is_replaced_and_the_call_retried_within_the_budget():
    notes: list[str] = []
    recovery = EngineRecovery(Restarts(limit=1), start_timeout_s=5.0, notify=notes.append)
    roles = _roles(_Engines(failures=1), recovery)
    assert roles.generate(["a", "b"], [1, 2]) == ["a:1", "b:2"]
    assert (roles.generation.respawned, roles.weights.reconnects, recovery.restarts.count) == (1, 1, 1)
    assert notes[0].startswith("rlhf_dist: generation.generate: actor rank 1 died; replaced engine ranks [1] and "
                               "re-synced weights version 3 in ")
    assert notes[0].endswith("s (restart 1/1), retrying")
    # The budget is the recovery's, not the roles': new roles with the same recovery have none left.
    again = _roles(_Engines(failures=1), recovery)
    with pytest.raises(RoleError) as lost_again:  # the second loss exceeds max_restarts=1
        again.generate(["a"], [1])
    assert lost_again.value is LOST
    assert again.generation.respawned == 0 and recovery.restarts.count == 1


def test_an_error_that_is_not_a_lost_actor_is_not_recovered():
    timeout = RoleError("generation.generate: timed out after 5s", "generation", "generate")
    recovery = EngineRecovery(Restarts(limit=3), start_timeout_s=5.0, notify=lambda _: None)
    roles = _roles(_Engines(failures=1, error=timeout), recovery)
    with pytest.raises(RoleError) as raised:
        roles.generate(["a"], [1])
    assert raised.value is timeout
    assert recovery.restarts.count == 0 and roles.generation.respawned == 0


class _Running:
    def processes(self, timeout_s):
        assert timeout_s == 5.0
        return {"generation": [11, 12], "policy": [13]}

    def nodes(self):
        return {"generation": ["n1", "n2"], "policy": ["n1"]}


def test_record_writes_the_actors_file(tmp_path):
    path, running = tmp_path / "actors.json", _Running()
    EngineRecovery(Restarts(limit=1), start_timeout_s=5.0, actors_file=path).record(running)  # type: ignore[arg-type]
    assert json.loads(path.read_text()) == {"generation": [11, 12], "policy": [13]}
    assert json.loads((tmp_path / "nodes.json").read_text()) == {"generation": ["n1", "n2"], "policy": ["n1"]}
    assert not path.with_suffix(".tmp").exists() and not (tmp_path / "nodes.tmp").exists()
    EngineRecovery(Restarts(limit=1), start_timeout_s=5.0).record(running)  # type: ignore[arg-type]  # no file


def test_the_start_summary_names_each_part_in_whole_seconds():
    roles = Roles(None, None, None, None, None, None, None,  # type: ignore[arg-type]
                  start_s={"ray": 7.2, "policy": 55.6, "generation": 65.5, "weight_sync": 0.4})
    assert roles.start_summary() == "ray 7s, policy 56s, generation 66s, weight_sync 0s"
    assert Roles(None, None, None, None, None, None, None).start_summary() == ""  # type: ignore[arg-type]


class _LLM:
    """vLLM's ``LLM`` as far as the weight-transfer calls go: it refuses to leave a group during an
    update, as its worker does; ``receive_fails`` makes update_weights fail (a peer lost mid-broadcast)."""

    def __init__(self, receive_fails: bool = False) -> None:
        self.calls: list[str] = []
        self.active, self.receive_fails = False, receive_fails

    def start_weight_update(self) -> None:
        self.calls.append("start")
        self.active = True

    def update_weights(self, request: dict) -> None:
        self.calls.append("update")
        if self.receive_fails:
            self.active = False  # vLLM's worker ends an update whose receive failed
            raise RuntimeError("Connection closed by peer")

    def finish_weight_update(self, weight_version: str) -> None:
        assert self.active, "finish_weight_update called without a matching start_weight_update"
        self.calls.append(f"finish {weight_version}")
        self.active = False

    def reset_prefix_cache(self) -> None:
        pass

    def shutdown_weight_transfer_engine(self) -> None:
        assert not self.active, "Cannot release a trainer connection during a weight update"
        self.calls.append("shutdown")


def _engine(llm: _LLM):
    from rlhf_dist.roles.generation import GenerationEngine

    engine = GenerationEngine.__new__(GenerationEngine)  # no vLLM: only the weight-transfer calls
    engine.llm, engine.version, engine.updating, engine.adapter_config = llm, 3, False, None
    return engine


def test_a_surviving_engine_leaves_its_group_whatever_stage_its_update_reached():
    # A sync stopped at start_weight_update when another engine was found lost: this one's update was
    # started, never received; leaving the group for the recovery's new one finishes it on its weights.
    started = _engine(_LLM())
    started.start_weight_update()
    started.shutdown_weight_transfer()
    assert started.llm.calls == ["start", "finish 3", "shutdown"] and started.version == 3
    # A receive that failed (the broadcast lost a peer): vLLM ended the update already.
    failed = _engine(_LLM(receive_fails=True))
    failed.start_weight_update()
    with pytest.raises(RuntimeError, match="Connection closed by peer"):
        failed.update_weights({})
    failed.shutdown_weight_transfer()
    assert failed.llm.calls == ["start", "update", "shutdown"]
