"""rlhf_dist.config: defaults, the derived RunPlan and SupervisedPlan, one error per bad value, the Hydra path
and the CLI.

Every ConfigError must start with ``<dotted key>=<value repr>:`` so a user sees which override to change.
"""

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ValidationError

from rlhf_dist.cluster.placement import layout
from rlhf_dist.config import (
    GROUPS,
    AlgoConfig,
    Config,
    ConfigError,
    ResourcesConfig,
    RunPlan,
    SupervisedPlan,
    TrainerConfig,
    actor_counts,
    register_configs,
    supervised_plan,
    to_config,
    updates_once,
    validate_config,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = REPO_ROOT / "conf"


def config_with(**dotted):
    """A default Config with ``dotted`` keys ("trainer__zero_stage" -> trainer.zero_stage) replaced."""
    cfg = Config()
    for key, value in dotted.items():
        *path, name = key.split("__")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, name, value)
    return cfg


def test_defaults_validate_to_the_hand_computed_plan():
    # Defaults: rollout.batch_size=64, algo.minibatch_size=32, trainer.world_size=2,
    # trainer.micro_batch_size=8, algo.ppo_epochs=2, total_steps=20.
    #   minibatches_per_epoch = 64 / 32 = 2
    #   per_rank_minibatch    = 32 / 2  = 16
    #   grad_accum_steps      = 16 / 8  = 2
    #   optimizer_steps       = total_steps * ppo_epochs * minibatches = 20 * 2 * 2 = 80
    cfg = Config()
    assert (cfg.rollout.batch_size, cfg.algo.minibatch_size, cfg.trainer.world_size) == (64, 32, 2)
    assert (cfg.trainer.micro_batch_size, cfg.algo.ppo_epochs, cfg.total_steps) == (8, 2, 20)
    plan = validate_config(cfg)
    assert plan == RunPlan(
        rollout_batch=64, minibatches_per_epoch=2, per_rank_minibatch=16, grad_accum_steps=2, optimizer_steps=80
    )


def test_plan_is_frozen_and_config_is_not_rewritten():
    cfg = Config()
    plan = validate_config(cfg)
    with pytest.raises(AttributeError):
        plan.grad_accum_steps = 4  # type: ignore[misc]
    assert cfg == Config()  # validation reads, never writes


def test_plan_follows_the_config():
    # batch 96, minibatch 24, world 3, micro 4, epochs 1, steps 5:
    #   minibatches 96/24 = 4, per rank 24/3 = 8, accum 8/4 = 2, optimizer steps 5 * 1 * 4 = 20
    cfg = config_with(
        rollout__batch_size=96, algo__minibatch_size=24, trainer__world_size=3,
        trainer__micro_batch_size=4, algo__ppo_epochs=1, total_steps=5,
    )
    assert validate_config(cfg) == RunPlan(
        rollout_batch=96, minibatches_per_epoch=4, per_rank_minibatch=8, grad_accum_steps=2, optimizer_steps=20
    )



def test_supervised_plan_counts_rows():
    # sft defaults: batch_size=32, epochs=2; trainer.world_size=2, micro_batch_size=8; 1000 rows:
    #   per rank 32 / 2 = 16, accum 16 / 8 = 2, steps per epoch 1000 // 32 = 31 (8 rows dropped),
    #   optimizer steps 2 epochs x 31 = 62
    assert supervised_plan(Config(), "sft", 1000) == SupervisedPlan(
        rows_per_step=32, steps_per_epoch=31, per_rank_minibatch=16, grad_accum_steps=2, optimizer_steps=62
    )
    # rm.batch_size=24 over 3 ranks, micro 4: per rank 8, accum 2; before the data is loaded
    # (no row count) the plan assumes one batch: 1 step per epoch x rm.epochs=2
    cfg = config_with(rm__batch_size=24, trainer__world_size=3, trainer__micro_batch_size=4)
    assert supervised_plan(cfg, "rm") == SupervisedPlan(
        rows_per_step=24, steps_per_epoch=1, per_rank_minibatch=8, grad_accum_steps=2, optimizer_steps=2
    )


