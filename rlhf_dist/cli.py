"""What every stage's command shares: Hydra composition, validation before anything heavy,
one-line errors with exit codes, stopping on SIGTERM/SIGINT, and the run's output directory and
W&B group.

A stage is ``run(cfg, out_dir, group) -> summary``; ``entry_point`` turns it into a Hydra main.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from rlhf_dist.config import Config, ConfigError, register_configs, to_config
from rlhf_dist.driver.preemption import PREEMPTION, Interrupted
from rlhf_dist.driver.run_logger import check_wandb_credentials
from rlhf_dist.driver.sweep import sweep_objective

register_configs()
# conf/ of the repository, installed as the package rlhf_dist.conf (pyproject.toml): found the same
# way in a checkout (an editable install maps it) and in an installed wheel.
CONF_PATH = "pkg://rlhf_dist.conf"

Stage = Callable[[Config, Path, str], dict[str, Any]]


def resume_command(module: str, overrides: list[str], out_dir: Path, resume: str | None,
                   config_name: str = "") -> str:
    """How to continue an interrupted run: the same command with its overrides (an earlier
    ``resume=`` dropped), then ``resume`` (e.g. "resume=auto"; "" for a command that continues
    by itself) and ``hydra.run.dir``. ``resume=None``: the stage keeps no checkpoints."""
    if resume is None:
        return f"{module} keeps no checkpoints: run it again (in a new hydra.run.dir) to start over"
    args = [sys.executable, "-m", module, *(["--config-name", config_name] if config_name else [])]
    args += [o for o in overrides if not o.startswith("resume=")]
    args += [*([resume] if resume else []), f"hydra.run.dir={out_dir}"]
    return "resume with: " + shlex.join(args)


def sweep_group(hydra_cfg: DictConfig) -> str:
    """The W&B group of a sweep's jobs, the sweep dir's name: the jobs of a multirun, and the trials
    that ``hydra/launcher=ray_jobs`` runs as runs of their own (each given ``hydra.job.num`` and the
    sweep dir, as a launcher gives a job); "" for a single run."""
    trial = hydra_cfg.mode == RunMode.MULTIRUN or not OmegaConf.is_missing(hydra_cfg.job, "num")
    return Path(hydra_cfg.sweep.dir).name if trial else ""


class OutputDirCheck(Callback):
    """Hydra callback (conf/config.yaml): an output directory that cannot be made or written ends the
    command with one line and exit code 1, before Hydra makes it (its own attempt fails with a
    traceback of pathlib's frames)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable("hydra.run.dir", config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable("hydra.sweep.dir", config)


def check_writable(key: str, config: DictConfig) -> None:
    """Make the directory at ``key`` of ``config`` and write a file in it, as Hydra and the run will.
    Read from the config Hydra then uses: its ``${now:...}`` is resolved once per config."""
    directory = str(OmegaConf.select(config, key))
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        print(f"rlhf_dist: error: {key}={directory!r}: cannot write the run's output there "
              f"({type(e).__name__}: {e.strerror or e}); choose another {key}", file=sys.stderr)
        sys.exit(1)


class Paused(Exception):
    """The run stopped to wait for something only a person can give (a round's rankings); the
    message says what and how to go on. Exit code ``PAUSED_EXIT``."""


PAUSED_EXIT = 3


def run_guarded(run: Stage, cfg: Config, out_dir: Path, group: str, how_to_resume: str = "") -> dict[str, Any]:
    """Run a stage; the errors a user can fix end the process with one line and exit code 1; a
    run stopped by a signal (``Interrupted``) ends with one line, ``how_to_resume``, and exit
    code 128 + the signal number."""
    from rlhf_dist.checkpoint import CheckpointError
    from rlhf_dist.driver.data import DataError
    from rlhf_dist.roles.worker_group import RoleError

    try:
        return run(cfg, out_dir, group)
    except (ConfigError, RoleError, DataError, CheckpointError, FileNotFoundError, FileExistsError) as e:
        print(f"rlhf_dist: error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:
        print(f"rlhf_dist: {e}; {how_to_resume}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except Paused as e:
        print(f"rlhf_dist: paused: {e}", file=sys.stderr, flush=True)
        sys.exit(PAUSED_EXIT)


def entry_point(
    name: str, run: Stage, validate: Callable[[Config], Any], objective: str, config_name: str = "config",
    resume: str | None = None,
) -> Callable[[], Any]:
    """The Hydra main of ``python -m rlhf_dist.<name>`` on ``conf/<config_name>.yaml``: ``validate``
    runs first, then an online W&B run's credentials are looked up (a bad value, or no key, exits 2
    in about a second); the return value, ``summary[objective]``, is what a sweeper optimises.
    SIGTERM/SIGINT stop the run between steps (``preemption``); ``resume`` is the override that
    continues it (see ``resume_command``)."""

    def main(raw: DictConfig) -> float | None:
        try:
            cfg = to_config(raw)
            validate(cfg)
            check_wandb_credentials(cfg.logger)
        except ConfigError as e:
            print(f"rlhf_dist: config error: {e}", file=sys.stderr)
            sys.exit(2)
        hydra_cfg = HydraConfig.get()
        group = sweep_group(hydra_cfg)
        out_dir = Path(hydra_cfg.runtime.output_dir)
        used_config = hydra_cfg.job.config_name
        how_to_resume = resume_command(f"rlhf_dist.{name}", list(hydra_cfg.overrides.task), out_dir, resume,
                                       used_config if used_config != config_name else "")
        PREEMPTION.install()
        summary = run_guarded(run, cfg, out_dir, group, how_to_resume)
        return sweep_objective(summary, objective)

    main.__module__ = f"rlhf_dist.{name}"  # Hydra names the job (and its log file) after this module
    # hydra/launcher=ray_jobs runs each trial as a job of its own and reads its value from summary.json
    main.sweep_objective = objective  # type: ignore[attr-defined]
    return hydra.main(version_base=None, config_path=CONF_PATH, config_name=config_name)(main)
