"""``hydra/launcher=ray_jobs``: a multirun's trials as Ray jobs on a running cluster, side by side.

    python -m rlhf_dist.train -m hydra/launcher=ray_jobs hydra.launcher.max_concurrent=2 seed=1,2 ...

Each trial is ``python -m <the sweep's command>`` submitted through Ray's job API (as
``scripts/submit_job.sh`` submits one run), at most ``max_concurrent`` at a time. The launcher polls
their status; a trial that fails is reported in one line (its status and the end of its job's log)
while the others go on, and comes back to the sweeper as a failed job. A succeeded trial's value is
read from its ``summary.json`` (what the command returns in-process), so the Optuna sweeper gets its
numbers. The sweep dir must be on storage every node shares (the trials write there, the launcher
reads there).
"""

# No `from __future__ import annotations` in a plugin: Hydra's plugin scan runs the module before it is
# in sys.modules, where dataclasses look string annotations up.
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobRuntime, JobStatus, configure_log, setup_globals
from hydra.errors import CompactHydraException
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from rlhf_dist.driver.sweep import write_summary
from rlhf_dist.driver.sweep_jobs import (
    NO_SUMMARY,
    JobApiError,
    Outcome,
    Trial,
    entrypoint,
    failure_line,
    log_tail,
    read_objective,
    run_trials,
    trial_command,
)

log = logging.getLogger(__name__)

# The trials' environment, as scripts/submit_job.sh sets it; W&B keys are never put here (Ray stores
# a job's runtime environment in its job table): each node's Ray has them from where it started.
ENV_VARS = {"TOKENIZERS_PARALLELISM": "false", "RAY_AUTH_MODE": "token"}


@dataclass
class RayJobsLauncherConf:
    _target_: str = "hydra_plugins.rlhf_dist_ray_jobs.ray_jobs_launcher.RayJobsLauncher"
    # Ray's job API (the dashboard's address, http://<head>:8265): $RAY_ADDRESS, else the head itself.
    address: str = "${oc.env:RAY_ADDRESS,'http://127.0.0.1:8265'}"
    # Trials running at once (the Optuna sweeper hands over hydra.sweeper.n_jobs trials at a time).
    max_concurrent: int = 2
    # CPUs, GPUs and custom resources held for each trial's driver process (Ray's entrypoint_*; 0 and {}:
    # none, and the driver runs on the head node). Its actors take what the run's resources.* say.
    entrypoint_num_cpus: float = 0.0
    entrypoint_num_gpus: float = 0.0
    entrypoint_resources: dict[str, float] = field(default_factory=dict)
    # Seconds between two looks at the running trials.
    poll_s: float = 5.0
    # A trial still running after this many seconds is stopped and reported failed; 0: no limit.
    trial_timeout_s: float = 0.0
    # Seconds one call of the job API (submit, status, logs, stop) may take.
    request_timeout_s: float = 30.0
    # Lines of a failed trial's log quoted in the line that reports it.
    log_lines: int = 5

    def validate(self) -> None:
        for key, value, ok, need in (
            ("max_concurrent", self.max_concurrent, self.max_concurrent >= 1, "at least 1"),
            ("poll_s", self.poll_s, self.poll_s > 0, "above 0"),
            ("request_timeout_s", self.request_timeout_s, self.request_timeout_s > 0, "above 0"),
            ("trial_timeout_s", self.trial_timeout_s, self.trial_timeout_s >= 0, "0 (no limit) or more"),
            ("log_lines", self.log_lines, self.log_lines >= 0, "0 or more"),
        ):
            if not ok:
                end_sweep(f"rlhf_dist: config error: hydra.launcher.{key}={value!r}: must be {need}", exit_code=2)


ConfigStore.instance().store(group="hydra/launcher", name="ray_jobs", node=RayJobsLauncherConf, provider="rlhf_dist")


def end_sweep(line: str, exit_code: int = 1) -> NoReturn:
    """The sweep cannot start (a bad setting, no job API): one line, as the commands end (Hydra would
    add a line about its stack traces to an exception)."""
    print(line, file=sys.stderr, flush=True)
    sys.exit(exit_code)


class TrialFailed(CompactHydraException):
    """A failed trial's ``return_value``: the line that reported it (Hydra's basic sweeper raises it
    once the batch has ended; the Optuna sweeper records the trial as failed)."""