def test_supervised_stages_check_only_the_groups_they_use():
    # PPO-only values (rollout, algo, reward, eval, total_steps) cannot stop SFT or the reward model...
    ppo_only = config_with(algo__minibatch_size=33, rollout__n=0, reward__model_weight=1.0, eval__every_steps=5,
                           total_steps=0)
    for stage in ("sft", "rm"):
        supervised_plan(ppo_only, stage)
    with pytest.raises(ConfigError, match=r"^total_steps=0:"):  # the first of the PPO stage's errors
        validate_config(ppo_only)
    # ...but what the trainer group reads still fails, under its own key
    with pytest.raises(ConfigError, match=r"^trainer\.zero_stage=7:"):
        supervised_plan(config_with(trainer__zero_stage=7), "sft")
    with pytest.raises(ConfigError, match=r"^resources\.policy\.gpus=0\.0: must be > 0 when resources\.device=cuda"):
        supervised_plan(config_with(resources__device="cuda"), "rm")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


GROUP_FILES = sorted(p for p in CONF_DIR.glob("*/*.yaml") if p.parent.name in GROUPS)


@pytest.mark.parametrize("path", GROUP_FILES, ids=[f"{p.parent.name}/{p.stem}" for p in GROUP_FILES])
def test_group_files_only_override_the_dataclass_defaults(path):
    # A default lives on the dataclass alone. A _global_ file (algo/grpo, task/arithmetic) may write
    # other groups after their presets, so a value equal to the default there can still override.
    if path.read_text().startswith("# @package _global_"):
        values, defaults = _flat(OmegaConf.to_container(OmegaConf.load(path))), _flat(dataclasses.asdict(Config()))
        values = {k: v for k, v in values.items() if k.startswith(f"{path.parent.name}.")}
    else:
        values = _flat(OmegaConf.to_container(OmegaConf.load(path)) or {})
        defaults = _flat(dataclasses.asdict(getattr(Config(), path.parent.name)))
    assert {k: v for k, v in values.items() if k in defaults and defaults[k] == v} == {}


@pytest.mark.parametrize(
    ("preset", "in_process"),
    [("local_cpu", True), ("gpu_colocated", True), ("gpu_node", False), ("gpu_2x8", False)],
)
def test_vllm_in_process_is_a_preset_choice(compose, preset, in_process):
    # false is the schema's (vLLM's engine-core process, which TP > 1 needs); local_cpu sets true for
    # start-up time, gpu_colocated because ipc needs it; the other GPU presets keep the default
    assert ResourcesConfig().vllm_in_process is False
    assert to_config(compose([f"resources={preset}"])).resources.vllm_in_process is in_process


# GPU shares of a CUDA run that pass on their own, for the rows about something else. Separate: a
# whole GPU per actor. Colocated: one GPU per bundle, 0.5 (engine) + 4 x 0.125 = 1 exactly, and the
# engine's vLLM budget 0.5 = 1 - 0.5 (the other four roles' shares).
ROLES = ("generation", "policy", "critic", "reference", "reward")
SEPARATE_GPUS = {"resources__device": "cuda", **{f"resources__{role}__gpus": 1 for role in ROLES}}
COLOCATED_GPUS = {
    "resources__device": "cuda", "resources__placement": "colocated", "resources__weight_sync_backend": "ipc",
    "resources__vllm_in_process": True, **{f"resources__{role}__gpus": 0.125 for role in ROLES},
    "resources__generation__gpus": 0.5, "rollout__gpu_memory_utilization": 0.5, "rollout__kv_cache_gib": 0.0,
}

