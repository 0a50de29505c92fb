"""PPO entry point: ``python -m rlhf_dist.train key=value ...`` (``-m`` for a sweep).

The config is validated before anything heavy is imported or any actor starts,
so a bad value fails in about a second with one line naming its dotted key.
The trained policy is exported to ``<output dir>/policy`` (a Hugging Face directory).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_dist.cli import entry_point
from rlhf_dist.config import Config, ConfigError, RunPlan, as_dict, lora_summary, validate_config

if TYPE_CHECKING:  # the heavy modules load only once the config is valid
    from rlhf_dist.checkpoint import Checkpointer
    from rlhf_dist.cluster.start import Roles
    from rlhf_dist.driver.data import PromptSet
    from rlhf_dist.driver.run_logger import RunLogger

POLICY_DIR = "policy"


def check_reward_function(path: str, key: str = "reward.function") -> None:
    """Import the reward function and bind its signature: fails in a second, not after the actors start."""
    from rlhf_dist.registry import import_function, takes_metadata

    try:
        takes_metadata(import_function(path, key), path, key)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_environment(spec: dict) -> None:
    """Import the environment class and bind its arguments (``rlhf_dist.registry.env_factory``)."""
    from rlhf_dist.registry import env_factory

    try:
        env_factory(spec)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def run(cfg: Config, out_dir: Path, group: str) -> dict:
    """Start the roles, run PPO (checkpointing, recovering lost actors), export the policy;
    always write summary.json and stop the actors."""
    from transformers import AutoTokenizer

    from rlhf_dist.checkpoint import Checkpointer, TrainState, read_state
    from rlhf_dist.cluster.hardware import bf16_warning, cpu_bf16
    from rlhf_dist.cluster.start import stage_actors
    from rlhf_dist.driver.data import load_prompts
    from rlhf_dist.driver.run_logger import RunLogger
    from rlhf_dist.models.modeling import resolve_model_path

    plan = validate_config(cfg)
    if warning := bf16_warning(cfg.resources.device, cfg.model.dtype, cpu_bf16()):
        print(warning, file=sys.stderr)
    if cfg.reward.function_weight:
        check_reward_function(cfg.reward.function)
    if cfg.eval.gold_function:
        check_reward_function(cfg.eval.gold_function, "eval.gold_function")
    if cfg.rollout.env:
        check_environment(cfg.rollout.env)
    if cfg.reward.model_weight:
        resolve_model_path(cfg.reward.model_path, cfg.cache_dir, "reward.model_path")  # a missing directory fails here
    policy_path = resolve_model_path(cfg.model.path, cfg.cache_dir)
    critic_path = policy_path
    if cfg.model.critic_path:
        critic_path = resolve_model_path(cfg.model.critic_path, cfg.cache_dir, "model.critic_path")
    checkpoints = Checkpointer(cfg.checkpoint, out_dir, as_dict(cfg))
    resume_from = checkpoints.dir.resolve(cfg.resume)
    state = read_state(resume_from) if resume_from else TrainState()
    if resume_from:
        if line := checkpoints.reshard_line(resume_from):
            print(line, file=sys.stderr)
        for change in checkpoints.check_config(resume_from):
            print(f"rlhf_dist: warning: resumed with a changed setting (the run is no longer the one "
                  f"checkpointed): {change}", file=sys.stderr)
    if cfg.resume:
        for path in checkpoints.dir.set_aside_after(state.step):
            print(f"rlhf_dist: warning: {path.name.removesuffix('.superseded')} is later than the step resumed "
                  f"from: kept as {path}", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    prompts = load_prompts(cfg.data.prompts, cfg.data, tokenizer, cfg.model.max_prompt_len, cfg.seed)
    eval_prompts = None
    if cfg.data.eval_prompts:
        eval_prompts = load_prompts(cfg.data.eval_prompts, cfg.data, tokenizer, cfg.model.max_prompt_len, cfg.seed,
                                    split="test")
    logger = RunLogger(cfg.logger, out_dir, as_dict(cfg), cfg.total_steps, group,
                       resume_step=state.step if cfg.resume else None, wandb_id=state.wandb_id)
    logger.add_summary({**state.summary, "resumed_from": str(resume_from or "")})
    logger.message(f"rlhf_dist: {len(prompts)} prompts ({prompts.skipped} skipped), policy {policy_path}, "
                   f"output {out_dir}" + (f", resuming from {resume_from}" if resume_from else ""))
    with stage_actors(logger) as actors:
        roles = run_with_restarts(cfg, plan, (policy_path, critic_path), (prompts, eval_prompts), logger,
                                  checkpoints, resume_from, actors)
        # A resumed run that goes on past an earlier end replaces that run's export.
        exported = roles.policy.save_async(str(out_dir / POLICY_DIR), replace=bool(cfg.resume)).result()
        logger.add_summary({"policy_path": exported})
        logger.message(f"rlhf_dist: policy saved to {exported}")
    return logger.finish("completed")


def run_with_restarts(
    cfg: Config, plan: RunPlan, paths: tuple[str, str], data: tuple[PromptSet, PromptSet | None], logger: RunLogger,
    checkpoints: Checkpointer, resume_from: Path | None, actors: list,
) -> Roles:
    """Start every role and run PPO from ``resume_from`` (None: step 0). When a trainer, reference
    or reward actor is lost, stop every role, start them again and continue from the newest
    checkpoint, at most ``max_restarts`` times; any other failure ends the run. Returns the roles.
    A lost engine is replaced in place instead (``cluster.restarts.EngineRecovery``, its own budget).
    A SIGTERM/SIGINT while the roles start stops the run once they have started (``Interrupted``),
    and so does an actor lost after one (the signal reached the actors too)."""
    from rlhf_dist.checkpoint import read_state
    from rlhf_dist.cluster.restarts import EngineRecovery, Restarts
    from rlhf_dist.cluster.start import shutdown_ray, start_roles
    from rlhf_dist.cluster.storage import check_shared
    from rlhf_dist.controller import run_rl
    from rlhf_dist.driver.preemption import PREEMPTION, Interrupted
    from rlhf_dist.roles.worker_group import RoleError

    # One budget each for the whole run: a restart of every role keeps the engines' count.
    restarts = Restarts(cfg.max_restarts)
    engines = EngineRecovery(Restarts(cfg.max_restarts), cfg.timeouts.actor_start_s, notify=logger.message,
                             actors_file=logger.out_dir / "actors.json")
    try:
        while True:
            started = time.perf_counter()
            roles = start_roles(cfg, plan, *paths, recovery=engines, restart=restarts.count > 0)
            actors.append(roles)
            PREEMPTION.check(f"{read_state(resume_from).step if resume_from else 0} of {cfg.total_steps} steps done")
            engines.record(roles)
            check_shared(checkpoints.dir.root, [g for g in (roles.policy, roles.critic) if g is not None],
                         cfg.timeouts.actor_start_s)
            logger.message(f"rlhf_dist: roles started in {time.perf_counter() - started:.0f}s ({roles.start_summary()})")
            if lora_line := lora_summary(cfg):
                logger.message(lora_line)
            try:
                state = checkpoints.restore(roles, resume_from) if resume_from else None
                run_rl(cfg, roles, *data, logger, checkpoints, state, PREEMPTION)
                return roles
            except RoleError as e:
                if e.lost_actor and PREEMPTION.requested:  # the signal stopped the actors too (a whole job signalled)
                    latest = checkpoints.dir.latest()
                    done = read_state(latest).step if latest else 0
                    raise Interrupted(PREEMPTION.signum, f"{done} of {cfg.total_steps} steps checkpointed; "
                                                         f"the actors were stopped too ({e})") from e
                if not e.lost_actor or not restarts.take():
                    raise
                resume_from = checkpoints.dir.latest()
                logger.message(f"rlhf_dist: {e}; restarting every role from {resume_from or 'the first step'} "
                               f"(restart {restarts.count}/{restarts.limit})")
                roles.kill()
                actors.remove(roles)
                shutdown_ray()
                logger.rewind(read_state(resume_from).step if resume_from else 0)
    finally:  # also in a failed run's summary
        logger.add_summary({"restarts/roles": restarts.count, "restarts/engines": engines.restarts.count})


main = entry_point("train", run, validate_config, objective="reward/last_fifth_mean", resume="resume=auto")

if __name__ == "__main__":
    main()
