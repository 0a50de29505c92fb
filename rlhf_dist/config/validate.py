"""The checks across groups, one function per concern, and the entry points of each stage:
``validate_config`` (PPO) and ``supervised_plan`` (SFT, reward model). Each validates the groups
its stage uses, then their constraints on one another, and returns the stage's frozen plan."""

from __future__ import annotations

from pathlib import Path

from rlhf_dist.config.errors import _fail
from rlhf_dist.config.groups import GROUP_ESTIMATORS
from rlhf_dist.config.plan import RunPlan, SupervisedPlan, actor_counts, derive_run_plan, derive_supervised_plan
from rlhf_dist.config.runtime import ResourcesConfig
from rlhf_dist.config.schema import GROUPS, Config
from rlhf_dist.registry import TRANSPORTS

# What the supervised stages read besides their own group (sft or rm): no rollout, algo, reward,
# reference or eval, so a PPO-only value cannot stop them.
SUPERVISED_GROUPS = ("model", "data", "trainer", "resources", "timeouts", "logger")
SUPERVISED_STAGES = ("sft", "rm")


def validate_config(cfg: Config) -> RunPlan:
    """Validate every group, then the cross-group constraints of a PPO run; return its plan."""
    if cfg.total_steps <= 0:
        _fail("total_steps", cfg.total_steps, "must be > 0")
    _check_seed(cfg)
    if cfg.max_restarts < 0:
        _fail("max_restarts", cfg.max_restarts, "must be >= 0 (0 = a lost actor ends the run)")
    for group in GROUPS:
        getattr(cfg, group).validate()
    _check_batching(cfg)
    _check_reward_sources(cfg)
    _check_transport(cfg)
    _check_device(cfg)
    _check_placement(cfg)
    _check_gpu_memory(cfg)
    _check_routing_replay(cfg)
    _check_lengths(cfg)
    return derive_run_plan(cfg)


def supervised_plan(cfg: Config, stage: str, num_rows: int | None = None) -> SupervisedPlan:
    """Validate what the SFT ("sft") or reward-model ("rm") stage uses; return its plan. One
    optimizer step per ``<stage>.batch_size`` rows; ``num_rows`` (once the data is loaded) sets
    the schedule length, before that one step per epoch."""
    if stage not in SUPERVISED_STAGES:
        raise ValueError(f"stage {stage!r}: use one of {', '.join(SUPERVISED_STAGES)}")
    _check_seed(cfg)
    for group in (*SUPERVISED_GROUPS, stage):
        getattr(cfg, group).validate()
    if cfg.model.lora.enabled:
        _fail("model.lora.rank", cfg.model.lora.rank, f"LoRA trains the PPO policy only; the {stage} stage trains "
              "every weight: set model.lora.rank=0 for it")
    _check_gpu_shares(cfg.resources, {"policy": cfg.trainer.world_size}, on_gpu=("policy",))
    t, st = cfg.trainer, getattr(cfg, stage)
    if st.batch_size % t.world_size:
        _fail(f"{stage}.batch_size", st.batch_size, f"must be divisible by trainer.world_size={t.world_size}")
    per_rank = st.batch_size // t.world_size
    if not t.max_tokens_per_micro_batch and per_rank % t.micro_batch_size:
        _fail("trainer.micro_batch_size", t.micro_batch_size,
              f"must divide {stage}.batch_size / trainer.world_size = {per_rank}")
    rows = st.batch_size if num_rows is None else num_rows
    if rows < st.batch_size:
        _fail(f"{stage}.batch_size", st.batch_size, f"must be <= the {rows} usable rows of the data")
    return derive_supervised_plan(cfg, stage, rows)


def _check_seed(cfg: Config) -> None:
    if cfg.seed < 0:
        _fail("seed", cfg.seed, "must be >= 0")