# (overrides, exact message prefix, a fragment of the fix the message must also name)
BAD_VALUES = [
    ({"trainer__zero_stage": 7}, "trainer.zero_stage=7:", "0, 1, 2 or 3"),
    # 48 % 32 = 16
    ({"rollout__batch_size": 48}, "rollout.batch_size=48:", "divisible by algo.minibatch_size=32"),
    # 32 % 3 = 2: the minibatch cannot be spread evenly over 3 ranks
    ({"trainer__world_size": 3}, "algo.minibatch_size=32:", "divisible by trainer.world_size=3"),
    # per-rank minibatch 32 / 2 = 16 < 32
    ({"trainer__micro_batch_size": 32}, "trainer.micro_batch_size=32:", "= 16"),
    # 16 % 5 = 1
    ({"trainer__micro_batch_size": 5}, "trainer.micro_batch_size=5:", "per-rank minibatch 16"),
    ({"rollout__num_engines": 65}, "rollout.num_engines=65:", "rollout.batch_size=64"),
    ({"rollout__temperature": 0.0}, "rollout.temperature=0.0:", "> 0"),
    ({"rollout__top_p": 0.0}, "rollout.top_p=0.0:", "(0, 1]"),
    ({"algo__kl_coef": -0.1}, "algo.kl_coef=-0.1:", ">= 0"),
    ({"total_steps": 0}, "total_steps=0:", "> 0"),
    ({"weight_sync__verify_every": -1}, "weight_sync.verify_every=-1:", ">= 0 (0 = off)"),
    ({"weight_sync__verify_tol": -1e-3}, "weight_sync.verify_tol=-0.001:", "0 = by model.dtype"),
    ({"resources__generation__gpus": 0.5}, "resources.generation.gpus=0.5:", "resources.device=cpu"),
    ({"resources__weight_sync_backend": "nccl"}, "resources.weight_sync_backend='nccl':", "use gloo on CPU"),
    ({"reward__model_weight": 1.0}, "reward.model_path='':", "reward.model_weight=1.0"),
    ({"reward__function_weight": 0.0}, "reward.function_weight=0.0:", "enable at least one source"),
    ({"reward__http_weight": 0.5, "reward__http_url": "ftp://x"}, "reward.http_url='ftp://x':", "http://"),
    ({"reward__on_invalid": "skip"}, "reward.on_invalid='skip':", "error or drop"),
    ({"algo__estimator": "grpo"}, "rollout.n=1:", "rollout.n >= 2"),
    ({"algo__estimator": "ppo2"}, "algo.estimator='ppo2':", "gae, grpo"),
    ({"algo__dual_clip": 1.0}, "algo.dual_clip=1.0:", "> 1"),
    ({"algo__kl_in": "both"}, "algo.kl_in='both':", "reward, loss"),
    ({"algo__rollout_correction": "is"}, "algo.rollout_correction='is':", "none, tis, mis"),
    # cap 1 would truncate every ratio above 1 (tis), or drop every token whose ratio is not exactly 1 (mis)
    ({"algo__rollout_is_cap": 1.0}, "algo.rollout_is_cap=1.0:", "must be > 1"),
    ({"algo__rollout_is_cap": 0.5}, "algo.rollout_is_cap=0.5:", "[1/cap, cap]"),
    ({"algo__router_aux_loss_coef": -0.01}, "algo.router_aux_loss_coef=-0.01:", "null: the model config's"),
    ({"pipeline__rounds": 0}, "pipeline.rounds=0:", "must be > 0"),
    ({"pipeline__ranking_k": 1}, "pipeline.ranking_k=1:", "two responses"),
    ({"pipeline__kl_reference": "ref"}, "pipeline.kl_reference='ref':", "sft, previous"),
    # routing replay records in eager execution only, single-turn, from live engines
    ({"algo__routing_replay": True, "rollout__enforce_eager": False}, "algo.routing_replay=True:",
     "set rollout.enforce_eager=true"),
    ({"algo__routing_replay": True, "rollout__env": {"_target_": "x"}}, "algo.routing_replay=True:", "rollout.env"),
    ({"algo__routing_replay": True, "rollout__replay_from": "/r"}, "algo.routing_replay=True:", "carry no routing"),
    # batch 64 x n 3 = 192 samples; 192 % 32 = 0 but 192 % 40 = 32
    ({"rollout__n": 3, "algo__minibatch_size": 40}, "rollout.batch_size=64:", "192"),
    ({"eval__every_steps": 5}, "data.eval_prompts='':", "needs held-out prompts"),
    ({"data__prompts": "builtin:poems"}, "data.prompts='builtin:poems':", "builtin:reviews"),
    ({"logger__backend": "bogus"}, "logger.backend='bogus':", "console or wandb"),
    # model.max_prompt_len + rollout.max_new_tokens = 64 + 24 = 88 > 87
    ({"rollout__max_model_len": 87}, "rollout.max_model_len=87:", "= 88"),
    ({"trainer__lr_schedule": "bogus"}, "trainer.lr_schedule='bogus':", "constant, linear or cosine"),
    ({"seed": -1}, "seed=-1:", ">= 0"),
    ({"model__dtype": "float16"}, "model.dtype='float16':", "float32 or bfloat16"),
    ({"data__on_bad_row": "drop"}, "data.on_bad_row='drop':", "skip or error"),
    ({"data__ranking_k": 1}, "data.ranking_k=1:", "must be >= 2 (2: preference pairs"),
    ({"data__ranking_k": 4, "data__preferences": "p.jsonl"}, "data.ranking_k=4:", "whose rows carry their own"),
    ({"rollout__tensor_parallel_size": 2, "resources__vllm_in_process": True}, "resources.vllm_in_process=True:",
     "needs vLLM's worker processes"),
    ({"resources__device": "cuda", "resources__weight_sync_backend": "nccl", "resources__placement": "colocated",
      "resources__policy__gpus": 0.5}, "resources.weight_sync_backend='nccl':",
     "or use gloo or ipc with placement=colocated"),
    ({"resources__weight_sync_backend": "ipc"}, "resources.weight_sync_backend='ipc':", "use gloo on CPU"),
    ({**SEPARATE_GPUS, "resources__weight_sync_backend": "ipc"}, "resources.weight_sync_backend='ipc':",
     "placement=colocated"),
    ({**COLOCATED_GPUS, "resources__vllm_in_process": False}, "resources.vllm_in_process=False:", "ipc needs it true"),
    ({**COLOCATED_GPUS, "rollout__num_engines": 3}, "rollout.num_engines=3:", "trainer.world_size=2"),
    # GPU 0 holds an actor of every role: generation 0.6 + policy 0.6 + reward, reference, critic 0.125 each = 1.575
    ({**COLOCATED_GPUS, "resources__policy__gpus": 0.6, "resources__generation__gpus": 0.6},
     "resources.*.gpus=1.575:", "lower them to sum to <= 1"),
    # a role whose actors load a model gets no GPU: on a colocated GPU as apart
    ({**COLOCATED_GPUS, "resources__reference__gpus": 0.0}, "resources.reference.gpus=0.0:",
     "must be > 0 when resources.device=cuda"),
    ({**SEPARATE_GPUS, "resources__weight_sync_backend": "nccl", "resources__reward__gpus": 0.0,
      "reward__model_weight": 1.0, "reward__model_path": "/m"}, "resources.reward.gpus=0.0:", "load a model on the GPU"),
    # apart, trainer.world_size=2 ranks of a fraction each: Ray may pack both onto one GPU
    ({**SEPARATE_GPUS, "resources__weight_sync_backend": "nccl", "resources__policy__gpus": 0.5},
     "resources.policy.gpus=0.5:", "two of the trainer.world_size=2 DeepSpeed ranks on one GPU"),
    ({**SEPARATE_GPUS, "resources__weight_sync_backend": "nccl", "resources__critic__gpus": 0.5},
     "resources.critic.gpus=0.5:", "use a whole number (1: a GPU per rank), or resources.placement=colocated"),
    ({**SEPARATE_GPUS, "resources__weight_sync_backend": "nccl", "resources__policy__gpus": 1.5},
     "resources.policy.gpus=1.5:", "use a whole number"),
    # the NCCL weight-transfer group: an engine apart is whole GPUs (its TP group), never a fraction
    ({**SEPARATE_GPUS, "resources__weight_sync_backend": "nccl", "resources__generation__gpus": 0.5},
     "resources.generation.gpus=0.5:", "must equal rollout.tensor_parallel_size=1"),
    # vLLM's budget beside the others' shares on GPU 0: policy + reward + reference + critic = 4 x 0.125 = 0.5
    ({**COLOCATED_GPUS, "rollout__gpu_memory_utilization": 0.6}, "rollout.gpu_memory_utilization=0.6:",
     ("resources.policy.gpus=0.125 + resources.reward.gpus=0.125 + resources.reference.gpus=0.125 + "
      "resources.critic.gpus=0.125 = 0.5: set it <= 0.5")),
    ({**COLOCATED_GPUS, "rollout__kv_cache_gib": 0.25}, "rollout.kv_cache_gib=0.25:", "set it to 0"),
    ({"rollout__sleep_level": 1}, "rollout.sleep_level=1:", "no sleep mode on CPU"),
    ({"rollout__sleep_level": 3}, "rollout.sleep_level=3:", "0 (never), 1 or 2"),
    # sleep level 2 drops the base weights, which an adapter-only sync never sends again
    ({**COLOCATED_GPUS, "rollout__sleep_level": 2, "model__lora__rank": 8}, "rollout.sleep_level=2:",
     "use sleep_level=1 or model.lora.sync=merged"),
    ({"algo__routing_replay": True, "model__lora__rank": 8}, "algo.routing_replay=True:",
     "set model.lora.sync=merged"),
    ({"trainer__offload_optimizer": True, "trainer__zero_stage": 1}, "trainer.offload_optimizer=True:", "2 or 3"),
    # device=cuda with every role still at 0 GPUs
    ({"resources__device": "cuda", "resources__weight_sync_backend": "nccl"}, "resources.policy.gpus=0.0:", "cuda"),
    # a tensor-parallel engine holds its TP GPUs in its one bundle (so on one node)
    ({**SEPARATE_GPUS, "resources__weight_sync_backend": "nccl", "rollout__tensor_parallel_size": 2},
     "resources.generation.gpus=1:", "must equal rollout.tensor_parallel_size=2"),
]


