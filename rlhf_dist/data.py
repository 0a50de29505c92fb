"""Prompt sets: loading, validation of rows, and a deterministic sampler keyed by step."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_dist.config import DataConfig


class DataError(ValueError):
    """A prompt file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class PromptSet:
    texts: list[str]
    token_ids: list[list[int]]
    metadata: list[dict]  # the row's other keys (e.g. a reference answer), passed to reward functions
    skipped: int  # malformed rows skipped (data.on_bad_row=skip)

    def __len__(self) -> int:
        return len(self.texts)


def read_prompt_rows(path: Path, on_bad_row: str) -> tuple[list[dict], int]:
    """Rows of a JSONL file that have a non-empty string ``prompt``."""
    if not path.is_file():
        raise DataError(f"data.prompts={str(path)!r}: file not found")
    rows, skipped = [], 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig"))  # tolerate a byte-order mark
                prompt = row["prompt"]
                if not isinstance(row, dict):
                    raise ValueError("row is not a JSON object")
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError("'prompt' is empty or not a string")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                if on_bad_row == "error":
                    raise DataError(f"{path}:{line_no}: bad row ({type(e).__name__}: {e})") from e
                skipped += 1
                continue
            rows.append(row)
    return rows, skipped


def builtin_rows(name: str, num: int, seed: int, split: str) -> list[dict]:
    """Rows of a builtin prompt set (``builtin:reviews`` or ``builtin:arithmetic``)."""
    if name == "builtin:reviews":
        from rlhf_dist.tasks import make_prompts

        return [{"prompt": p} for p in make_prompts(num, seed + (0 if split == "train" else 1_000_003))]
    if name == "builtin:arithmetic":
        from rlhf_dist.arithmetic import make_problems

        return make_problems(num, seed, split)
    raise DataError(f"unknown builtin prompt set {name!r}")


def load_prompts(
    source: str, cfg: DataConfig, tokenizer, max_prompt_len: int, seed: int, split: str = "train"
) -> PromptSet:
    """Tokenize a prompt source (``data.prompts`` or ``data.eval_prompts``); over-long prompts are
    skipped or rejected per ``data.on_bad_row``."""
    if source.startswith("builtin:"):
        rows, skipped = builtin_rows(source, cfg.num_builtin_prompts, seed, split), 0
    else:
        rows, skipped = read_prompt_rows(Path(source).expanduser(), cfg.on_bad_row)
    texts, ids_list, metadata = [], [], []
    for row in rows:
        text = row["prompt"]
        ids = tokenizer(text)["input_ids"]
        if len(ids) > max_prompt_len:
            if cfg.on_bad_row == "error":
                raise DataError(
                    f"data: {source!r}: prompt of {len(ids)} tokens exceeds "
                    f"model.max_prompt_len={max_prompt_len}: {text[:60]!r}"
                )
            skipped += 1
            continue
        texts.append(text)
        ids_list.append(ids)
        metadata.append({k: v for k, v in row.items() if k != "prompt"})
    if not texts:
        raise DataError(f"data: {source!r}: no usable prompts ({skipped} rows skipped)")
    return PromptSet(texts, ids_list, metadata, skipped)


class PromptSampler:
    """Batches of prompt indices: a fresh seeded permutation per epoch, position fixed by step.

    ``indices(step)`` depends only on (seed, step), so a resumed run sees the same prompts.
    """

    def __init__(self, num_prompts: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = num_prompts, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out