def _check_reward_sources(cfg: Config) -> None:
    """Something scores the samples: a reward source, or an environment's return."""
    rw = cfg.reward
    if not (rw.function_weight or rw.model_weight or rw.http_weight) and not (cfg.rollout.env and rw.env_weight):
        _fail("reward.function_weight", rw.function_weight,
              "every reward weight is 0: enable at least one source (or an environment's return: rollout.env, "
              "reward.env_weight)")


def _check_batching(cfg: Config) -> None:
    """Rollout batch -> minibatches -> ranks -> micro-batches divide evenly; every actor gets a prompt."""
    t, a, r = cfg.trainer, cfg.algo, cfg.rollout
    samples = r.batch_size * r.n
    if a.estimator in GROUP_ESTIMATORS and r.n < 2:
        _fail("rollout.n", r.n, f"algo.estimator={a.estimator} compares samples of a prompt: set rollout.n >= 2")
    if r.dynamic_sampling and a.estimator not in GROUP_ESTIMATORS:
        _fail("rollout.dynamic_sampling", True,
              f"filters prompt groups with equal rewards, which only a group baseline ignores; "
              f"algo.estimator={a.estimator} is not one of {', '.join(GROUP_ESTIMATORS)}")
    if a.minibatch_size > samples:
        _fail("algo.minibatch_size", a.minibatch_size, f"must be <= rollout.batch_size x rollout.n = {samples}")
    if samples % a.minibatch_size:
        _fail("rollout.batch_size", r.batch_size,
              f"rollout.batch_size x rollout.n = {samples} must be divisible by algo.minibatch_size={a.minibatch_size}")
    if a.minibatch_size % t.world_size:
        _fail("algo.minibatch_size", a.minibatch_size, f"must be divisible by trainer.world_size={t.world_size}")
    per_rank = a.minibatch_size // t.world_size
    if not t.max_tokens_per_micro_batch:  # a token budget cuts micro-batches itself: micro_batch_size is unused
        if t.micro_batch_size > per_rank:
            _fail(
                "trainer.micro_batch_size", t.micro_batch_size,
                f"must be <= algo.minibatch_size / trainer.world_size = {per_rank}",
            )
        if per_rank % t.micro_batch_size:
            _fail("trainer.micro_batch_size", t.micro_batch_size, f"must divide the per-rank minibatch {per_rank}")
    for key, count in (
        ("rollout.num_engines", r.num_engines),
        ("reference.num_actors", cfg.reference.num_actors),
        ("reward.num_actors", cfg.reward.num_actors),
    ):
        if count > r.batch_size:  # every actor must get at least one prompt
            _fail(key, count, f"must be <= rollout.batch_size={r.batch_size}")


def _check_transport(cfg: Config) -> None:
    """The weight-sync transport's traits (rlhf_dist.registry.TRANSPORTS) against the device, the
    placement and vLLM's process layout."""
    res, key = cfg.resources, "resources.weight_sync_backend"
    name, traits = res.weight_sync_backend, TRANSPORTS[res.weight_sync_backend]
    why = f" ({traits.why})" if traits.why else ""
    usable = " or ".join(n for n, t in TRANSPORTS.items() if res.device in t.devices and res.placement in t.placements)
    if res.device not in traits.devices:
        _fail(key, name, f"{name} needs resources.device={' or '.join(traits.devices)}; use {usable} on "
                         f"{res.device.upper()}")
    if res.placement not in traits.placements:
        _fail(key, name, f"{name} needs resources.placement={' or '.join(traits.placements)}{why}: set it, or use "
                         f"{usable} with placement={res.placement}")
    if traits.in_process and not res.vllm_in_process:
        _fail("resources.vllm_in_process", False, f"weight_sync_backend={name} needs it true{why}")
    if not traits.grouped and cfg.rollout.num_engines > cfg.trainer.world_size:
        _fail("rollout.num_engines", cfg.rollout.num_engines, f"must be <= trainer.world_size={cfg.trainer.world_size} "
              f"with {name} (engine i loads the handles trainer rank i exports on its GPU)")