@pytest.mark.parametrize(("overrides", "prefix", "fix"), BAD_VALUES, ids=[p for _, p, _ in BAD_VALUES])
def test_bad_value_names_dotted_key_value_and_fix(overrides, prefix, fix):
    with pytest.raises(ConfigError) as excinfo:
        validate_config(config_with(**overrides))
    message = str(excinfo.value)
    assert message.startswith(prefix), message
    assert fix in message, message


@pytest.fixture
def compose():
    register_configs()
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        yield lambda overrides: hydra.compose(config_name="config", overrides=overrides)


def test_hydra_compose_gives_typed_config(compose):
    cfg = to_config(compose(["trainer=zero3", "algo.kl_coef=0.1"]))
    assert type(cfg) is Config
    assert type(cfg.trainer) is TrainerConfig and type(cfg.algo) is AlgoConfig
    assert cfg.trainer.zero_stage == 3 and type(cfg.trainer.zero_stage) is int
    assert cfg.algo.kl_coef == 0.1 and type(cfg.algo.kl_coef) is float
    # conf/resources/local_cpu.yaml overrides num_cpus; everything else keeps the dataclass default
    assert cfg.resources.num_cpus == 8
    assert cfg.trainer.world_size == TrainerConfig().world_size
    assert validate_config(cfg).optimizer_steps == 80


