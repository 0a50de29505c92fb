"""Stage 2, the reward model: ``python -m rlhf_dist.reward_model key=value ...``.

Trains a one-logit sequence classifier (started from ``rm.init_path``, by default
``model.path``) on the preferences ``data.preferences``, pairs or rankings of K responses, with
the Bradley-Terry loss over each prompt's comparisons (``core.losses.ranking_loss``), on the same
DeepSpeed ZeRO trainer group as PPO. Reports pairwise accuracy (the share of comparable pairs
ordered right) on ``data.eval_preferences`` (by default the held-out split of builtin data) and writes
``<output dir>/model`` with ``reward_normalization.json`` (mean and std of its scores on the
held-out responses, else the training ones), which the reward actor uses to normalise the
reward during PPO.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rlhf_dist.cli import entry_point
from rlhf_dist.config import Config, as_dict, supervised_plan
from rlhf_dist.driver.preemption import PREEMPTION
from rlhf_dist.sft import MODEL_DIR, batches


def run(cfg: Config, out_dir: Path, group: str) -> dict:
    """Train, measure held-out accuracy, save with the normalisation; summary.json always."""
    from transformers import AutoTokenizer

    from rlhf_dist.cluster.start import stage_actors, start_trainer_group
    from rlhf_dist.core.losses import ranking_loss
    from rlhf_dist.driver.data import load_preferences
    from rlhf_dist.driver.run_logger import RunLogger
    from rlhf_dist.models.modeling import resolve_model_path
    from rlhf_dist.roles.reward import NORMALIZATION_FILE

    init = resolve_model_path(cfg.rm.init_path or cfg.model.path, cfg.cache_dir,
                              "rm.init_path" if cfg.rm.init_path else "model.path")
    tokenizer = AutoTokenizer.from_pretrained(init)
    if tokenizer.pad_token_id is None:
        from rlhf_dist.config import ConfigError

        raise ConfigError(f"rm.init_path={init!r}: the tokenizer has no pad token (the score is read at the last "
                          "non-pad token); add one to the tokenizer")
    train = load_preferences(cfg.data.preferences, cfg.data, tokenizer, cfg.rm.max_len, cfg.seed)
    held_out = None
    if held_source := cfg.data.held_out("preferences"):
        held_out = load_preferences(held_source, cfg.data, tokenizer, cfg.rm.max_len, cfg.seed, split="test")
    plan = supervised_plan(cfg, "rm", len(train))
    steps = batches(len(train), cfg.rm.batch_size, cfg.rm.epochs, cfg.seed)
    pad = tokenizer.pad_token_id

    logger = RunLogger(cfg.logger, out_dir, as_dict(cfg), len(steps), group, desc="reward model",
                       headline="rm/accuracy", postfix=("rm/loss", "rm/accuracy"))
    logger.message(f"rlhf_dist reward_model: {len(train)} preference rows ({train.skipped} skipped), {len(held_out) if held_out else 0} "
                   f"held out, {len(steps)} steps, init {init}, output {out_dir}")
    with stage_actors(logger) as actors:
        rm = start_trainer_group(cfg, plan, "reward_model", init, actors, logger, lr=cfg.rm.lr)
        started = time.perf_counter()
        for step, rows in enumerate(steps):
            PREEMPTION.check(f"{step} of {len(steps)} steps done")  # a signal: stop between steps
            stats = rm.train_async(train.batch(rows, pad)).result()
            logger.log(step, {"rm/loss": stats["loss"], "rm/accuracy": stats["accuracy"], "rm/margin": stats["margin"],
                              "rm/lr": stats["lr"]})
        train_s = time.perf_counter() - started
        logger.add_summary({"time/train_s": train_s, "time/epoch_s": train_s / cfg.rm.epochs})
        # Held-out accuracy, and the normalisation from the held-out responses (else the training ones).
        reference = held_out if held_out is not None else train
        batch = reference.batch(range(len(reference)), pad)
        scores = rm.scores_async(batch).result()
        if held_out is not None:
            logger.add_summary({"rm/eval_accuracy": ranking_loss(scores, batch.ranks)[1]["accuracy"],
                                "rm/eval_pairs": held_out.comparisons(), "rm/eval_prompts": len(held_out)})
        scores = scores.T[batch.ranks.T >= 0]  # slot-major, as the forward pass: pairs' chosen, then rejected
        normalization = {"mean": scores.mean().item(), "std": max(scores.std().item(), 1e-6),
                         "source": "held-out" if held_out is not None else "training", "responses": len(scores)}
        saved = rm.save_async(str(out_dir / MODEL_DIR), {NORMALIZATION_FILE: json.dumps(normalization, indent=2)}).result()
        logger.add_summary({"model_path": saved, "rm/skipped_rows": train.skipped, "rm/train_prompts": len(train),
                            "rm/train_comparisons": train.comparisons(),
                            "rm/score_mean": normalization["mean"], "rm/score_std": normalization["std"]})
        logger.message(f"rlhf_dist reward_model: held-out accuracy "
                       f"{logger.extra_summary.get('rm/eval_accuracy', float('nan')):.3f}, model saved to {saved}")
    return logger.finish("completed")


main = entry_point("reward_model", run, lambda cfg: supervised_plan(cfg, "rm"), objective="rm/eval_accuracy")

if __name__ == "__main__":
    main()
