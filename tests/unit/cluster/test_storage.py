"""The shared-checkpoint-directory check (cluster.storage): its one line, from the ranks' answers."""

from __future__ import annotations

from rlhf_dist.cluster.storage import unshared


def test_a_checkpoint_dir_a_rank_does_not_share_is_refused_naming_the_rank_and_node(tmp_path):
    # A rank on a node with its own copy of the path would write its partition where nobody looks.
    answers = {("policy", 0): ("10.0.0.1", 11, True), ("policy", 1): ("10.0.0.2", 12, False),
               ("critic", 0): ("10.0.0.1", 13, True)}
    assert unshared(tmp_path, {k: v for k, v in answers.items() if k != ("policy", 1)}, {11, 13}) == ""
    assert unshared(tmp_path, answers, {11, 13}) == (
        f"checkpoint.dir: {tmp_path} is not one directory shared by the driver and every trainer rank: policy rank 1 "
        "on node 10.0.0.2 does not see the driver's probe file there; mount the same directory at this path on every "
        "node, or set checkpoint.dir (and hydra.run.dir) to such a mount (docs/cluster.md)"
    )
    # it saw the driver's file, but its own answer never reached the driver's view of the directory
    assert "critic rank 0 on node 10.0.0.1 left a probe file the driver does not see" in unshared(
        tmp_path, {("critic", 0): ("10.0.0.1", 13, True)}, set())