def _check_device(cfg: Config) -> None:
    """What resources.device and vLLM's process layout support: TP workers, sleep mode."""
    res, r = cfg.resources, cfg.rollout
    if res.vllm_in_process and r.tensor_parallel_size > 1:
        _fail("resources.vllm_in_process", True,
              f"rollout.tensor_parallel_size={r.tensor_parallel_size} needs vLLM's worker processes; set it to false")
    if res.device == "cpu" and r.sleep_level:
        _fail("rollout.sleep_level", r.sleep_level, "needs resources.device=cuda (vLLM has no sleep mode on CPU)")
    if r.sleep_level == 2 and cfg.model.lora.served:
        _fail("rollout.sleep_level", 2, "drops the engines' base weights, which model.lora.sync=adapter never sends "
              "again; use sleep_level=1 or model.lora.sync=merged")


def _check_gpu_shares(res: ResourcesConfig, counts: dict[str, int], on_gpu: tuple[str, ...]) -> None:
    """On CUDA: every role of ``on_gpu`` (its actors load a model) has a GPU share, and no layout can
    put two ranks of one process group on one GPU (NCCL refuses them: "Duplicate GPU detected")."""
    if res.device != "cuda":
        return
    for role in on_gpu:
        if getattr(res, role).gpus <= 0:
            _fail(f"resources.{role}.gpus", getattr(res, role).gpus,
                  "must be > 0 when resources.device=cuda (its actors load a model on the GPU)")
    if res.placement == "colocated":
        # Bundle i is one whole GPU (placement.layout) holding actor i of every role, so the ranks of
        # a group are on different GPUs; the fractions must fit in it. Bundle 0 holds an actor of
        # every role: the largest sum.
        shares = {role: getattr(res, role).gpus for role in counts}
        if sum(shares.values()) > 1.0 + 1e-9:  # (decimal shares such as 0.4 + 0.2 + 0.1 sum with rounding)
            terms = " + ".join(f"resources.{role}.gpus={g:g}" for role, g in shares.items())
            _fail("resources.*.gpus", round(sum(shares.values()), 6),
                  f"colocated GPU 0 holds an actor of every role ({terms}): lower them to sum to <= 1")
        return
    for role in ("policy", "critic"):
        n, gpus = counts.get(role, 0), getattr(res, role).gpus
        if n > 1 and gpus % 1:
            # A bundle per rank, each a fraction: Ray packs them onto the fullest GPU that fits.
            _fail(f"resources.{role}.gpus", gpus,
                  f"with resources.placement=separate, part of a GPU per rank lets Ray put two of the "
                  f"trainer.world_size={n} DeepSpeed ranks on one GPU (NCCL refuses it); use a whole number "
                  "(1: a GPU per rank), or resources.placement=colocated")


def _check_placement(cfg: Config) -> None:
    """GPUs per bundle: colocated roles share one whole GPU per bundle (so no NCCL between them);
    apart, an engine's bundle holds exactly its tensor-parallel group and a trainer rank whole GPUs.
    That also keeps the NCCL weight-transfer group (policy rank 0 and every engine's workers) on
    distinct GPUs: apart, every engine's bundle is whole GPUs; colocated, the nccl transport is
    refused (its placements, ``_check_transport``)."""
    res, r = cfg.resources, cfg.rollout
    counts = actor_counts(cfg)
    # policy first: the role no CUDA run does without
    on_gpu = [role for role in ("policy", "generation", "critic", "reference") if role in counts]
    if cfg.reward.model_weight:  # a reward function or endpoint needs no GPU
        on_gpu.append("reward")
    _check_gpu_shares(res, counts, tuple(on_gpu))
    if res.placement == "colocated" and res.device == "cuda":
        # Bundle i holds actor i of every role on one GPU: engine i shares trainer rank i's GPU.
        if r.tensor_parallel_size > 1:
            _fail("rollout.tensor_parallel_size", r.tensor_parallel_size,
                  "must be 1 with resources.placement=colocated")
    elif res.device == "cuda" and res.generation.gpus != r.tensor_parallel_size:
        # One engine is one actor on one placement bundle, and a bundle never spans nodes: its GPUs
        # are exactly the engine's tensor-parallel group, on one node.
        _fail("resources.generation.gpus", res.generation.gpus,
              f"must equal rollout.tensor_parallel_size={r.tensor_parallel_size} (the GPUs of one engine)")


