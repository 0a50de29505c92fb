"""A dumped rollout step (rollout.dump=true) reads back as the batch it was, bit for bit."""

from __future__ import annotations

import math

from rlhf_dist.roles.generation import Generation
from rlhf_dist.rollout import dump
from rlhf_dist.rollout.queue import RolloutBatch


def test_a_dumped_step_reads_back_exactly_and_prints(tmp_path):
    gens = [
        Generation([1, 5, 7], [9, 2], [-0.1234567890123, -2.5e-9], " good .", version=3),
        Generation([1, 5, 7], [], [], "", version=3, truncated=True),  # an empty response
        Generation([1, 6], [4, 4, 8, 2], [-1.0, -0.5, -0.25, -0.125], " a <tool> 7", version=2,
                   action_mask=[1, 0, 0, 1], env={"turns": 2, "return": float("nan"), "error": "timeout"},
                   transcript="[model] a [env] 7"),
    ]
    batch = RolloutBatch(
        step=12, prompt_ids=[g.prompt_ids for g in gens], texts=["p0", "p0", "p1"],
        metadata=[{}, {}, {"answer": 7}], generations=gens, scores=[0.5, float("nan"), 1 / 3],
        times={"time/generate": 0.25}, stats={"rollout/filtered_groups": 1.0},
        streamed=[{"ref_logprobs": [-0.2, -0.3]}, {"ref_logprobs": [0.0]}, {"ref_logprobs": [-1.0] * 4}],
    )
    path = dump.write(tmp_path / "rollouts", batch)
    assert path == tmp_path / "rollouts" / "step_000012.safetensors"
    assert not list((tmp_path / "rollouts").glob("*.tmp"))
    back = dump.read(path)
    assert math.isnan(back.scores[1]) and math.isnan(back.generations[2].env["return"])
    back.scores[1] = batch.scores[1]  # NaN != NaN
    back.generations[2].env["return"] = gens[2].env["return"]
    assert back == batch
    text = dump.show(back, rows=2)
    assert "--- sample 1: score dropped, policy version 3, 0 response tokens (cut off)" in text
    assert "response: ' good .'" in text and "sample 2" not in text
