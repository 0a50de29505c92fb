"""The placement arithmetic (which bundle holds which actor, with what resources) and the rank spec."""

from __future__ import annotations

import dataclasses

import pytest

from rlhf_dist.config import RoleResources
from rlhf_dist.placement import layout, role_bundle
from rlhf_dist.roles.spec import RankSpec


def test_role_bundle_has_a_gpu_key_only_with_gpus():
    assert role_bundle(RoleResources(cpus=2.0, gpus=0.0)) == {"CPU": 2.0}
    assert role_bundle(RoleResources(cpus=1.0, gpus=0.5)) == {"CPU": 1.0, "GPU": 0.5}


def test_separate_gives_every_role_its_own_group_one_bundle_per_actor():
    per_role = {"generation": RoleResources(cpus=1.0, gpus=0.5), "policy": RoleResources(cpus=2.0, gpus=1.0),
                "reward": RoleResources(cpus=1.0, gpus=0.0)}
    plan = layout("separate", per_role, {"generation": 2, "policy": 3, "reward": 1})
    # one group per role, named after it, in the order of the counts; each bundle is one actor's resources
    assert list(plan.groups) == ["generation", "policy", "reward"]
    assert plan.groups["generation"] == [{"CPU": 1.0, "GPU": 0.5}] * 2
    assert plan.groups["policy"] == [{"CPU": 2.0, "GPU": 1.0}] * 3
    assert plan.groups["reward"] == [{"CPU": 1.0}]
    # actor i of a role sits in bundle i of its role's group
    assert plan.slots == {
        "generation": [("generation", 0), ("generation", 1)],
        "policy": [("policy", 0), ("policy", 1), ("policy", 2)],
        "reward": [("reward", 0)],
    }


def test_colocated_bundle_i_sums_actor_i_of_every_role():
    # GPU shares chosen as binary fractions, so the sums are exact
    per_role = {
        "generation": RoleResources(cpus=1.0, gpus=0.25), "policy": RoleResources(cpus=1.0, gpus=0.25),
        "critic": RoleResources(cpus=1.0, gpus=0.25), "reference": RoleResources(cpus=1.0, gpus=0.125),
        "reward": RoleResources(cpus=0.5, gpus=0.125),
    }
    counts = {"generation": 2, "policy": 2, "critic": 2, "reference": 1, "reward": 1}
    plan = layout("colocated", per_role, counts)
    # width = the largest count = 2 bundles
    # bundle 0: all five roles: CPU 1 + 1 + 1 + 1 + 0.5 = 4.5; GPU 3 x 0.25 + 2 x 0.125 = 1.0 (one GPU)
    # bundle 1: generation, policy, critic only: CPU 3; GPU 3 x 0.25 = 0.75
    assert plan.groups == {"colocated": [{"CPU": 4.5, "GPU": 1.0}, {"CPU": 3.0, "GPU": 0.75}]}
    assert plan.slots == {
        "generation": [("colocated", 0), ("colocated", 1)], "policy": [("colocated", 0), ("colocated", 1)],
        "critic": [("colocated", 0), ("colocated", 1)], "reference": [("colocated", 0)], "reward": [("colocated", 0)],
    }


def test_colocated_without_gpus_has_no_gpu_key_and_a_gpu_role_adds_only_its_own():
    cpu = RoleResources(cpus=1.0, gpus=0.0)
    # CPU only: bundle 0 = 1 + 1 = 2 CPUs, bundle 1 = 1 CPU (only the 2-actor role reaches it)
    plan = layout("colocated", {"generation": cpu, "reward": cpu}, {"generation": 2, "reward": 1})
    assert plan.groups == {"colocated": [{"CPU": 2.0}, {"CPU": 1.0}]}
    # a GPU role beside a CPU-only one: bundle 0 = CPU 1 + 2 = 3, GPU 0 + 0.5 = 0.5
    plan = layout("colocated", {"reward": cpu, "policy": RoleResources(cpus=2.0, gpus=0.5)}, {"reward": 1, "policy": 1})
    assert plan.groups == {"colocated": [{"CPU": 3.0, "GPU": 0.5}]}


def test_rank_spec_is_frozen_and_checks_its_rank():
    spec = RankSpec(rank=1, world_size=2, device="cpu", seed=7, timeout_s=30.0, model_path="/m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rank = 0  # type: ignore[misc]
    for rank, world_size in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=f"rank {rank} is not in \\[0, world_size={world_size}\\)"):
            RankSpec(rank=rank, world_size=world_size, device="cpu", seed=7, timeout_s=30.0, model_path="/m")
