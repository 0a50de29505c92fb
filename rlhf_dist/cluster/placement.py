"""Placement: which role's actors go on which Ray placement-group bundles.

Only config decides placement. ``separate`` gives each role its own placement
group (one bundle per actor); ``colocated`` builds one placement group whose
bundle ``i`` holds actor ``i`` of every role, so trainer, critic, reference,
reward and engines share one whole GPU, each actor taking its role's fraction
(``gpus``) of it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rlhf_dist.config import ConfigError, ResourcesConfig, RoleResources
from rlhf_dist.driver.preemption import PREEMPTION
from rlhf_dist.roles.worker_group import RoleError


@dataclass(frozen=True)
class Slot:
    pg: PlacementGroup
    bundle: int


# Ray's own processes on a local cluster leave the cores to the roles: no metrics collection (no
# dashboard scrapes it) and no idle workers started ahead of the actors (each actor has its own
# runtime environment, so none of them would ever be reused). docs/results.md has the CPU seconds.
LOCAL_RAY_SYSTEM_CONFIG = {
    "enable_metrics_collection": False, "enable_worker_prestart": False, "prestart_worker_first_driver": False,
}


def init_ray(res: ResourcesConfig, actor_logs: bool) -> None:
    """Start (or join) Ray. A local cluster has no dashboard UI and no metrics collection; Ray's own
    servers listen on every interface (Ray resolves a loopback node address to the machine's), and
    its token authentication, on by default in Ray 2.60, refuses any client without the token
    (docs/reliability.md). Joining a cluster (``resources.ray_address``) keeps its settings."""
    if ray.is_initialized():
        return
    common: dict[str, Any] = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=actor_logs)
    if res.ray_address:
        check_reachable(res.ray_address)
        ray.init(address=res.ray_address, **common)
    else:
        # "local": a new cluster even after a `ray start` on this machine, which ray.init without an
        # address would join (and then refuse num_cpus: "When connecting to an existing cluster ...").
        ray.init(address="local", num_cpus=res.num_cpus or os.cpu_count(), _system_config=LOCAL_RAY_SYSTEM_CONFIG,
                 **common)
    PREEMPTION.rearm()  # ray.init replaced the driver's SIGTERM handler with its own


def check_reachable(address: str) -> None:
    """Refuse, in seconds, a ``resources.ray_address`` where no Ray cluster listens: Ray 2.60's
    ``ray.init`` retries it without end, printing "Failed to connect to GCS" lines."""
    from ray._private.services import canonicalize_bootstrap_address  # how ray.init reads it (pinned Ray)

    fix = "start the cluster (`ray start --head`), or leave resources.ray_address empty for a local one"
    target = address
    try:
        if address.startswith("ray://"):  # Ray Client's server (default port 10001)
            host, _, port = address.removeprefix("ray://").partition(":")
            target = f"{host}:{port or 10001}"
        else:  # host:port, or "auto": RAY_ADDRESS, else the newest cluster started on this machine
            target = canonicalize_bootstrap_address(address) or address
        host, _, port = target.rpartition(":")
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError) as e:  # refused, unresolvable, no running cluster ("auto"), malformed
        at = f" at {target}" if target != address else ""
        raise ConfigError(f"resources.ray_address={address!r}: no Ray cluster answers{at} "
                          f"({type(e).__name__}: {e}); {fix}") from None


NODE_RESOURCE_SHARE = 0.001  # of a role's node resource, per actor: a marker, never the limit


def role_bundle(res: RoleResources) -> dict[str, float]:
    """The Ray resources of one actor of a role (no GPU key for a CPU-only role; its node resource,
    if it has one)."""
    bundle = {"CPU": res.cpus}
    if res.gpus:
        bundle["GPU"] = res.gpus
    if res.node_resource:
        bundle[res.node_resource] = NODE_RESOURCE_SHARE
    return bundle


@dataclass(frozen=True)
class Layout:
    """Where every actor goes, decided before any placement group exists (pure arithmetic)."""

    groups: dict[str, list[dict[str, float]]]  # placement group name -> resources of each of its bundles
    slots: dict[str, list[tuple[str, int]]]  # role -> (placement group name, bundle index) of each actor


def layout(placement: str, per_role: dict[str, RoleResources], counts: dict[str, int]) -> Layout:
    """``separate``: a placement group per role with one bundle per actor. ``colocated``: one group
    ``colocated`` whose bundle ``i`` holds actor ``i`` of every role: their CPUs summed, and one
    whole GPU if any of them has a GPU share (the actors take their fractions inside it)."""
    if placement == "separate":
        return Layout(
            {role: [role_bundle(per_role[role])] * n for role, n in counts.items()},
            {role: [(role, i) for i in range(n)] for role, n in counts.items()},
        )
    bundles: list[dict[str, float]] = []
    for i in range(max(counts.values())):
        sharing = [per_role[role] for role, n in counts.items() if n > i]
        bundle = {"CPU": sum(res.cpus for res in sharing)}
        bundle.update((res.node_resource, NODE_RESOURCE_SHARE) for res in sharing if res.node_resource)
        if any(res.gpus for res in sharing):
            # A whole GPU, not the sum of the fractions: Ray packs fractional bundles onto the
            # fullest GPU that fits them, which could put two ranks of one process group on one
            # GPU (NCCL refuses it: "Duplicate GPU detected").
            bundle["GPU"] = 1.0
        bundles.append(bundle)
    return Layout({"colocated": bundles}, {role: [("colocated", i) for i in range(n)] for role, n in counts.items()})


def check_fits(plan: Layout, cluster: dict[str, float], num_cpus: int) -> None:
    """Refuse a ``plan`` that needs more CPUs or GPUs than the local cluster has (``cluster``: its
    total resources): its placement groups could never be scheduled, and would be waited for until
    ``timeouts.actor_start_s``. A joined cluster may grow (an autoscaler), so it is not checked."""
    for key, kind in (("GPU", "gpus"), ("CPU", "cpus")):  # no GPU at all is the first thing to say
        per_group = {name: sum(b.get(key, 0.0) for b in bundles) for name, bundles in plan.groups.items()}
        need, have = sum(per_group.values()), cluster.get(key, 0.0)
        if need <= have + 1e-9:
            continue
        parts = ", ".join(f"{name} {n:g}" for name, n in per_group.items() if n)
        fix = (f"raise resources.num_cpus (now {num_cpus or 'the number of cores'})" if key == "CPU" else
               "on a machine without GPUs use resources=local_cpu")
        raise ConfigError(f"placement: the actors need {need:g} {key}s ({parts}) and the local Ray cluster has "
                          f"{have:g}; {fix}, or lower resources.<role>.{kind}")


def _amounts(resources: dict[str, float], keys: set[str]) -> str:
    return " ".join(f"{k} {v:g}" for k, v in sorted(resources.items(), key=lambda kv: (kv[0] not in ("CPU", "GPU"), kv[0]))
                    if k in keys) or "nothing"


def check_nodes_fit(plan: Layout, free: dict[str, dict[str, float]]) -> None:
    """Refuse a ``plan`` the joined cluster's live nodes cannot hold now (``free``: node address ->
    its free resources): a bundle (one actor's resources, or a colocated bundle's) that no single
    node can hold, or more CPUs or GPUs than all nodes have free together. Both are necessary for
    any placement, so nothing that could be scheduled is refused."""
    needs = {key: sum(b.get(key, 0.0) for bundles in plan.groups.values() for b in bundles) for key in ("CPU", "GPU")}
    totals = {key: sum(node.get(key, 0.0) for node in free.values()) for key in ("CPU", "GPU")}
    def fits_a_node(bundle: dict[str, float]) -> bool:
        return any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in free.values())

    homeless = [name for name, bundles in plan.groups.items() if not all(map(fits_a_node, bundles))]
    short = [key for key in ("GPU", "CPU") if needs[key] > totals[key] + 1e-9]
    if not homeless and not short:
        return
    keys = {"CPU", "GPU"} | {k for bundles in plan.groups.values() for b in bundles for k in b}
    wants = ", ".join(f"{name} {len(bundles)} x {_amounts(bundles[0], keys)}" if name != "colocated" else
                      f"colocated bundles {', '.join(_amounts(b, keys) for b in bundles)}"
                      for name, bundles in plan.groups.items())
    have = "; ".join(f"{node} {_amounts(r, keys)}" for node, r in sorted(free.items())) or "no live node"
    why = (f"{', '.join(homeless)} needs more than any one node has free" if homeless else
           f"the actors need {' and '.join(f'{needs[k]:g} {k}s' for k in short)}, the nodes have "
           f"{' and '.join(f'{totals[k]:g}' for k in short)} free")
    raise ConfigError(f"placement: the joined Ray cluster cannot hold this layout now ({why}): {wants}; free per "
                      f"node: {have}. Free or add nodes, lower resources.<role>.cpus/gpus, or set "
                      "resources.check_fit=false to wait for the resources (an autoscaling cluster)")


def free_per_node() -> dict[str, dict[str, float]]:
    """Each live node's free resources, by its address and the start of its id (several nodes can
    share a host), from Ray's own accounting, read now."""
    from ray._private.state import available_resources_per_node  # DeveloperAPI of the pinned Ray

    addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    return {f"{addresses[node]} (node {node[:6]})": res for node, res in available_resources_per_node().items()
            if node in addresses}


