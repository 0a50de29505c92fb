"""The end of a Hydra sweep (``-m``, basic or Optuna sweeper): one table of every trial.

Registered as a Hydra callback in ``conf/config.yaml``; after the last job it reads each job's
``summary.json`` and overrides and writes ``sweep_summary.md`` and ``sweep_summary.json`` in the
sweep dir, best first by the objective the entry point returns to the sweeper. The launcher
``hydra/launcher=ray_jobs`` writes them too after a batch with a failed trial (``write_summary``):
a sweeper may end the sweep on it before this callback runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# What each command returns to a sweeper (higher is better except the SFT loss); the first one a
# job's summary has is its objective.
OBJECTIVES = (
    ("eval/ppo/win_rate", "max"),  # rlhf_dist.pipeline
    ("reward/last_fifth_mean", "max"),  # rlhf_dist.train
    ("rm/eval_accuracy", "max"),  # rlhf_dist.reward_model
    ("sft/final_eval_loss", "min"),  # rlhf_dist.sft
)
SHOWN = ("eval/final_reward_mean", "eval/final_gold_mean", "reward/improvement", "wall_time_s")


def sweep_objective(summary: dict[str, Any], objective: str) -> float | None:
    """What a command returns to a sweeper (``rlhf_dist.cli.entry_point``'s ``objective``): its
    summary's ``objective``; None where it has none (a command without an objective, a run that
    stopped before computing it)."""
    return summary.get(objective) if objective else None


def collect_trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job dir (a dir holding ``.hydra/overrides.yaml``), best first."""
    rows = []
    for job_dir in sorted(p.parent.parent for p in sweep_dir.glob("*/.hydra/overrides.yaml")):
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
        summary_file = job_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {"status": "no summary"}
        row: dict[str, Any] = {"job": job_dir.name, "overrides": " ".join(overrides),
                               "status": summary.get("status", "unknown")}
        for key, direction in OBJECTIVES:
            if isinstance(summary.get(key), (int, float)):
                row.update(objective=key, value=summary[key], direction=direction)
                break
        row.update({k: summary[k] for k in SHOWN if isinstance(summary.get(k), (int, float))})
        rows.append(row)

    def rank(row: dict[str, Any]) -> float:
        value = row.get("value")
        if not isinstance(value, (int, float)) or math.isnan(value):
            return math.inf
        return -value if row["direction"] == "max" else value

    return sorted(rows, key=rank)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = ["job", "status", "objective", "value", *SHOWN, "overrides"]
    columns = [c for c in columns if any(c in r for r in rows)]

    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    """Write ``sweep_summary.json`` and ``sweep_summary.md`` in ``sweep_dir`` (nothing while no job
    dir is there); returns the rows."""
    rows = collect_trials(sweep_dir)
    if rows:
        (sweep_dir / "sweep_summary.json").write_text(json.dumps(rows, indent=2) + "\n")
        (sweep_dir / "sweep_summary.md").write_text(markdown_table(rows))
    return rows


class SweepSummary(Callback):
    """Hydra callback: writes the sweep's summary table when the multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir)
        if rows:
            print(f"rlhf_dist: sweep of {len(rows)} jobs, best first ({sweep_dir / 'sweep_summary.md'}):\n"
                  f"{markdown_table(rows)}", flush=True)
