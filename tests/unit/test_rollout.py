"""Rollout batches saved in a checkpoint come back exactly (rollout.max_staleness >= 1)."""

from __future__ import annotations

import json
import math

from rlhf_dist.roles.generation import Generation
from rlhf_dist.rollout import RolloutBatch


def test_a_rollout_batch_survives_the_state_json_round_trip():
    gens = [Generation([5, 6], [7, 8], [-0.25, -1.5], " a b", version=3), Generation([5], [], [], "", version=2)]
    batch = RolloutBatch(4, [[5, 6], [5]], ["p0", "p1"], [{"answer": 1}, {}], gens, [1.5, math.nan],
                         {"time/generate": 0.5})
    back = RolloutBatch.from_json(json.loads(json.dumps(batch.to_json())))
    assert back.generations == gens and [g.version for g in back.generations] == [3, 2]
    assert (back.step, back.prompt_ids, back.texts, back.metadata) == (4, [[5, 6], [5]], ["p0", "p1"], [{"answer": 1}, {}])
    assert back.scores[0] == 1.5 and math.isnan(back.scores[1])