def test_hydra_gpu_node_group(compose):
    cfg = to_config(compose(["resources=gpu_node", "rollout.num_engines=2"]))
    assert (cfg.resources.device, cfg.resources.placement, cfg.resources.weight_sync_backend) == (
        "cuda", "separate", "nccl",
    )
    assert (cfg.resources.policy.gpus, cfg.resources.generation.gpus) == (1.0, 1.0)
    validate_config(cfg)


@pytest.mark.parametrize("preset", ["gpu_node", "gpu_2x8"])
def test_disaggregated_gpu_presets_overlap_and_the_command_line_wins(compose, preset):
    # engines on their own GPUs: one step off-policy with TIS, unless the command line says otherwise
    cfg = to_config(compose([f"resources={preset}", "algo=grpo"]))
    assert (cfg.rollout.max_staleness, cfg.algo.rollout_correction, cfg.algo.estimator) == (1, "tis", "grpo")
    cfg = to_config(compose([f"resources={preset}", "rollout.max_staleness=0", "algo.rollout_correction=none"]))
    assert (cfg.rollout.max_staleness, cfg.algo.rollout_correction) == (0, "none")
    assert to_config(compose(["resources=gpu_colocated"])).rollout.max_staleness == 0  # engines sleep there


def test_a_step_of_one_optimizer_step_takes_pi_old_from_the_update(compose):
    # one epoch of one minibatch, KL in the loss, no correction: the separate old-logprob pass is skipped
    one = ["algo=grpo", "algo.ppo_epochs=1", "rollout.batch_size=16", "algo.minibatch_size=64"]
    assert updates_once(to_config(compose(one)))
    for other in (["algo.minibatch_size=32"], ["algo.ppo_epochs=2"], ["algo.rollout_correction=tis"],
                  ["algo.kl_in=reward", "algo.kl_estimator=k1"]):
        assert not updates_once(to_config(compose(one + other))), other
    assert updates_once(to_config(compose(one + ["algo.kl_in=reward", "algo.kl_coef=0"])))  # no KL at all
    assert not updates_once(to_config(compose([])))  # the default PPO: two epochs, KL in the reward


