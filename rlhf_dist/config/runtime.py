"""The Hydra groups of where and how a run executes: resources, timeouts, weight_sync,
checkpoint and logger. One dataclass per group; each validates itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from rlhf_dist.config.errors import _check_positive, _fail
from rlhf_dist.registry import TRANSPORTS


@dataclass
class RoleResources:
    # Logical CPUs reserved per actor of this role.
    cpus: float = 1.0
    # GPUs per actor of this role; colocated, its fraction of the bundle's one GPU and its planned share
    # of that GPU's memory (the engine's rollout.gpu_memory_utilization must leave it free).
    gpus: float = 0.0
    # A custom Ray resource every actor of this role asks for a little of (0.001): the role then runs
    # only on nodes started with it (`ray start --resources='{"<name>": 1}'`), e.g. "trainer_nodes".
    node_resource: str = ""


@dataclass
class ResourcesConfig:
    # Where models run: cpu or cuda.
    device: str = "cpu"
    # Ray cluster address: "" starts a new local cluster (whatever else runs, or ran, on the machine),
    # "auto" joins the running one (RAY_ADDRESS, else the newest `ray start` here), or an address.
    ray_address: str = ""
    # Before placing the actors on a joined cluster, refuse at once a layout its live nodes cannot
    # hold now (a bundle larger than every node's free resources, or more than the cluster's free
    # total). false: wait for the resources instead (an autoscaling cluster, or jobs that will finish).
    check_fit: bool = True
    # Logical CPUs declared to a local Ray cluster; 0 means the number of cores.
    # May exceed the core count so that every role gets an actor on a laptop.
    num_cpus: int = 0
    # separate: one placement group per role; colocated: trainer, critic, reference,
    # reward and engines share the bundles of one placement group.
    placement: str = "separate"
    # Weight-sync transport from the trainer to the engines, one of rlhf_dist.registry.TRANSPORTS:
    # gloo (CPU), nccl (GPU), or ipc (GPU, colocated: CUDA IPC handles, for an engine sharing its
    # GPU with a trainer rank).
    weight_sync_backend: str = "gloo"
    # Weight sync in buckets of about this many MiB: the tensors packed into one flat buffer per
    # broadcast (nccl: vLLM's packed mode), ZeRO-3 parameters gathered a bucket at a time; 0 sends
    # (and gathers) one tensor at a time.
    weight_sync_bucket_mb: float = 256.0
    # Torch threads per actor process (CPU runs; keeps actors from oversubscribing cores).
    threads_per_actor: int = 1
    # Run each vLLM engine (engine core and its worker) inside its Ray actor's process instead of
    # two more processes. false, the schema default, is vLLM's own layout, which gpu_node and
    # gpu_2x8 keep: the engine-core process overlaps scheduling with the forward passes, and
    # rollout.tensor_parallel_size > 1 needs it. true is a preset's choice: local_cpu's (an engine
    # starts in ~10 s instead of ~27 s on CPU) and gpu_colocated's (weight_sync_backend=ipc needs it).
    vllm_in_process: bool = False
    generation: RoleResources = field(default_factory=RoleResources)
    policy: RoleResources = field(default_factory=RoleResources)
    critic: RoleResources = field(default_factory=RoleResources)
    reference: RoleResources = field(default_factory=RoleResources)
    reward: RoleResources = field(default_factory=RoleResources)

    def roles(self) -> dict[str, RoleResources]:
        return {n: getattr(self, n) for n in ("generation", "policy", "critic", "reference", "reward")}

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda"):
            _fail("resources.device", self.device, "use cpu or cuda")
        if self.placement not in ("separate", "colocated"):
            _fail("resources.placement", self.placement, "use separate or colocated")
        if self.weight_sync_bucket_mb < 0:
            _fail("resources.weight_sync_bucket_mb", self.weight_sync_bucket_mb, "must be >= 0 (0: one tensor at a time)")
        if self.weight_sync_backend not in TRANSPORTS:
            _fail("resources.weight_sync_backend", self.weight_sync_backend, f"use one of {', '.join(TRANSPORTS)}")
        if self.num_cpus < 0:
            _fail("resources.num_cpus", self.num_cpus, "must be >= 0 (0 = number of cores)")
        _check_positive("resources", self, "threads_per_actor")
        for role, res in self.roles().items():
            for name in ("cpus", "gpus"):
                if getattr(res, name) < 0:
                    _fail(f"resources.{role}.{name}", getattr(res, name), "must be >= 0")
            if self.device == "cpu" and res.gpus > 0:
                _fail(f"resources.{role}.gpus", res.gpus, "must be 0 when resources.device=cpu")


@dataclass
class TimeoutConfig:
    # Seconds for an actor to start and load its model/engine.
    actor_start_s: float = 300.0
    # Seconds for one generation call on the engines.
    generate_s: float = 300.0
    # Seconds for scoring, reference logprobs and values.
    inference_s: float = 300.0
    # Seconds for one PPO training call on the trainer group.
    train_s: float = 600.0
    # Seconds for one weight broadcast (and for the process-group rendezvous).
    weight_sync_s: float = 120.0
    # Seconds for one environment call (reset or step, rollout.env); past it the trajectory ends
    # (env/timeouts, scored as reward.on_invalid says) and the others go on.
    env_step_s: float = 30.0

    def validate(self) -> None:
        _check_positive("timeouts", self, "actor_start_s", "generate_s", "inference_s", "train_s", "weight_sync_s",
                        "env_step_s")


# Default tolerances of the engine/trainer logprob comparisons, by model.dtype: in float32 a correct
# sync measures ~1e-7 on CPU (kernels differ only in summation order); in bfloat16 vLLM's and
# transformers' kernels round differently, so only a mismatch well above that noise is flagged.
LOGPROB_TOLERANCE = {"float32": 1e-3, "bfloat16": 1e-1}


@dataclass
class WeightSyncConfig:
    # Check every this many weight syncs that each engine serves the trainer's policy: logprobs of a
    # few fixed sequences on every engine against the trainer's; a gap over verify_tol fails the run
    # with one line naming the engine, the probe sequence and the gap. 0 is off; also run at start.
    verify_every: int = 1
    # Mean absolute logprob gap per probe sequence that fails verification; 0 = by model.dtype
    # (LOGPROB_TOLERANCE: float32 1e-3, bfloat16 1e-1).
    verify_tol: float = 0.0
    # logprob_gap/mean (sampled tokens, engine vs trainer) above which the run warns once; 0 = by
    # model.dtype, as verify_tol. summary.json records the largest gap as logprob_gap/max.
    gap_warn: float = 0.0

    def validate(self) -> None:
        if self.verify_every < 0:
            _fail("weight_sync.verify_every", self.verify_every, "must be >= 0 (0 = off)")
        for name in ("verify_tol", "gap_warn"):
            if not getattr(self, name) >= 0:
                _fail(f"weight_sync.{name}", getattr(self, name), "must be >= 0 (0 = by model.dtype)")

    def tolerance(self, dtype: str) -> float:
        return self.verify_tol or LOGPROB_TOLERANCE[dtype]

    def gap_threshold(self, dtype: str) -> float:
        return self.gap_warn or LOGPROB_TOLERANCE[dtype]


@dataclass
class CheckpointConfig:
    # Save a checkpoint every this many PPO steps and after the last one; 0 is off.
    every_steps: int = 10
    # Complete checkpoints kept; older ones are deleted once a newer one is complete.
    keep_last: int = 2
    # Where checkpoints go; "" means <output dir>/checkpoints. Across nodes it must be a
    # filesystem every trainer rank and the driver share.
    dir: str = ""
    # Also export each checkpoint's policy as a Hugging Face directory (safetensors).
    export_policy: bool = True

    def validate(self) -> None:
        if self.every_steps < 0:
            _fail("checkpoint.every_steps", self.every_steps, "must be >= 0 (0 = no checkpoints)")
        _check_positive("checkpoint", self, "keep_last")


@dataclass
class LoggerConfig:
    # console: progress bar + metrics.jsonl only; wandb: also log to Weights & Biases.
    backend: str = "console"
    # W&B mode: online, offline or disabled.
    mode: str = "offline"
    # W&B project.
    project: str = "rlhf_dist"
    # W&B group; empty means the Hydra job name, shared by all runs of a multirun.
    group: str = ""
    # W&B run name; empty means derived from the Hydra output dir.
    name: str = ""
    # Show a progress bar over PPO steps in the console.
    progress_bar: bool = True
    # Log a table of sampled rollouts (prompt, response, reward, KL) every this many PPO steps
    # (W&B table "rollout/samples" and rollout_samples.jsonl); 0 is off.
    samples_every_steps: int = 10
    # Rollouts per samples table (the first ones of the step's batch).
    num_samples: int = 8
    # Stream every actor's stdout/stderr (vLLM, DeepSpeed, transformers) to the console;
    # off by default: they stay in Ray's session logs and errors still surface by role.
    actor_logs: bool = False
    # Write timeline.json in the run dir: a Chrome trace (open it in https://ui.perfetto.dev) with
    # one track per role (generate, score, reference, train, sync), to see where a step's time goes.
    timeline: bool = False

    def validate(self) -> None:
        if self.backend not in ("console", "wandb"):
            _fail("logger.backend", self.backend, "use console or wandb")
        if self.mode not in ("online", "offline", "disabled"):
            _fail("logger.mode", self.mode, "use online, offline or disabled")
        if self.samples_every_steps < 0:
            _fail("logger.samples_every_steps", self.samples_every_steps, "must be >= 0 (0 = off)")
        _check_positive("logger", self, "num_samples")

