"""The placement arithmetic (which bundle holds which actor, with what resources) and the rank spec."""

from __future__ import annotations

import dataclasses
import socket
import time

import pytest

from rlhf_dist.cluster.placement import check_fits, check_nodes_fit, check_reachable, layout, role_bundle
from rlhf_dist.config import Config, ConfigError, RoleResources, actor_counts
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


def test_colocated_bundle_i_holds_actor_i_of_every_role_on_one_whole_gpu():
    per_role = {
        "generation": RoleResources(cpus=1.0, gpus=0.25), "policy": RoleResources(cpus=1.0, gpus=0.25),
        "critic": RoleResources(cpus=1.0, gpus=0.25), "reference": RoleResources(cpus=1.0, gpus=0.125),
        "reward": RoleResources(cpus=0.5, gpus=0.125),
    }
    counts = {"generation": 2, "policy": 2, "critic": 2, "reference": 1, "reward": 1}
    plan = layout("colocated", per_role, counts)
    # width = the largest count = 2 bundles
    # bundle 0: all five roles: CPU 1 + 1 + 1 + 1 + 0.5 = 4.5; one whole GPU (their fractions: 1.0)
    # bundle 1: generation, policy, critic only: CPU 3; one whole GPU too, though their fractions
    # sum to 0.75 (a 0.75 bundle could share a GPU with another bundle's ranks)
    assert plan.groups == {"colocated": [{"CPU": 4.5, "GPU": 1.0}, {"CPU": 3.0, "GPU": 1.0}]}
    assert plan.slots == {
        "generation": [("colocated", 0), ("colocated", 1)], "policy": [("colocated", 0), ("colocated", 1)],
        "critic": [("colocated", 0), ("colocated", 1)], "reference": [("colocated", 0)], "reward": [("colocated", 0)],
    }