def test_hydra_value_that_fails_validation(compose):
    # Hydra accepts the int; validation (not the schema) rejects the value
    with pytest.raises(ConfigError, match=r"^trainer\.micro_batch_size=5:"):
        validate_config(to_config(compose(["trainer.micro_batch_size=5"])))


def test_hydra_unknown_key_is_rejected(compose):
    with pytest.raises(ConfigCompositionException, match="bogus") as excinfo:
        compose(["trainer.bogus=1"])
    assert isinstance(excinfo.value.__cause__, ConfigAttributeError)
    assert "bogus" in str(excinfo.value.__cause__)


def test_hydra_wrong_type_is_rejected(compose):
    with pytest.raises(ConfigCompositionException, match="zero_stage") as excinfo:
        compose(["trainer.zero_stage=abc"])
    assert isinstance(excinfo.value.__cause__, ValidationError)


def test_cli_config_error_fails_fast_with_one_line(tmp_path):
    # Acceptance criterion of the fail-fast issue: exit code 2, one stderr line naming the key,
    # well before any actor starts. hydra.run.dir keeps Hydra's output out of the repo.
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_dist.train", "trainer.micro_batch_size=5", f"hydra.run.dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=60,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "trainer.micro_batch_size=5" in lines[0]
    assert elapsed < 10.0


def test_added_unknown_key_is_rejected_by_name(compose):
    # "+group.key=value" adds a key even to a structured node; to_config must refuse it.
    with pytest.raises(ConfigError, match=r"^trainer\.micro_bach_size=4: unknown key"):
        to_config(compose(["+trainer.micro_bach_size=4"]))


def test_hf_model_preset_requires_a_path(compose):
    # The hf preset must not silently fall back to the tiny default.
    with pytest.raises(ConfigError, match=r"^model\.path='':"):
        validate_config(to_config(compose(["model=hf"])))


