"""What every stage's command shares: Hydra composition, validation before anything heavy,
one-line errors with exit codes, and the run's output directory and W&B group.

A stage is ``run(cfg, out_dir, group) -> summary``; ``entry_point`` turns it into a Hydra main.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from rlhf_dist.config import Config, ConfigError, register_configs, to_config

register_configs()
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

Stage = Callable[[Config, Path, str], dict[str, Any]]


def run_guarded(run: Stage, cfg: Config, out_dir: Path, group: str) -> dict[str, Any]:
    """Run a stage; the errors a user can fix end the process with one line and exit code 1."""
    from rlhf_dist.checkpoint import CheckpointError
    from rlhf_dist.data import DataError
    from rlhf_dist.worker_group import RoleError

    try:
        return run(cfg, out_dir, group)
    except (ConfigError, RoleError, DataError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"rlhf_dist: error: {e}", file=sys.stderr)
        sys.exit(1)


def entry_point(
    name: str, run: Stage, validate: Callable[[Config], Any], objective: str, config_name: str = "config"
) -> Callable[[], Any]:
    """The Hydra main of ``python -m rlhf_dist.<name>`` on ``conf/<config_name>.yaml``: ``validate``
    runs first (a bad value exits 2 in about a second); the return value, ``summary[objective]``,
    is what a sweeper optimises."""

    def main(raw: DictConfig) -> float | None:
        try:
            cfg = to_config(raw)
            validate(cfg)
        except ConfigError as e:
            print(f"rlhf_dist: config error: {e}", file=sys.stderr)
            sys.exit(2)
        hydra_cfg = HydraConfig.get()
        group = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else ""
        summary = run_guarded(run, cfg, Path(hydra_cfg.runtime.output_dir), group)
        return summary.get(objective)

    main.__module__ = f"rlhf_dist.{name}"  # Hydra names the job (and its log file) after this module
    return hydra.main(version_base=None, config_path=CONF_DIR, config_name=config_name)(main)