def test_colocated_grpo_with_three_ranks_takes_three_whole_gpus():
    # GRPO (no critic), trainer.world_size=3, one engine, resources=gpu_colocated's shares. Sized by
    # the sums, bundles 1 and 2 would be {"GPU": 0.2} each, and Ray packs such bundles onto the
    # fullest GPU that fits: ranks 1 and 2 of the policy's NCCL group on one GPU.
    per_role = {
        "generation": RoleResources(cpus=2.0, gpus=0.4), "policy": RoleResources(cpus=2.0, gpus=0.2),
        "reference": RoleResources(cpus=1.0, gpus=0.1), "reward": RoleResources(cpus=1.0, gpus=0.1),
    }
    plan = layout("colocated", per_role, {"generation": 1, "policy": 3, "reward": 1, "reference": 1})
    # bundle 0: generation 2 + policy 2 + reward 1 + reference 1 = 6 CPUs; bundles 1, 2: policy's 2
    assert plan.groups == {"colocated": [{"CPU": 6.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]}
    assert plan.slots["policy"] == [("colocated", 0), ("colocated", 1), ("colocated", 2)]
    assert plan.slots["generation"] == plan.slots["reward"] == plan.slots["reference"] == [("colocated", 0)]


def test_colocated_ppo_with_fewer_engines_than_ranks_keeps_one_gpu_per_bundle():
    # PPO, 2 engines, 4 policy and 4 critic ranks: bundles 2 and 3 hold policy + critic only
    # (fractions 0.25 + 0.25 = 0.5 each: by the sums, the two would fit on one GPU)
    per_role = {role: RoleResources(cpus=1.0, gpus=0.25) for role in ("generation", "policy", "critic")}
    plan = layout("colocated", per_role, {"generation": 2, "policy": 4, "critic": 4})
    # bundles 0, 1: 3 roles -> 3 CPUs; bundles 2, 3: 2 roles -> 2 CPUs; each one whole GPU
    assert plan.groups == {"colocated": [{"CPU": 3.0, "GPU": 1.0}] * 2 + [{"CPU": 2.0, "GPU": 1.0}] * 2}


def test_colocated_without_gpus_has_no_gpu_key_and_a_gpu_role_makes_the_bundle_a_whole_gpu():
    cpu = RoleResources(cpus=1.0, gpus=0.0)
    # CPU only (every CPU run): bundle 0 = 1 + 1 = 2 CPUs, bundle 1 = 1 CPU (only the 2-actor role reaches it)
    plan = layout("colocated", {"generation": cpu, "reward": cpu}, {"generation": 2, "reward": 1})
    assert plan.groups == {"colocated": [{"CPU": 2.0}, {"CPU": 1.0}]}
    # a GPU role beside a CPU-only one: bundle 0 = CPU 1 + 2 = 3 and one whole GPU (the actor takes 0.5 of it)
    plan = layout("colocated", {"reward": cpu, "policy": RoleResources(cpus=2.0, gpus=0.5)}, {"reward": 1, "policy": 1})
    assert plan.groups == {"colocated": [{"CPU": 3.0, "GPU": 1.0}]}


def test_the_default_cpu_run_has_a_one_cpu_bundle_per_actor():
    # Defaults: PPO (a critic), KL 0.05 (a reference), 1 engine, trainer.world_size=2, 1 reward
    # actor, every role 1 CPU and no GPU, placement=separate
    cfg = Config()
    counts = actor_counts(cfg)
    assert counts == {"generation": 1, "policy": 2, "reward": 1, "reference": 1, "critic": 2}
    plan = layout(cfg.resources.placement, cfg.resources.roles(), counts)
    assert plan.groups == {role: [{"CPU": 1.0}] * n for role, n in counts.items()}


def test_a_placement_the_local_cluster_cannot_hold_is_refused_at_once():
    # Before: resources.num_cpus=4 for the default run's 7 one-CPU actors waited out
    # timeouts.actor_start_s (300 s) for a placement group that could never be scheduled.
    cfg = Config()
    plan = layout(cfg.resources.placement, cfg.resources.roles(), actor_counts(cfg))
    check_fits(plan, {"CPU": 7.0}, 7)  # 1 + 2 + 1 + 1 + 2 = 7 CPUs: fits exactly
    with pytest.raises(ConfigError) as excinfo:
        check_fits(plan, {"CPU": 4.0}, 4)
    assert str(excinfo.value) == (
        "placement: the actors need 7 CPUs (generation 1, policy 2, reward 1, reference 1, critic 2) and the local "
        "Ray cluster has 4; raise resources.num_cpus (now 4), or lower resources.<role>.cpus"
    )
    # A GPU preset on a machine without GPUs: the missing GPUs are named, not the CPUs (also short)
    gpu = RoleResources(cpus=2.0, gpus=1.0)
    plan = layout("separate", {"generation": gpu, "policy": gpu}, {"generation": 1, "policy": 2})
    with pytest.raises(ConfigError) as excinfo:
        check_fits(plan, {"CPU": 2.0}, 0)
    assert str(excinfo.value) == (
        "placement: the actors need 3 GPUs (generation 1, policy 2) and the local Ray cluster has 0; on a machine "
        "without GPUs use resources=local_cpu, or lower resources.<role>.gpus"
    )


def test_a_joined_cluster_that_cannot_hold_the_layout_now_is_refused_in_one_line():
    # Before: 6 free CPUs over three nodes for the default layout's 7 one-CPU actors sat with
    # "1+ pending placement groups" until timeouts.actor_start_s.
    cfg = Config()
    plan = layout(cfg.resources.placement, cfg.resources.roles(), actor_counts(cfg))
    check_nodes_fit(plan, {"10.0.0.1": {"CPU": 4.0}, "10.0.0.2": {"CPU": 3.0, "memory": 1e9}})  # 7 of 7
    with pytest.raises(ConfigError) as excinfo:
        check_nodes_fit(plan, {"10.0.0.1": {"CPU": 2.0}, "10.0.0.2": {"CPU": 2.0}, "10.0.0.3": {"CPU": 2.0}})
    assert str(excinfo.value) == (
        "placement: the joined Ray cluster cannot hold this layout now (the actors need 7 CPUs, the nodes have 6 "
        "free): generation 1 x CPU 1, policy 2 x CPU 1, reward 1 x CPU 1, reference 1 x CPU 1, critic 2 x CPU 1; "
        "free per node: 10.0.0.1 CPU 2; 10.0.0.2 CPU 2; 10.0.0.3 CPU 2. Free or add nodes, lower "
        "resources.<role>.cpus/gpus, or set resources.check_fit=false to wait for the resources (an autoscaling "
        "cluster)"
    )
    # enough CPUs in all, but a colocated bundle of 5 CPUs fits on no single node
    colocated = layout("colocated", cfg.resources.roles(), {"generation": 1, "policy": 2, "reward": 1,
                                                            "reference": 1, "critic": 2})
    assert colocated.groups["colocated"][0] == {"CPU": 5.0}
    with pytest.raises(ConfigError, match=r"\(colocated needs more than any one node has free\): colocated bundles "
                                          r"CPU 5, CPU 2; free per node: a CPU 4; b CPU 4\. "):
        check_nodes_fit(colocated, {"a": {"CPU": 4.0}, "b": {"CPU": 4.0}})
    # a GPU role on CPU-only nodes: no node holds its bundle
    gpu = layout("separate", {"policy": RoleResources(cpus=1.0, gpus=1.0)}, {"policy": 1})
    with pytest.raises(ConfigError, match=r"\(policy needs more than any one node has free\): policy 1 x CPU 1 GPU 1;"):
        check_nodes_fit(gpu, {"a": {"CPU": 8.0}})


def test_a_ray_address_where_no_cluster_listens_is_refused_in_seconds(monkeypatch):
    # Before: ray.init(address="127.0.0.1:1") retried for as long as it was let (5 minutes in the
    # try), printing "Failed to connect to GCS" lines.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # it would replace the address
    fix = r"start the cluster \(`ray start --head`\), or leave resources.ray_address empty for a local one$"
    started = time.monotonic()
    # Ray reads a loopback address as the machine's own, as ray.init would
    with pytest.raises(ConfigError, match=r"^resources.ray_address='127.0.0.1:1': no Ray cluster answers at \S+:1 "
                                          r"\(ConnectionRefusedError: .*\); " + fix):
        check_reachable("127.0.0.1:1")
    with pytest.raises(ConfigError, match=r"^resources.ray_address='ray://127.0.0.1:1': no Ray cluster answers at "
                                          r"127.0.0.1:1 \(ConnectionRefusedError: .*\); " + fix):
        check_reachable("ray://127.0.0.1:1")
    assert time.monotonic() - started < 10
    with socket.create_server(("0.0.0.0", 0)) as listening:  # something answers: left to ray.init
        check_reachable(f"127.0.0.1:{listening.getsockname()[1]}")


def test_rank_spec_is_frozen_and_checks_its_rank():
    spec = RankSpec(rank=1, world_size=2, device="cpu", seed=7, timeout_s=30.0, model_path="/m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rank = 0  # type: ignore[misc]
    for rank, world_size in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match=f"rank {rank} is not in \\[0, world_size={world_size}\\)"):
            RankSpec(rank=rank, world_size=world_size, device="cpu", seed=7, timeout_s=30.0, model_path="/m")