def test_cli_bad_reward_function_fails_before_any_actor(tmp_path):
    # The import path is resolved and its signature bound in the driver, before Ray starts.
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_dist.train", "reward.function=rlhf_dist.tasks.reviews:nope", f"hydra.run.dir={tmp_path}"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=False, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rlhf_dist:")]
    assert errors == [
        "rlhf_dist: error: reward.function='rlhf_dist.tasks.reviews:nope': cannot import it "
        "(module 'rlhf_dist.tasks.reviews' has no attribute 'nope')"
    ]
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("overrides", "gpus"),
    [
        (["resources=gpu_node", "rollout.num_engines=2"], 8),  # one node, 8 GPUs
        (["resources=gpu_2x8", "rollout.num_engines=6", "trainer.world_size=4", "trainer=zero3"], 16),
    ],
)
def test_gpu_presets_fill_their_gpus(compose, overrides, gpus):
    cfg = to_config(compose(overrides))
    validate_config(cfg)
    res = cfg.resources
    used = (
        cfg.rollout.num_engines * res.generation.gpus
        + cfg.trainer.world_size * (res.policy.gpus + res.critic.gpus)
        + cfg.reference.num_actors * res.reference.gpus
        + cfg.reward.num_actors * res.reward.gpus
    )
    assert used == pytest.approx(gpus)
    assert (res.device, res.weight_sync_backend) == ("cuda", "nccl")


def test_held_out_sources_resolve_auto():
    from rlhf_dist.config import DataConfig

    builtin = DataConfig()
    assert (builtin.held_out("sft"), builtin.held_out("preferences")) == ("builtin:reviews", "builtin:reviews")
    # a user's own data is never evaluated on the embedded task by accident
    files = DataConfig(sft="/d/sft.jsonl", preferences="/d/prefs.jsonl")
    assert (files.held_out("sft"), files.held_out("preferences")) == ("", "")
    chosen = DataConfig(sft="/d/sft.jsonl", eval_sft="/d/held.jsonl", eval_preferences="")
    assert (chosen.held_out("sft"), chosen.held_out("preferences")) == ("/d/held.jsonl", "")
    DataConfig(eval_sft="auto", eval_preferences="auto").validate()


def test_colocated_gpu_preset_shares_each_gpu_and_sleeps_its_engines(compose):
    cfg = to_config(compose(
        ["resources=gpu_colocated", "trainer.world_size=8", "rollout.num_engines=8", "trainer.micro_batch_size=4"]
    ))
    validate_config(cfg)
    res = cfg.resources
    assert (res.placement, res.weight_sync_backend, res.vllm_in_process) == ("colocated", "ipc", True)
    assert cfg.rollout.sleep_level == 1
    assert sum(r.gpus for r in res.roles().values()) <= 1.0  # bundle 0 holds one actor of every role
    # vLLM's budget is a fraction of the GPU: 0.35 <= 1 - (policy 0.2 + critic 0.2 + reference 0.1 + reward 0.1)
    assert (cfg.rollout.kv_cache_gib, cfg.rollout.gpu_memory_utilization) == (0.0, 0.35)


@pytest.mark.parametrize("preset", ["gpu_node", "gpu_2x8"])
def test_gpu_presets_size_vllm_by_a_fraction_of_its_own_gpu(compose, preset):
    rollout = to_config(compose([f"resources={preset}"])).rollout
    assert (rollout.kv_cache_gib, rollout.gpu_memory_utilization) == (0.0, 0.85)


def test_cpu_runs_keep_the_fixed_kv_cache(compose):
    # the schema default and the default run (local_cpu): 0.25 GiB of KV cache, as before the GPU presets moved
    for rollout in (Config().rollout, to_config(compose([])).rollout):
        assert (rollout.kv_cache_gib, rollout.gpu_memory_utilization) == (0.25, 0.5)


def test_colocated_grpo_with_three_ranks_validates_and_takes_three_gpus(compose):
    # GRPO (no critic) with 3 policy ranks and 1 engine on resources=gpu_colocated:
    #   samples 24 x 4 = 96, minibatch 48 -> 48 / 3 = 16 per rank, 2 micro-batches of 8
    cfg = to_config(compose(["resources=gpu_colocated", "algo=grpo", "trainer.world_size=3",
                             "rollout.batch_size=24", "algo.minibatch_size=48"]))
    validate_config(cfg)
    counts = actor_counts(cfg)
    assert counts == {"generation": 1, "policy": 3, "reward": 1, "reference": 1}
    plan = layout(cfg.resources.placement, cfg.resources.roles(), counts)
    # bundle 0: generation 2 + policy 2 + reward 1 + reference 1 = 6 CPUs; bundles 1, 2: a policy rank's 2;
    # each one whole GPU
    assert plan.groups == {"colocated": [{"GPU": 1.0, "CPU": 6.0}, {"GPU": 1.0, "CPU": 2.0}, {"GPU": 1.0, "CPU": 2.0}]}


