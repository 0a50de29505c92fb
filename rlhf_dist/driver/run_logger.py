"""The one place metrics go: console progress bar, ``metrics.jsonl``, ``summary.json`` and W&B."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from rlhf_dist.config import ConfigError, LoggerConfig

METRICS = "metrics.jsonl"
REPLACED = "metrics.replaced.jsonl"  # steps a resumed or restarted run did again, as first logged


def _row_step(row: dict[str, Any]) -> int:
    """The step a logged row belongs to: metrics and rollout tables carry "step"; evaluation
    tables "after_steps" (= step + 1)."""
    return row["step"] if "step" in row else row["after_steps"] - 1


def check_wandb_credentials(cfg: LoggerConfig) -> None:
    """An online W&B run needs credentials (an API key in WANDB_API_KEY, ~/.netrc or wandb's
    settings, or an identity token file): without any, ``wandb.init`` ends the run with a traceback
    (or waits at a prompt), after the data and models are loaded. Checked before anything starts,
    as wandb looks them up, without the network (whether the server accepts the key is not checked)."""
    if cfg.backend != "wandb" or cfg.mode != "online":
        return
    from wandb.errors import AuthenticationError
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth  # wandb 0.31's lookup behind wandb.init (pinned in pyproject.toml)

    fix = "run `wandb login`, set WANDB_API_KEY, or log offline with logger.mode=offline"
    host = wandb_setup.singleton().settings.base_url
    try:
        auth = wbauth.authenticate_session(host=host, source="rlhf_dist", prompt=False, update_session=False)
    except AuthenticationError as e:  # a key of the wrong form, or two kinds of credentials at once
        raise ConfigError(f"logger.mode='online': the W&B credentials for {host} are unusable ({e}); {fix}") from None
    if auth is None:
        raise ConfigError(f"logger.mode='online': no W&B API key is configured for {host}; {fix}")


class RunLogger:
    """Metrics of one stage's run. ``headline`` is the metric summarised over the first and last
    fifth of the steps; ``postfix`` the metrics shown on the progress bar.

    ``resume_step`` continues the run in ``out_dir`` from that step: the rows of earlier steps are
    kept, later ones move to metrics.replaced.jsonl. Without it, an ``out_dir`` that already holds
    a run is refused. ``wandb_id`` continues that W&B run."""

    def __init__(
        self, cfg: LoggerConfig, out_dir: Path, config: dict[str, Any], total_steps: int, group: str,
        desc: str = "ppo", headline: str = "reward/mean", postfix: tuple[str, ...] = ("reward/mean", "kl/mean"),
        name: str = "", resume_step: int | None = None, wandb_id: str = "",
    ) -> None:
        from tqdm import tqdm

        self.cfg, self.out_dir, self.total_steps = cfg, out_dir, total_steps
        self.headline, self.postfix = headline, postfix
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics = out_dir / METRICS
        if resume_step is None and metrics.exists() and metrics.stat().st_size:
            # Appending would mix two runs' steps; overwriting would lose the earlier run.
            raise FileExistsError(
                f"{metrics} already holds a run: choose another hydra.run.dir, or continue it with resume=auto"
            )
        self.history: list[dict[str, float]] = []
        self.extra_summary: dict[str, float] = {}
        self.start = time.time()
        self._bar = tqdm(total=total_steps, desc=desc, unit="step", disable=not cfg.progress_bar, dynamic_ncols=True)
        self._jsonl = metrics.open("a", buffering=1)  # line-buffered: nothing lost on a crash
        self.rewind(resume_step or 0)
        self.wandb_run = None
        if cfg.backend == "wandb":
            import wandb

            # The W&B API key is read by wandb itself from its own settings or WANDB_API_KEY;
            # it is never part of the config logged here.
            self.wandb_run = wandb.init(
                project=cfg.project, group=cfg.group or group or None, name=cfg.name or name or out_dir.name,
                dir=str(out_dir), mode=cfg.mode, config=config, reinit="finish_previous",
                id=wandb_id or None, resume="allow" if wandb_id else None,
            )

    @property
    def wandb_id(self) -> str:
        return self.wandb_run.id if self.wandb_run is not None else ""

    def rewind(self, step: int) -> None:
        """Continue from ``step``: rows logged for it and later steps (metrics and tables) move to
        metrics.replaced.jsonl / are dropped from the tables; the history keeps the earlier ones.
        W&B keeps the values first logged for a step and ignores a step logged again."""
        self._jsonl.close()
        kept = self._truncate(self.out_dir / METRICS, step, self.out_dir / REPLACED)
        for table in self.out_dir.glob("*_samples.jsonl"):
            self._truncate(table, step, None)
        self.history = kept
        self._jsonl = (self.out_dir / METRICS).open("a", buffering=1)
        self._bar.n = len(kept)
        self._bar.refresh()

    @staticmethod
    def _truncate(path: Path, step: int, moved_to: Path | None) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in rows if _row_step(r) < step]
        if len(kept) == len(rows):
            return kept
        if moved_to is not None:
            with moved_to.open("a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows if _row_step(r) >= step)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(path)
        return kept

    def log(self, step: int, metrics: dict[str, float]) -> None:
        # time/end: when the step ended (Unix seconds), so that runs side by side (a sweep's trials) can be
        # lined up; W&B stamps its rows itself (_timestamp)
        row = {"step": step, **metrics, "time/end": round(time.time(), 3)}
        self.history.append(row)
        self._jsonl.write(json.dumps(row) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        self._bar.update(1)
        # "reward/mean" shows as reward=..., "sft/loss" as loss=...
        self._bar.set_postfix({k.removesuffix("/mean").split("/")[-1]: f"{metrics[k]:.4g}" for k in self.postfix
                               if k in metrics})

    def table(self, key: str, columns: list[str], rows: list[list[Any]], step: int | None = None) -> None:
        """A table (e.g. sample responses): a W&B table logged at ``step`` (the row of that step's
        metrics), and one JSON line per row appended to ``<key>.jsonl`` in the run dir
        ("eval/samples" -> eval_samples.jsonl)."""
        with (self.out_dir / f"{key.replace('/', '_')}.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(columns, row))) + "\n")
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def add_summary(self, values: dict[str, Any]) -> None:
        """Values of the run as a whole, not of a step (e.g. the initial evaluation, the saved
        model's path): ``finish`` writes them to summary.json and the W&B summary."""
        self.extra_summary.update(values)

    def message(self, text: str) -> None:
        self._bar.write(text)

    def finish(self, status: str, error: str = "") -> dict[str, Any]:
        summary = summarize(self.history, self.headline)
        summary.update(self.extra_summary)
        summary.update(status=status, error=error, wall_time_s=round(time.time() - self.start, 2))
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._bar.close()
        self._jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.summary.update({k: v for k, v in summary.items() if not isinstance(v, dict)})
            self.wandb_run.finish(exit_code=0 if status == "completed" else 1)
        return summary


def summarize(history: list[dict[str, float]], headline: str = "reward/mean") -> dict[str, Any]:
    """Final metrics plus the mean of ``headline`` ("reward/mean" -> "reward/...") over the first
    and last fifth of the steps."""
    if not history:
        return {"steps": 0}
    if not all(headline in r for r in history):
        return {"steps": len(history), "final": history[-1]}
    fifth = max(1, math.floor(len(history) / 5))
    first = statistics.fmean(r[headline] for r in history[:fifth])
    last = statistics.fmean(r[headline] for r in history[-fifth:])
    prefix = headline.split("/")[0]
    return {
        "steps": len(history),
        f"{prefix}/first_fifth_mean": first,
        f"{prefix}/last_fifth_mean": last,
        f"{prefix}/improvement": last - first,
        "final": history[-1],
    }