def place(
    res: ResourcesConfig, counts: dict[str, int], timeout_s: float, check_fit: bool = True
) -> dict[str, list[Slot]]:
    """Create the placement groups of ``layout`` and return the slot of every actor, by role.
    ``check_fit`` False: wait for a joined cluster's resources however short it is now (a restart
    after a lost node, which the cluster may be replacing)."""
    plan = layout(res.placement, res.roles(), counts)
    if not res.ray_address:
        check_fits(plan, ray.cluster_resources(), res.num_cpus)
    elif res.check_fit and check_fit:
        check_nodes_fit(plan, free_per_node())
    groups = {
        name: placement_group(bundles, strategy="PACK", name=f"rlhf_dist/{name}")
        for name, bundles in plan.groups.items()
    }
    for name, pg in groups.items():
        if not pg.wait(timeout_seconds=int(timeout_s)):
            # Ray's totals, without the resources it makes up for each placement group and node
            totals = {k: v for k, v in ray.cluster_resources().items() if "_group_" not in k and ":" not in k}
            raise RoleError(
                f"placement.{name}: placement group {pg.bundle_specs} could not be scheduled in {timeout_s:.0f}s; "
                f"cluster has {totals} (lower resources.* or raise resources.num_cpus)"
            )
    return {role: [Slot(groups[name], i) for name, i in slots] for role, slots in plan.slots.items()}


def actor_env(res: ResourcesConfig) -> dict[str, str]:
    """Environment of every actor process; CPU runs pin thread counts so actors share cores."""
    env = {"TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "WARNING", "VLLM_CONFIGURE_LOGGING": "1"}
    if res.vllm_in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core runs in the actor's process
    if res.device == "cpu":
        threads = str(res.threads_per_actor)
        env.update(
            OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, DS_ACCELERATOR="cpu",
            VLLM_CPU_OMP_THREADS_BIND="nobind",
        )
    return env


def spawn(
    cls: type, slots: list[Slot], res: RoleResources, env: dict[str, str],
    make_kwargs: Callable[[int], dict[str, object]],
) -> list:
    """One actor of ``cls`` per slot, built with the keyword arguments ``make_kwargs(i)``."""
    remote_cls = ray.remote(cls)
    return [
        remote_cls.options(
            num_cpus=res.cpus,
            num_gpus=res.gpus,
            scheduling_strategy=PlacementGroupSchedulingStrategy(slot.pg, placement_group_bundle_index=slot.bundle),
            runtime_env={"env_vars": env},
            max_concurrency=1,
        ).remote(**make_kwargs(i))
        for i, slot in enumerate(slots)
    ]
