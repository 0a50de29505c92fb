"""PPO entry point: ``python -m rlhf_dist.train key=value ...`` (``-m`` for a sweep).

The config is validated before anything heavy is imported or any actor starts,
so a bad value fails in about a second with one line naming its dotted key.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlhf_dist.config import Config, ConfigError, RunPlan, as_dict, register_configs, to_config, validate_config

register_configs()
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def run(cfg: Config, plan: RunPlan, out_dir: Path, group: str) -> dict:
    """Start the roles, run PPO, always write summary.json and stop the actors."""
    from transformers import AutoTokenizer

    from rlhf_dist.cluster import shutdown_ray, start_roles
    from rlhf_dist.controller import run_rl
    from rlhf_dist.data import load_prompts
    from rlhf_dist.modeling import resolve_model_path
    from rlhf_dist.run_logger import RunLogger

    if cfg.reward.function_weight:  # fail in a second, not after the actors have started
        from rlhf_dist.roles.reward import import_function, takes_metadata

        try:
            takes_metadata(import_function(cfg.reward.function), cfg.reward.function)
        except ValueError as e:
            raise ConfigError(str(e)) from e
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
    roles = None
    try:
        started = time.perf_counter()
        roles = start_roles(cfg, plan, policy_path, critic_path)
        logger.message(f"rlhf_dist: roles started in {time.perf_counter() - started:.0f}s")
        run_rl(cfg, roles, prompts, eval_prompts, logger)
    except BaseException as e:
        logger.finish("failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if roles is not None:
            roles.shutdown()
        shutdown_ray()
    return logger.finish("completed")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def main(raw: DictConfig) -> float:
    try:
        cfg = to_config(raw)
        plan = validate_config(cfg)
    except ConfigError as e:
        print(f"rlhf_dist: config error: {e}", file=sys.stderr)
        sys.exit(2)
    from rlhf_dist.data import DataError
    from rlhf_dist.worker_group import RoleError

    hydra_cfg = HydraConfig.get()
    group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else ""
    try:
        summary = run(cfg, plan, Path(hydra_cfg.runtime.output_dir), group)
    except (ConfigError, RoleError, DataError, FileNotFoundError, FileExistsError) as e:
        print(f"rlhf_dist: error: {e}", file=sys.stderr)
        sys.exit(1)
    return summary["reward/last_fifth_mean"]  # the objective a sweeper optimises


if __name__ == "__main__":
    main()
