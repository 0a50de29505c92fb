"""A dumped rollout step (rollout.dump=true) reads back as the batch it was, bit for bit."""

from __future__ import annotations

import math

import pytest

from rlhf_dist.config import ConfigError, actor_counts, validate_config
from rlhf_dist.roles.generation import Generation
from rlhf_dist.rollout import dump
from rlhf_dist.rollout.queue import RolloutBatch
from tests.conftest import compose_config


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


def test_a_replay_needs_dumped_rollouts_and_no_evaluation(tmp_path):
    with pytest.raises(ConfigError, match=r"^rollout\.replay_from='.*': holds no dumped rollouts \(rollouts/step_"):
        validate_config(compose_config([f"rollout.replay_from={tmp_path}"]))
    (tmp_path / "rollouts").mkdir()
    (tmp_path / "rollouts" / "step_000000.safetensors").write_bytes(b"")
    cfg = compose_config([f"rollout.replay_from={tmp_path}"])
    validate_config(cfg)
    assert actor_counts(cfg) == {"policy": 2, "reference": 1, "critic": 2}  # no engines, no reward actors
    with pytest.raises(ConfigError, match=r"^eval\.every_steps=5: must be 0 with rollout\.replay_from"):
        validate_config(compose_config([f"rollout.replay_from={tmp_path}", "eval.every_steps=5",
                                        "data.eval_prompts=builtin:reviews"]))
    with pytest.raises(FileNotFoundError, match=r"^rollout\.replay_from: no dumped rollout of step 1 \("):
        dump.ReplayQueue(str(tmp_path)).take(1)