def _check_gpu_memory(cfg: Config) -> None:
    """vLLM's share of a colocated GPU. On CUDA an engine takes rollout.gpu_memory_utilization of its
    GPU's memory (weights, activations, KV cache) and refuses to start unless that much is free;
    colocated, the roles beside it on GPU 0 hold their shares (resources.<role>.gpus) meanwhile."""
    res, r = cfg.resources, cfg.rollout
    if res.device != "cuda" or res.placement != "colocated":
        return
    if r.kv_cache_gib:
        _fail("rollout.kv_cache_gib", r.kv_cache_gib,
              "a fixed KV cache ignores rollout.gpu_memory_utilization, the engine's share of a colocated GPU; "
              "set it to 0")
    others = {role: getattr(res, role).gpus for role in actor_counts(cfg) if role != "generation"}
    held = sum(others.values())
    if r.gpu_memory_utilization + held > 1.0 + 1e-9:
        terms = " + ".join(f"resources.{role}.gpus={g:g}" for role, g in others.items())
        _fail("rollout.gpu_memory_utilization", r.gpu_memory_utilization,
              f"engine 0 shares its GPU with {terms} = {held:g}: set it <= {1.0 - held:g}, or lower those shares")


def _check_routing_replay(cfg: Config) -> None:
    """What the engines' routing recorder (roles/routing_capture.py) can serve."""
    if not cfg.algo.routing_replay:
        return
    r = cfg.rollout
    if not r.enforce_eager:
        _fail("algo.routing_replay", True, "records the routing in eager execution only: set rollout.enforce_eager=true "
              "(a CUDA graph replays the kernels without the recording hook)")
    if r.env:
        _fail("algo.routing_replay", True, "is not supported with multi-turn rollouts (rollout.env) yet")
    if r.replay_from:
        _fail("algo.routing_replay", True, "dumped rollouts (rollout.replay_from) carry no routing")
    if cfg.model.lora.served:
        _fail("algo.routing_replay", True, "does not record the routing of engines serving LoRA adapters: "
              "set model.lora.sync=merged")


def _check_lengths(cfg: Config) -> None:
    """A prompt and its response fit the engine; periodic evaluation has prompts to score."""
    r = cfg.rollout
    if r.max_model_len < cfg.model.max_prompt_len + r.max_new_tokens:
        _fail(
            "rollout.max_model_len", r.max_model_len,
            f"must be >= model.max_prompt_len + rollout.max_new_tokens = {cfg.model.max_prompt_len + r.max_new_tokens}",
        )
    if cfg.reward.overlong_buffer > r.max_new_tokens:
        _fail("reward.overlong_buffer", cfg.reward.overlong_buffer,
              f"must be <= rollout.max_new_tokens={r.max_new_tokens} (the penalty falls over the last that many tokens)")
    if cfg.eval.every_steps and not cfg.data.eval_prompts:
        _fail("data.eval_prompts", "", f"eval.every_steps={cfg.eval.every_steps} needs held-out prompts")
    if r.replay_from:
        if not list((Path(r.replay_from) / "rollouts").glob("step_*.safetensors")):
            _fail("rollout.replay_from", r.replay_from, "holds no dumped rollouts (rollouts/step_*.safetensors: a run "
                  "with rollout.dump=true writes them)")
        if cfg.eval.every_steps:
            _fail("eval.every_steps", cfg.eval.every_steps, "must be 0 with rollout.replay_from (no engines to evaluate)")