class RayJobs:
    """Ray's job API for one batch of trials. Every call is bounded by ``request_timeout_s`` and fails
    with one line naming the trial and the operation (``JobApiError``)."""

    def __init__(self, settings: RayJobsLauncherConf, commands: dict[int, str], sweep_dir: Path) -> None:
        self.settings, self.commands, self.sweep_dir = settings, commands, sweep_dir
        self.address = settings.address
        self.client = self._connect()

    def _connect(self) -> Any:
        # As submit_job.sh: the job API checks the cluster's token. Ray reads this when it is imported.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        from ray.job_submission import JobSubmissionClient

        timeout_s = self.settings.request_timeout_s

        class BoundedClient(JobSubmissionClient):
            def _do_request(self, method: str, endpoint: str, **kwargs: Any) -> Any:
                # Ray 2.60's one HTTP call (requests), which sets no timeout of its own
                return super()._do_request(method, endpoint, timeout=timeout_s, **kwargs)

        try:
            with api_address(self.address):
                return BoundedClient(self.address)
        except api_errors() as e:
            from ray.exceptions import AuthenticationError

            if isinstance(e, AuthenticationError):
                end_sweep(f"rlhf_dist: error: hydra/launcher=ray_jobs: the Ray job API at {self.address} refused "
                          f"the sweep ({self._why(e)}); run it with the cluster's token: RAY_AUTH_MODE=token and "
                          "~/.ray/auth_token (or RAY_AUTH_TOKEN) as on the head node (docs/cluster.md)")
            end_sweep(f"rlhf_dist: error: hydra/launcher=ray_jobs: no Ray job API answers at {self.address} "
                      f"({self._why(e)}); start the cluster (scripts/ray_cluster.sh head), or set "
                      "hydra.launcher.address (or RAY_ADDRESS) to its job API")

    def _why(self, e: Exception) -> str:
        import requests

        if isinstance(e, requests.Timeout):
            return f"timed out after {self.settings.request_timeout_s:g}s (hydra.launcher.request_timeout_s)"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}" if first else type(e).__name__

    def _call(self, trial: Trial, operation: str, call: Callable[[], Any]) -> Any:
        try:
            return call()
        except api_errors() as e:
            raise JobApiError(f"trial {trial.label}: {operation} at {self.address}: {self._why(e)}") from None

    def submit(self, trial: Trial) -> str:
        s = self.settings
        name = re.sub(r"[^A-Za-z0-9_-]", "_", self.sweep_dir.name)
        return self._call(trial, "submit", lambda: self.client.submit_job(
            entrypoint=self.commands[trial.num], submission_id=f"rlhf_dist-{name}-{trial.num}-{uuid.uuid4().hex[:6]}",
            runtime_env={"env_vars": ENV_VARS}, metadata={"sweep_dir": str(self.sweep_dir), "trial": str(trial.num)},
            entrypoint_num_cpus=s.entrypoint_num_cpus or None, entrypoint_num_gpus=s.entrypoint_num_gpus or None,
            entrypoint_resources=dict(s.entrypoint_resources) or None))

    def status(self, trial: Trial, job_id: str) -> tuple[str, str]:
        info = self._call(trial, f"status of ray job {job_id}", lambda: self.client.get_job_info(job_id))
        return str(info.status), info.message or ""

    def stop(self, trial: Trial, job_id: str) -> None:
        self._call(trial, f"stop of ray job {job_id}", lambda: self.client.stop_job(job_id))

    def log_tail(self, trial: Trial, job_id: str) -> str:
        try:
            logs = self._call(trial, f"logs of ray job {job_id}", lambda: self.client.get_job_logs(job_id))
        except JobApiError as e:
            return f"(not read: {e})"
        return log_tail(logs, self.settings.log_lines)


def api_errors() -> tuple[type[Exception], ...]:
    """What Ray's job client raises: requests' errors (OSError), a refused request (RuntimeError), a
    refused token (RayError), an answer it cannot read (ValueError)."""
    from ray.exceptions import RayError

    return OSError, RuntimeError, ValueError, RayError


@contextmanager
def api_address(address: str) -> Iterator[None]:
    """Ray's client takes its address from RAY_API_SERVER_ADDRESS or RAY_ADDRESS before its argument:
    the launcher's setting decides."""
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        if saved is None:
            del os.environ["RAY_API_SERVER_ADDRESS"]
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


