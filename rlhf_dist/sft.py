"""Stage 1, supervised fine-tuning: ``python -m rlhf_dist.sft key=value ...``.

Trains ``model.path`` on the demonstrations ``data.sft`` with the same DeepSpeed ZeRO trainer
group as PPO (``trainer.world_size`` data-parallel ranks, ``trainer.zero_stage``), reports the
loss on the held-out demonstrations ``data.eval_sft`` before and after, and writes the fine-tuned
model to ``<output dir>/model`` (a Hugging Face directory with safetensors weights).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from rlhf_dist.cli import entry_point
from rlhf_dist.config import Config, as_dict, supervised_plan
from rlhf_dist.core.seeds import EPOCH_ORDER, derive_seed
from rlhf_dist.driver.preemption import PREEMPTION

MODEL_DIR = "model"


def batches(num_rows: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Row indices of every optimizer step: a seeded permutation per epoch, cut into full batches
    (the last partial batch of an epoch is dropped so every step has the same size)."""
    out = []
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(derive_seed(EPOCH_ORDER, seed, epoch))
        order = torch.randperm(num_rows, generator=generator).tolist()
        out.extend(order[i : i + batch_size] for i in range(0, num_rows - batch_size + 1, batch_size))
    return out


def run(cfg: Config, out_dir: Path, group: str) -> dict:
    """Fine-tune, evaluate the held-out loss before and after, save; summary.json always."""
    from transformers import AutoTokenizer

    from rlhf_dist.cluster.start import stage_actors, start_trainer_group
    from rlhf_dist.core.experience import collate
    from rlhf_dist.driver.data import load_sft
    from rlhf_dist.driver.run_logger import RunLogger
    from rlhf_dist.models.modeling import resolve_model_path

    base = resolve_model_path(cfg.model.path, cfg.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(base)
    train = load_sft(cfg.data.sft, cfg.data, tokenizer, cfg.sft.max_len, cfg.seed)
    held_out = None
    if held_source := cfg.data.held_out("sft"):
        held_out = load_sft(held_source, cfg.data, tokenizer, cfg.sft.max_len, cfg.seed, split="test")
    plan = supervised_plan(cfg, "sft", len(train))
    steps = batches(len(train), cfg.sft.batch_size, cfg.sft.epochs, cfg.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def as_batch(data, rows):
        return collate([data.prompt_ids[i] for i in rows], [data.response_ids[i] for i in rows], pad)

    logger = RunLogger(cfg.logger, out_dir, as_dict(cfg), len(steps), group, desc="sft", headline="sft/loss",
                       postfix=("sft/loss",))
    logger.message(f"rlhf_dist sft: {len(train)} demonstrations ({train.skipped} skipped), {len(steps)} steps, "
                   f"base {base}, output {out_dir}")
    with stage_actors(logger) as actors:
        sft = start_trainer_group(cfg, plan, "sft", base, actors, logger, lr=cfg.sft.lr)
        if held_out is not None:
            held_batch = as_batch(held_out, range(len(held_out)))
            logger.add_summary({"sft/initial_eval_loss": sft.eval_loss_async(held_batch).result()})
        for step, rows in enumerate(steps):
            PREEMPTION.check(f"{step} of {len(steps)} steps done")  # a signal: stop between steps
            stats = sft.train_async(as_batch(train, rows)).result()
            logger.log(step, {"sft/loss": stats["loss"], "sft/perplexity": math.exp(stats["loss"]), "sft/lr": stats["lr"]})
        if held_out is not None:
            logger.add_summary({"sft/final_eval_loss": sft.eval_loss_async(held_batch).result()})
        saved = sft.save_async(str(out_dir / MODEL_DIR)).result()
        logger.add_summary({"model_path": saved, "sft/skipped_rows": train.skipped})
        logger.message(f"rlhf_dist sft: model saved to {saved}")
    return logger.finish("completed")


main = entry_point("sft", run, lambda cfg: supervised_plan(cfg, "sft"), objective="sft/final_eval_loss")

if __name__ == "__main__":
    main()
