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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_dist.cli import entry_point
from rlhf_dist.config import Config, ConfigError, supervised_plan, validate_config
from rlhf_dist.driver.preemption import PREEMPTION

STAGES = ("sft", "reward_model", "ppo", "evaluate")  # round 1, then the evaluation
ROUND_STAGES = ("label", "reward_model", "ppo")  # each further round (pipeline.rounds), in round_<r>/
PENDING = "<output of an earlier stage>"  # placeholder path while validating up front


@dataclass
class Artifacts:
    """What the stages so far produced, by path: the latest reward model and rankings, every
    round's policy in order."""

    sft: str = PENDING
    reward_model: str = PENDING
    rankings: str = PENDING
    policies: list[str] = field(default_factory=list)

    @property
    def policy(self) -> str:
        return self.policies[-1] if self.policies else PENDING

    def record(self, stage: str, summary: dict[str, Any]) -> None:
        if stage == "sft":
            self.sft = summary["model_path"]
        elif stage == "reward_model":
            self.reward_model = summary["model_path"]
        elif stage == "label":
            self.rankings = summary["rankings_path"]
        elif stage == "ppo":
            self.policies.append(summary["policy_path"])


def stage_plan(rounds: int) -> list[tuple[int, str, str]]:
    """(round, stage, directory under the output dir) of every stage, in order."""
    plan = [(1, stage, stage) for stage in STAGES[:3]]
    plan += [(r, stage, f"round_{r}/{stage}") for r in range(2, rounds + 1) for stage in ROUND_STAGES]
    return [*plan, (rounds, "evaluate", "evaluate")]


def _with(cfg: Config, **groups: dict[str, Any]) -> Config:
    """A copy of ``cfg`` with fields of some groups replaced: _with(cfg, model={"path": p})."""
    return dataclasses.replace(cfg, **{g: dataclasses.replace(getattr(cfg, g), **kv) for g, kv in groups.items()})


def stage_config(cfg: Config, round_: int, stage: str, art: Artifacts) -> Config:
    """The config a stage runs with, artifacts passed by path. Round 1: the SFT model starts the
    reward model and PPO and is the KL reference. A further round: the labeller's rankings of the
    current policy's and SFT's samples continue the previous reward model; PPO continues from the
    current policy against it, its KL to SFT (or to that policy: pipeline.kl_reference)."""
    cfg = _with(cfg, reward={"model_path": art.reward_model})  # PPO's reward and the evaluation's reward score
    if stage == "sft":
        return cfg
    if stage == "label":
        return _with(cfg, eval={"policies": {"policy": art.policy, "sft": art.sft}},
                     pipeline={"label_round": round_})
    if stage == "reward_model" and round_ == 1:
        return _with(cfg, rm={"init_path": cfg.rm.init_path or art.sft})
    if stage == "reward_model":  # held out: the first round's set, so that the rounds' accuracies compare
        return _with(cfg, rm={"init_path": art.reward_model},
                     data={"preferences": art.rankings, "eval_preferences": cfg.data.held_out("preferences")})
    if stage == "ppo" and round_ == 1:
        return _with(cfg, model={"path": art.sft})
    if stage == "ppo":
        reference = art.sft if cfg.pipeline.kl_reference == "sft" else art.policy
        return _with(cfg, model={"path": art.policy}, reference={"path": reference})
    earlier = {f"round_{i + 1}": path for i, path in enumerate(art.policies[:-1])}
    return _with(cfg, eval={"policies": {"sft": art.sft, **earlier, "ppo": art.policy}, "baseline": "sft"})


def validate(cfg: Config) -> None:
    from rlhf_dist.label import labeller

    if not cfg.reward.model_weight:
        raise ConfigError(f"reward.model_weight={cfg.reward.model_weight}: the pipeline's PPO optimises the "
                          "learned reward model; keep reward=model")
    pending = Artifacts(policies=[PENDING])
    supervised_plan(stage_config(cfg, 1, "sft", pending), "sft")
    supervised_plan(stage_config(cfg, 1, "reward_model", pending), "rm")
    validate_config(stage_config(cfg, 1, "ppo", pending))
    if cfg.pipeline.rounds > 1 and cfg.pipeline.labeller == "builtin":
        labeller(cfg)


def _completed(stage_dir: Path) -> dict[str, Any] | None:
    summary = stage_dir / "summary.json"
    if summary.is_file():
        data = json.loads(summary.read_text())
        if data.get("status") == "completed":
            return data
    return None


def run(cfg: Config, out_dir: Path, group: str) -> dict:
    from rlhf_dist import evaluate, label, reward_model, sft, train
    from rlhf_dist.cli import Paused

    validate(cfg)
    group = group or f"pipeline-{out_dir.name}"
    runners = {"sft": sft.run, "reward_model": reward_model.run, "ppo": train.run, "label": label.run,
               "evaluate": evaluate.run}
    results: dict[str, dict[str, Any]] = {}
    art = Artifacts()
    started = time.perf_counter()
    for round_, stage, where in stage_plan(cfg.pipeline.rounds):
        PREEMPTION.check(f"stages done: {', '.join(results) or 'none'}")  # a signal late in the previous stage
        stage_dir = out_dir / where
        summary = _completed(stage_dir)
        if summary is None and stage == "label" and (stage_dir / label.EXPORT_FILE).is_file():
            raise Paused(label.waiting_for_rankings(stage_dir))  # exported: a person ranks them
        if summary is None:
            stage_cfg = stage_config(cfg, round_, stage, art)
            if stage == "ppo" and stage_dir.exists():
                stage_cfg = dataclasses.replace(stage_cfg, resume="auto")
            elif stage_dir.exists():
                stage_dir.rename(stage_dir.with_name(f"{stage}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}"))
            print(f"rlhf_dist pipeline: stage {where} -> {stage_dir}", flush=True)
            summary = runners[stage](stage_cfg, stage_dir, group)
        else:
            print(f"rlhf_dist pipeline: stage {where} already completed in {stage_dir}, reused", flush=True)
        results[where] = summary
        art.record(stage, summary)
    report = pipeline_report(cfg, results, art, time.perf_counter() - started)
    (out_dir / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "paths"}, indent=2), flush=True)
    return report


def pipeline_report(cfg: Config, results: dict[str, dict], art: Artifacts, wall_s: float) -> dict[str, Any]:
    """The figures that say whether the pipeline worked, gathered from the stage summaries; a
    further round's under ``round_<r>/`` (its rankings, its reward model's held-out accuracy, its
    PPO's reward improvement)."""
    ev = results["evaluate"]
    report: dict[str, Any] = {
        "status": "completed",
        "rounds": cfg.pipeline.rounds,
        "sft/final_eval_loss": results["sft"].get("sft/final_eval_loss"),
        "rm/eval_accuracy": results["reward_model"].get("rm/eval_accuracy"),
        "ppo/reward_improvement": results["ppo"].get("reward/improvement"),
        "paths": {"sft": art.sft, "reward_model": art.reward_model, "ppo": art.policy, "policies": art.policies},
        "wall_time_s": round(wall_s, 1),
    }
    for r in range(2, cfg.pipeline.rounds + 1):
        label, rm, ppo = (results[f"round_{r}/{stage}"] for stage in ROUND_STAGES)
        report.update({f"round_{r}/{k}": v for k, v in label.items() if k.startswith("label/")})
        report[f"round_{r}/rm/eval_accuracy"] = rm.get("rm/eval_accuracy")
        report[f"round_{r}/ppo/reward_improvement"] = ppo.get("reward/improvement")
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