class RayJobsLauncher(Launcher):
    def __init__(self, **settings: Any) -> None:
        self.settings = RayJobsLauncherConf(**settings)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.settings.validate()
        if not hasattr(task_function, "sweep_objective"):
            end_sweep(f"rlhf_dist: error: hydra/launcher=ray_jobs runs rlhf_dist's commands "
                      f"(python -m rlhf_dist.<name> -m ...), not {task_function.__module__}", exit_code=2)
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir)).absolute()
        sweep_dir.mkdir(parents=True, exist_ok=True)
        configs = {initial_job_idx + i: self._trial_config(initial_job_idx + i, o) for i, o in enumerate(job_overrides)}
        trials = [self._trial(num, overrides, configs[num]) for num, overrides in zip(configs, job_overrides)]
        jobs = RayJobs(self.settings, {t.num: self._command(t, sweep_dir) for t in trials}, sweep_dir)
        log.info(f"Launching {len(trials)} jobs on the Ray cluster at {jobs.address}, "
                 f"{self.settings.max_concurrent} at a time")
        for trial in trials:
            log.info(f"\t{trial.label} -> {trial.run_dir}")
        returns = run_trials(trials, jobs, self.settings.max_concurrent, self.settings.trial_timeout_s,
                             clock=time.monotonic, wait=lambda: time.sleep(self.settings.poll_s),
                             on_end=lambda outcome: self._returned(outcome, jobs, configs[outcome.trial.num]))
        if any(r.status == JobStatus.FAILED for r in returns):
            self._summary_so_far(sweep_dir, returns)
        return returns

    def _trial_config(self, num: int, overrides: Sequence[str]) -> DictConfig:
        """The trial's config as the basic launcher composes it (an override Hydra refuses ends the
        sweep here, before any job), with its job number."""
        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        return config

    @staticmethod
    def _trial(num: int, overrides: Sequence[str], config: DictConfig) -> Trial:
        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(config)  # a ${hydra:...} in the dirs reads the trial's config
        try:
            run_dir = Path(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)).absolute()
        finally:
            HydraConfig.instance().cfg = saved
        return Trial(num, tuple(overrides), run_dir)

    def _command(self, trial: Trial, sweep_dir: Path) -> str:
        assert self.config is not None and self.task_function is not None
        hydra_cfg = self.config.hydra
        config_dirs = [s.path for s in hydra_cfg.runtime.config_sources if s.provider == "command-line"]
        argv = trial_command(sys.executable, self.task_function.__module__, hydra_cfg.job.config_name, config_dirs,
                             trial, sweep_dir, OmegaConf.to_container(hydra_cfg.overrides.hydra, resolve=False))
        return entrypoint(hydra_cfg.runtime.cwd, argv)

    def _returned(self, outcome: Outcome, jobs: RayJobs, config: DictConfig) -> JobReturn:
        """What the sweeper gets for an ended trial; a failed one is reported here, in one line."""
        trial = outcome.trial
        task_cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        ret = JobReturn(overrides=list(trial.overrides), cfg=task_cfg, hydra_cfg=OmegaConf.masked_copy(config, "hydra"),
                        working_dir=os.getcwd(), task_name=JobRuntime.instance().get("name"))
        if outcome.succeeded:
            objective = self.task_function.sweep_objective  # type: ignore[union-attr]
            try:
                ret.return_value, ret.status = read_objective(trial.run_dir, objective), JobStatus.COMPLETED
                log.info(f"{trial.label} succeeded: {objective or 'value'}={ret.return_value}")
                return ret
            except (OSError, ValueError) as e:
                outcome = Outcome(trial, NO_SUMMARY, f"the job succeeded but {trial.run_dir}/summary.json cannot "
                                  f"be read ({type(e).__name__}); hydra.sweep.dir must be on storage every node "
                                  "shares", outcome.job_id)
        line = failure_line(outcome, jobs.log_tail(trial, outcome.job_id) if outcome.job_id else "")
        print(line, file=sys.stderr, flush=True)
        ret.return_value, ret.status = TrialFailed(line), JobStatus.FAILED
        return ret

    @staticmethod
    def _summary_so_far(sweep_dir: Path, returns: Sequence[JobReturn]) -> None:
        """A sweeper may end the sweep on a failed trial (Hydra's basic sweeper raises it after the
        batch), before the sweep summary's callback: the table of every trial is written now too."""
        rows = write_summary(sweep_dir)
        failed = sum(r.status == JobStatus.FAILED for r in returns)
        print(f"rlhf_dist: {failed} of {len(returns)} trials failed; the sweep summary so far: "
              f"{sweep_dir / 'sweep_summary.md'} ({len(rows)} trials)", file=sys.stderr, flush=True)

