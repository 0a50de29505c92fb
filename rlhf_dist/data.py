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
    skipped: int  # malformed rows skipped (data.on_bad_row=skip)

    def __len__(self) -> int:
        return len(self.texts)


def read_prompt_rows(path: Path, on_bad_row: str) -> tuple[list[str], int]:
    """Prompts of a JSONL file whose rows have a non-empty string ``prompt``."""
    if not path.is_file():
        raise DataError(f"data.prompts={str(path)!r}: file not found")
    texts, skipped = [], 0
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8-sig"))  # tolerate a byte-order mark
                prompt = row["prompt"]
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError("'prompt' is empty or not a string")
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                if on_bad_row == "error":
                    raise DataError(f"{path}:{line_no}: bad row ({type(e).__name__}: {e})") from e
                skipped += 1
                continue
            texts.append(prompt)
    return texts, skipped


def load_prompts(cfg: DataConfig, tokenizer, max_prompt_len: int, seed: int) -> PromptSet:
    """Tokenize the configured prompts; over-long ones are skipped or rejected per ``data.on_bad_row``."""
    if cfg.prompts == "builtin":
        from rlhf_dist.tasks import make_prompts

        texts, skipped = make_prompts(cfg.num_builtin_prompts, seed), 0
    else:
        texts, skipped = read_prompt_rows(Path(cfg.prompts).expanduser(), cfg.on_bad_row)
    kept_texts, kept_ids = [], []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        if len(ids) > max_prompt_len:
            if cfg.on_bad_row == "error":
                raise DataError(
                    f"data.prompts={cfg.prompts!r}: prompt of {len(ids)} tokens exceeds "
                    f"model.max_prompt_len={max_prompt_len}: {text[:60]!r}"
                )
            skipped += 1
            continue
        kept_texts.append(text)
        kept_ids.append(ids)
    if not kept_texts:
        raise DataError(f"data.prompts={cfg.prompts!r}: no usable prompts ({skipped} rows skipped)")
    return PromptSet(kept_texts, kept_ids, skipped)


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