def test_supervised_stages_refuse_fractional_ranks_apart():
    cfg = config_with(resources__device="cuda", resources__policy__gpus=0.5)
    for stage in ("sft", "rm"):
        with pytest.raises(ConfigError, match=r"^resources\.policy\.gpus=0\.5: .* trainer\.world_size=2 DeepSpeed"):
            supervised_plan(cfg, stage)
    supervised_plan(config_with(resources__device="cuda", resources__policy__gpus=0.5, trainer__world_size=1), "sft")


def test_kl_in_loss_refuses_k1_with_a_nonzero_coefficient():
    # E[grad k1] = E[grad log pi] = 0: a k1 loss term does nothing but add noise
    with pytest.raises(ConfigError) as excinfo:
        validate_config(config_with(algo__kl_in="loss", algo__kl_estimator="k1", algo__kl_coef=0.05))
    assert str(excinfo.value) == (
        "algo.kl_estimator='k1': with algo.kl_in=loss and algo.kl_coef=0.05 the k1 loss has zero expected "
        "gradient, so the KL term does nothing; use algo.kl_estimator=k3 (or k2), or algo.kl_in=reward"
    )
    assert "\n" not in str(excinfo.value)


@pytest.mark.parametrize(
    ("kl_in", "kl_estimator", "kl_coef"),
    [("loss", "k3", 0.05), ("loss", "k2", 0.05), ("reward", "k1", 0.05), ("loss", "k1", 0.0)],
)
def test_kl_placements_that_have_a_gradient_or_no_term_validate(kl_in, kl_estimator, kl_coef):
    AlgoConfig(kl_in=kl_in, kl_estimator=kl_estimator, kl_coef=kl_coef).validate()


@pytest.mark.parametrize(("mode", "cap"), [("none", 2.0), ("tis", 2.0), ("mis", 1.5), ("tis", 5.0)])
def test_rollout_corrections_with_a_cap_above_one_validate(mode, cap):
    AlgoConfig(rollout_correction=mode, rollout_is_cap=cap).validate()


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF_DIR / "algo").glob("*.yaml")))
def test_every_algo_preset_validates(compose, preset):
    # no preset may combine kl_in=loss with k1 (or any other refused setting)
    validate_config(to_config(compose([f"algo={preset}"])))


def test_collective_timeouts_cover_the_longest_wait_the_controller_allows():
    from rlhf_dist.config import trainer_collective_timeout_s, weight_sync_timeout_s

    # Defaults: timeouts.actor_start_s=300, train_s=600, weight_sync_s=120, generate_s=300, max_staleness=0.
    #   sync    = weight_sync_s = 120 (no rollout more than one step ahead)
    #   trainer = max(actor_start 300, train 600, sync 120) + sync 120 = 720
    cfg = Config()
    assert (weight_sync_timeout_s(cfg), trainer_collective_timeout_s(cfg)) == (120.0, 720.0)
    # max_staleness=2: a sync waits behind a generation: sync = 120 + 300 = 420; trainer = 600 + 420 = 1020
    ahead = config_with(rollout__max_staleness=2)
    assert (weight_sync_timeout_s(ahead), trainer_collective_timeout_s(ahead)) == (420.0, 1020.0)
    assert weight_sync_timeout_s(config_with(rollout__max_staleness=1)) == 120.0  # it waits for its rollout first
    # The longest call is the sync itself: sync = 1000; trainer = 1000 + 1000 = 2000 (a sync cut short at its
    # bound still gathers the rest with its peers); a slow start: max(900, 600, 120) + 120 = 1020
    assert trainer_collective_timeout_s(config_with(timeouts__weight_sync_s=1000.0)) == 2000.0
    assert trainer_collective_timeout_s(config_with(timeouts__actor_start_s=900.0)) == 1020.0
