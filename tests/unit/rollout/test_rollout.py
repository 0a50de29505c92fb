"""Rollout batches saved in a checkpoint come back exactly (rollout.max_staleness >= 1)."""

from __future__ import annotations

import json
import math

from rlhf_dist.roles.generation import Generation
from rlhf_dist.rollout.queue import RolloutBatch


def test_a_rollout_batch_survives_the_state_json_round_trip():
    gens = [Generation([5, 6], [7, 8], [-0.25, -1.5], " a b", version=3), Generation([5], [], [], "", version=2)]
    batch = RolloutBatch(4, [[5, 6], [5]], ["p0", "p1"], [{"answer": 1}, {}], gens, [1.5, math.nan],
                         {"time/generate": 0.5})
    back = RolloutBatch.from_json(json.loads(json.dumps(batch.to_json())))
    assert back.generations == gens and [g.version for g in back.generations] == [3, 2]
    assert (back.step, back.prompt_ids, back.texts, back.metadata) == (4, [[5, 6], [5]], ["p0", "p1"], [{"answer": 1}, {}])
    assert back.scores[0] == 1.5 and math.isnan(back.scores[1])


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def recording_pass(name: str, size: int, calls: list, fields: tuple[str, ...] = ("ref_logprobs",)):
    """A pass whose bookkeeping is checked, not its model: each "logprob" is minus the token id (and
    a second field, if any, the token id), so every number says which token of which sample it is."""
    from rlhf_dist.rollout.passes import Pass

    def call(number, exp):
        calls.append((name, number, exp.response_ids[:, 0].tolist()))
        lp = -exp.response_ids.float() * exp.response_mask
        return _Done(lp if len(fields) == 1 else (lp, -lp))

    return Pass(name, name, fields, size, call)


def gen(i: int, length: int) -> tuple[int, Generation]:
    """Sample i with response tokens 10*i+1 .. 10*i+length."""
    return i, Generation([1, 2], [10 * i + t for t in range(1, length + 1)], [0.0] * length, "")


def test_streamed_passes_go_by_full_micro_batches_of_each_engine_and_come_back_in_sample_order():
    from rlhf_dist.driver.timeline import Timeline
    from rlhf_dist.rollout.passes import StreamedPasses

    calls = []
    passes = StreamedPasses([recording_pass("reference", 2, calls),
                             recording_pass("values", 3, calls, ("old_logprobs", "entropy"))],
                            Timeline(enabled=False), step=0)
    passes.add(1, [gen(3, 1)])  # engine 1: one sample, no micro-batch yet
    passes.add(0, [gen(0, 2), gen(2, 3), gen(1, 1)])  # engine 0: a reference micro-batch (0, 2); values (0, 2, 1)
    assert calls == [("reference", 0, [1, 21]), ("values", 0, [1, 21, 11])]
    passes.add(1, [gen(4, 2)])  # engine 1's two: a reference micro-batch
    assert calls[2] == ("reference", 1, [31, 41])
    times = {}
    out = passes.result(5, times)  # the leftovers of every engine together, in rank order
    assert calls[3:] == [("reference", 2, [11]), ("values", 1, [31, 41])]
    assert [o["ref_logprobs"] for o in out] == [[-1.0, -2.0], [-11.0], [-21.0, -22.0, -23.0], [-31.0], [-41.0, -42.0]]
    assert out[4]["old_logprobs"] == [-41.0, -42.0] and out[4]["entropy"] == [41.0, 42.0]
    assert set(times) == {"time/reference", "time/values"}


def test_an_empty_response_keeps_its_padded_position_like_the_whole_batch_pass():
    from rlhf_dist.driver.timeline import Timeline
    from rlhf_dist.rollout.passes import StreamedPasses, padded

    passes = StreamedPasses([recording_pass("reference", 4, [])], Timeline(enabled=False), step=0)
    passes.add(0, [(0, Generation([1], [], [], "")), (1, Generation([1], [7, 8], [0.0, 0.0], ""))])
    rows = passes.result(2, {})
    assert rows == [{"ref_logprobs": [-0.0]}, {"ref_logprobs": [-7.0, -8.0]}]  # collate's one pad token in row 0
    assert padded(rows, 3)["ref_logprobs"].tolist() == [[0.0, 0.0, 0.0], [-7.0, -8.0, 0.0]]
    assert padded([{}, {}], 3) == {}  # nothing streamed


def test_which_passes_stream():
    from rlhf_dist.cluster.start import Roles
    from rlhf_dist.rollout.passes import streamed_passes
    from tests.conftest import compose_config

    def names(*overrides, critic=False):
        roles = Roles(None, None, object() if critic else None, None, None, None, None)
        return [p.name for p in streamed_passes(compose_config(["rollout.stream_passes=true", *overrides]), roles)]

    assert names(critic=True) == ["reference", "values", "critic_values"]  # the default PPO, synchronous
    assert names("rollout.max_staleness=1", "algo.rollout_correction=tis", critic=True) == ["reference"]
    assert names("algo=grpo", "algo.ppo_epochs=1", "algo.minibatch_size=256", "rollout.batch_size=64") == [
        "reference"]  # one optimizer step: the old logprobs come from the update
    assert names("algo=dapo") == []  # no reference, dynamic sampling
    # LoRA: the reference is the policy ranks; streamed while the controller waits for the rollout, not
    # while it may be training them (overlapped): there it runs in the controller's thread
    assert names("model.lora.rank=8", critic=True) == ["reference", "values", "critic_values"]
    assert names("model.lora.rank=8", "rollout.max_staleness=1", "algo.rollout_correction=tis", critic=True) == []
    assert names("rollout.stream_passes=false", critic=True) == []
    none = Roles(None, None, None, None, None, None, None)
    assert streamed_passes(compose_config([]), none) == []  # local_cpu (the default) turns them off
    assert streamed_passes(compose_config(["resources=gpu_node"]), none)[0].name == "reference"  # the schema's
    sized = compose_config(["rollout.stream_passes=true", "reference.batch_size=5", "trainer.world_size=2",
                            "trainer.micro_batch_size=3"])
    assert [p.size for p in streamed_passes(sized, none)] == [5, 6]


def test_streamed_fields_survive_the_round_trip_and_old_rows_load():
    gens = [Generation([5], [7, 8], [-0.25, -1.5], " a b"), Generation([5], [9], [-0.5], " c")]
    batch = RolloutBatch(0, [[5], [5]], ["p", "p"], [{}, {}], gens, [1.0, 0.0], {}, {},
                         [{"ref_logprobs": [-0.5, -0.75]}, {"ref_logprobs": [-2.0]}])
    back = RolloutBatch.from_json(json.loads(json.dumps(batch.to_json())))
    assert back.streamed_fields(3)["ref_logprobs"].tolist() == [[-0.5, -0.75, 0.0], [-2.0, 0.0, 0.0]]
    old = batch.to_json()
    del old["streamed"]  # a state.json written before streamed passes
    assert RolloutBatch.from_json(old).streamed_fields(3) == {}
