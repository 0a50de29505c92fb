"""The InstructGPT pipeline in one command: ``python -m rlhf_dist.pipeline key=value ...``.

    SFT -> reward model -> PPO against the reward model -> evaluation

Each stage is the same function its own command runs (``rlhf_dist.sft``, ``.reward_model``,
``.train``, ``.evaluate``), in its own subdirectory of the output dir, and each passes its
artifact on by path: the SFT model is the PPO policy's start, the reward model's backbone and
the KL reference; the reward model is PPO's only reward. ``conf/pipeline.yaml`` holds the
defaults (the embedded task: simulated demonstrations and annotator rankings; the hidden
annotator is only the evaluation's judge).

Re-running with the same ``hydra.run.dir`` continues: a stage whose summary says "completed"
is reused; an unfinished PPO stage resumes from its newest checkpoint (``resume=auto``); any
other unfinished stage is moved aside (``<stage>.incomplete-<time>``) and run again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from rlhf_dist.cli import entry_point
from rlhf_dist.config import Config, ConfigError, supervised_plan, validate_config
from rlhf_dist.driver.preemption import PREEMPTION

STAGES = ("sft", "reward_model", "ppo", "evaluate")
PENDING = "<output of an earlier stage>"  # placeholder path while validating up front


def _with(cfg: Config, **groups: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with fields of some groups replaced: _with(cfg, model={"path": p})."""
    return dataclasses.replace(cfg, **{g: dataclasses.replace(getattr(cfg, g), **kv) for g, kv in groups.items()})


def stage_configs(cfg: Config, sft_path: str, rm_path: str, ppo_path: str) -> dict[str, Config]:
    """The config each stage runs with, artifacts passed by path."""
    cfg = _with(cfg, reward={"model_path": rm_path})  # PPO's reward and the evaluation's reward score
    return {
        "sft": cfg,
        "reward_model": _with(cfg, rm={"init_path": cfg.rm.init_path or sft_path}),
        "ppo": _with(cfg, model={"path": sft_path}),
        "evaluate": _with(cfg, eval={"policies": {"sft": sft_path, "ppo": ppo_path}, "baseline": "sft"}),
    }


def validate(cfg: Config) -> None:
    if not cfg.reward.model_weight:
        raise ConfigError(f"reward.model_weight={cfg.reward.model_weight}: the pipeline's PPO optimises the "
                          "learned reward model; keep reward=model")
    staged = stage_configs(cfg, PENDING, PENDING, PENDING)
    supervised_plan(staged["sft"], "sft")
    supervised_plan(staged["reward_model"], "rm")
    validate_config(staged["ppo"])


def _completed(stage_dir: Path) -> dict[str, Any] | None:
    summary = stage_dir / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if data.get("status") == "completed":
            return data
    return None


def run(cfg: Config, out_dir: Path, group: str) -> dict:
    from rlhf_dist import evaluate, reward_model, sft, train

    validate(cfg)
    group = group or f"pipeline-{out_dir.name}"
    runners = {"sft": sft.run, "reward_model": reward_model.run, "ppo": train.run, "evaluate": evaluate.run}
    results: dict[str, dict[str, Any]] = {}
    paths = {"sft": PENDING, "reward_model": PENDING, "ppo": PENDING}
    started = time.perf_counter()
    for stage in STAGES:
        PREEMPTION.check(f"stages done: {', '.join(results) or 'none'}")  # a signal late in the previous stage
        stage_dir = out_dir / stage
        summary = _completed(stage_dir)
        if summary is None:
            stage_cfg = stage_configs(cfg, paths["sft"], paths["reward_model"], paths["ppo"])[stage]
            if stage == "ppo" and stage_dir.exists():
                stage_cfg = dataclasses.replace(stage_cfg, resume="auto")
            elif stage_dir.exists():
                stage_dir.rename(out_dir / f"{stage}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
            print(f"rlhf_dist pipeline: stage {stage} -> {stage_dir}", flush=True)
            summary = runners[stage](stage_cfg, stage_dir, group)
        else:
            print(f"rlhf_dist pipeline: stage {stage} already completed in {stage_dir}, reused", flush=True)
        results[stage] = summary
        if stage in paths:
            paths[stage] = summary["policy_path" if stage == "ppo" else "model_path"]
    report = pipeline_report(cfg, results, paths, time.perf_counter() - started)
    (out_dir / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "paths"}, indent=2), flush=True)
    return report


def pipeline_report(cfg: Config, results: dict[str, dict], paths: dict[str, str], wall_s: float) -> dict[str, Any]:
    """The figures that say whether the pipeline worked, gathered from the stage summaries."""
    ev = results["evaluate"]
    report: dict[str, Any] = {
        "status": "completed",
        "sft/final_eval_loss": results["sft"].get("sft/final_eval_loss"),
        "rm/eval_accuracy": results["reward_model"].get("rm/eval_accuracy"),
        "ppo/reward_improvement": results["ppo"].get("reward/improvement"),
        "paths": paths,
        "wall_time_s": round(wall_s, 1),
    }
    if cfg.data.preferences.startswith("builtin:"):
        # A reward model that ranks every pair like the annotator still disagrees with the
        # flipped labels: its expected held-out accuracy is at most 1 - noise.
        report["rm/accuracy_ceiling"] = 1.0 - cfg.data.annotator_noise
    for key, value in ev.items():
        if key.startswith("eval/"):
            report[key] = value
    return report


# The same command again continues an unfinished pipeline: nothing to add to resume it.
main = entry_point("pipeline", run, validate, objective="eval/ppo/win_rate", config_name="pipeline", resume="")

if __name__ == "__main__":
    main()
