"""PPO entry point: ``python -m rlhf_dist.train key=value ...`` (``-m`` for a sweep).

The config is validated before anything heavy is imported or any actor starts,
so a bad value fails in about a second with one line naming its dotted key.
The trained policy is exported to ``<output dir>/policy`` (a Hugging Face directory).
"""

from __future__ import annotations

import time
from pathlib import Path

from rlhf_dist.cli import entry_point
from rlhf_dist.config import Config, ConfigError, as_dict, validate_config

POLICY_DIR = "policy"


def check_reward_function(path: str) -> None:
    """Import the reward function and bind its signature: fails in a second, not after the actors start."""
    from rlhf_dist.roles.reward import import_function, takes_metadata

    try:
        takes_metadata(import_function(path), path)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def run(cfg: Config, out_dir: Path, group: str) -> dict:
    """Start the roles, run PPO, export the policy; always write summary.json and stop the actors."""
    from transformers import AutoTokenizer

    from rlhf_dist.cluster import stage_actors, start_roles
    from rlhf_dist.controller import run_rl
    from rlhf_dist.data import load_prompts
    from rlhf_dist.modeling import resolve_model_path
    from rlhf_dist.run_logger import RunLogger

    plan = validate_config(cfg)
    if cfg.reward.function_weight:
        check_reward_function(cfg.reward.function)
    if cfg.eval.gold_function:
        check_reward_function(cfg.eval.gold_function)
    if cfg.reward.model_weight:
        resolve_model_path(cfg.reward.model_path, cfg.cache_dir)  # a missing directory fails here
    policy_path = resolve_model_path(cfg.model.path, cfg.cache_dir)
    critic_path = resolve_model_path(cfg.model.critic_path, cfg.cache_dir) if cfg.model.critic_path else policy_path
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    prompts = load_prompts(cfg.data.prompts, cfg.data, tokenizer, cfg.model.max_prompt_len, cfg.seed)
    eval_prompts = None
    if cfg.data.eval_prompts:
        eval_prompts = load_prompts(cfg.data.eval_prompts, cfg.data, tokenizer, cfg.model.max_prompt_len, cfg.seed,
                                    split="test")
    logger = RunLogger(cfg.logger, out_dir, as_dict(cfg), cfg.total_steps, group)
    logger.message(f"rlhf_dist: {len(prompts)} prompts ({prompts.skipped} skipped), policy {policy_path}, "
                   f"output {out_dir}")
    with stage_actors(logger) as actors:
        started = time.perf_counter()
        roles = start_roles(cfg, plan, policy_path, critic_path)
        actors.append(roles)
        logger.message(f"rlhf_dist: roles started in {time.perf_counter() - started:.0f}s")
        run_rl(cfg, roles, prompts, eval_prompts, logger)
        exported = roles.policy.save_async(str(out_dir / POLICY_DIR)).result()
        logger.add_summary({"policy_path": exported})
        logger.message(f"rlhf_dist: policy saved to {exported}")
    return logger.finish("completed")


main = entry_point("train", run, validate_config, objective="reward/last_fifth_mean")

if __name__ == "__main__":
    main()
