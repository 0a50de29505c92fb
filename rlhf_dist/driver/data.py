"""The data of every stage: prompt sets (RL), demonstrations (SFT) and preferences, pairs or
rankings (reward model), from builtin generators, JSONL files or Hugging Face ``datasets``
directories; validation of rows (counted and skipped, or rejected naming file and line); chat
templates; and a deterministic prompt sampler keyed by step."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_dist.config import DataConfig
from rlhf_dist.core.experience import RankingBatch, collate_rankings
from rlhf_dist.core.seeds import EPOCH_ORDER, derive_seed
from rlhf_dist.models.chat import conversation_text, prompt_token_ids
from rlhf_dist.registry import TASKS
from rlhf_dist.tasks.base import Task, load_task


class DataError(ValueError):
    """Data that cannot be used; the message names the config key, or the file and line."""


@dataclass(frozen=True)
class PromptSet:
    texts: list[str]
    token_ids: list[list[int]]
    metadata: list[dict]  # the row's other keys (e.g. a reference answer), passed to reward functions
    skipped: int  # malformed rows skipped (data.on_bad_row=skip)

    def __len__(self) -> int:
        return len(self.texts)


def _raw_rows(path: Path, key: str) -> Iterator[tuple[int, bytes | dict]]:
    """(line or row number, raw JSONL line or dataset row) of a JSONL file or a Hugging Face
    ``datasets`` directory (``save_to_disk``; a DatasetDict must have a ``train`` split)."""
    if path.is_dir():
        try:
            import datasets
        except ImportError as e:
            raise DataError(f"{key}={str(path)!r}: reading a datasets directory needs the `datasets` package") from e
        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{key}={str(path)!r}: not a JSONL file or a datasets directory ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{key}={str(path)!r}: DatasetDict without a 'train' split ({sorted(ds)})")
            ds = ds["train"]
        yield from enumerate(ds, 1)
        return
    if not path.is_file():
        raise DataError(f"{key}={str(path)!r}: file not found")
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if raw.strip():
                yield line_no, raw


def _check_text(value: object, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} is empty or not a string")
    return value


def read_rows(
    path: Path, on_bad_row: str, text_keys: tuple[str, ...] = ("prompt",), key: str = "data.prompts",
    check: Callable[[dict], object] | None = None,
) -> tuple[list[dict], int]:
    """Rows whose ``text_keys`` are all non-empty strings (and that ``check`` accepts: it raises
    KeyError, TypeError or ValueError saying what is wrong); a malformed row (bad JSON or UTF-8,
    missing key, empty text) is counted and skipped, or raises naming file and line."""
    rows, skipped = [], 0
    for line_no, raw in _raw_rows(path, key):
        try:
            row = json.loads(raw.decode("utf-8-sig")) if isinstance(raw, bytes) else raw  # tolerate a BOM
            if not isinstance(row, dict):
                raise TypeError("row is not a JSON object")
            for name in text_keys:
                _check_text(row[name], repr(name))
            if check is not None:
                check(row)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            if on_bad_row == "error":
                raise DataError(f"{path}:{line_no}: bad row ({type(e).__name__}: {e})") from e
            skipped += 1
            continue
        rows.append(row)
    return rows, skipped


def _builtin_task(source: str) -> Task:
    """The built-in task of a ``builtin:<name>`` source (``rlhf_dist.registry.TASKS``)."""
    name = source.removeprefix("builtin:")
    if name not in TASKS:
        raise DataError(f"unknown builtin source {source!r}: use builtin:<name> with a name of {', '.join(TASKS)}")
    return load_task(name)


def builtin_prompt_rows(name: str, num: int, seed: int, split: str) -> list[dict]:
    """Prompt rows of a builtin prompt set ``builtin:<task>``, from the task's ``prompts``."""
    return _builtin_task(name).prompts(num, seed, split)


def _rows(source: str, key: str, kind: str, cfg: DataConfig, seed: int, split: str) -> tuple[list[dict], int]:
    """Rows of an SFT or preference source: ``builtin:<task>`` (a task with supervised rows) or a file."""
    if source.startswith("builtin:"):
        task = _builtin_task(source)
        if task.supervised_rows is None:
            raise DataError(f"{key}={source!r}: the {task.name} task has no demonstrations or preference pairs")
        num = cfg.num_builtin_sft if kind == "sft" else cfg.num_builtin_pairs
        if split == "test":
            num = max(1, num // 8)
        return task.supervised_rows(kind, num, seed, split, cfg.annotator_noise, cfg.ranking_k), 0
    if kind == "sft":
        return read_rows(Path(source).expanduser(), cfg.on_bad_row, ("prompt", "response"), key)
    return read_rows(Path(source).expanduser(), cfg.on_bad_row, ("prompt",), key, check=ranking_of)


def _nothing_usable(key: str, source: str, what: str, skipped: int) -> DataError:
    why = f"{skipped} rows skipped" if skipped else "it is empty"
    return DataError(f"{key}={source!r}: no usable {what} ({why})")


def _too_long(cfg: DataConfig, key: str, skipped: int, length: int, max_len: int, text: str) -> int:
    if cfg.on_bad_row == "error":
        raise DataError(f"{key}: row of {length} tokens exceeds the limit {max_len}: {text[:60]!r}")
    return skipped + 1


@dataclass(frozen=True)
class SFTSet:
    """Demonstrations as token ids: the prompt (as the policy sees it) and the response + EOS."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    skipped: int

    def __len__(self) -> int:
        return len(self.prompt_ids)


def load_sft(source: str, cfg: DataConfig, tokenizer, max_len: int, seed: int, split: str = "train") -> SFTSet:
    """``prompt``/``response`` rows; a pair longer than ``max_len`` tokens is skipped or rejected."""
    key = "data.sft" if split == "train" else "data.eval_sft"  # the caller passes the matching source
    if tokenizer.eos_token_id is None:
        raise DataError(f"{key}: the tokenizer has no EOS token, so the policy could not learn to stop; add one")
    rows, skipped = _rows(source, key, "sft", cfg, seed, split)
    prompts, responses = [], []
    for row in rows:
        p = prompt_token_ids(tokenizer, row["prompt"], cfg.chat_template)
        r = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(p) + len(r) > max_len:
            skipped = _too_long(cfg, key, skipped, len(p) + len(r), max_len, row["prompt"])
            continue
        prompts.append(p)
        responses.append(r)
    if not prompts:
        raise _nothing_usable(key, source, "rows", skipped)
    return SFTSet(prompts, responses, skipped)


def ranking_of(row: dict) -> tuple[list[str], list[int]]:
    """(responses, ranks) of a preference row: a pair ``chosen``/``rejected`` is the ranking
    [chosen, rejected] (ranks [0, 1]); ``responses`` (two or more, best first) with optional
    ``ranks`` (integers >= 0, lower is better, equal is a tie; default the list order, no ties).
    A row that gives no comparison (all tied) or contradicts itself (one text at two ranks)
    raises ValueError; a missing key KeyError; a value of the wrong type TypeError."""
    if "responses" not in row:
        pair = [_check_text(row["chosen"], "'chosen'"), _check_text(row["rejected"], "'rejected'")]
        if pair[0] == pair[1]:
            raise ValueError("chosen and rejected are the same text")
        return pair, [0, 1]
    responses, ranks = row["responses"], row.get("ranks")
    if not isinstance(responses, list) or len(responses) < 2:
        raise ValueError(f"'responses' must be a list of at least 2 texts, got {responses!r:.60}")
    for i, text in enumerate(responses):
        _check_text(text, f"'responses'[{i}]")
    if ranks is None:
        ranks = list(range(len(responses)))
    if not isinstance(ranks, list) or len(ranks) != len(responses):
        raise ValueError(f"'ranks' must be a list of one rank per response ({len(responses)}), got {ranks!r:.60}")
    if not all(type(r) is int and r >= 0 for r in ranks):
        raise TypeError(f"'ranks' must be integers >= 0 (lower is better), got {ranks!r:.60}")
    if len(set(ranks)) == 1:
        raise ValueError(f"all {len(ranks)} responses are tied (ranks {ranks}): no comparison")
    rank_of_text: dict[str, int] = {}
    for text, rank in zip(responses, ranks):
        if rank_of_text.setdefault(text, rank) != rank:
            raise ValueError(f"the same response at ranks {rank_of_text[text]} and {rank}: {text!r:.40}")
    return responses, ranks


@dataclass(frozen=True)
class PreferenceSet:
    """Preferences as the reward model reads them, one ranking per prompt: the token ids of each
    exchange (prompt + response) and the responses' ranks (lower is better, equal is a tie). A
    pair is a ranking of two."""

    response_ids: list[list[list[int]]]
    ranks: list[list[int]]
    skipped: int

    def __len__(self) -> int:
        return len(self.ranks)

    def comparisons(self) -> int:
        """Comparable pairs of responses (different ranks) over all prompts."""
        return sum(a < b for ranks in self.ranks for a in ranks for b in ranks)

    def batch(self, rows: Iterable[int], pad_id: int) -> RankingBatch:
        rows = list(rows)
        return collate_rankings([self.response_ids[i] for i in rows], [self.ranks[i] for i in rows], pad_id)


def load_preferences(
    source: str, cfg: DataConfig, tokenizer, max_len: int, seed: int, split: str = "train"
) -> PreferenceSet:
    """Pairs (``prompt``/``chosen``/``rejected``) and rankings (``prompt``/``responses``, optional
    ``ranks``), as ``ranking_of`` reads them; a bad row (``ranking_of``'s errors) or a row with an
    exchange longer than ``max_len`` tokens is skipped or rejected."""
    key = "data.preferences" if split == "train" else "data.eval_preferences"
    rows, skipped = _rows(source, key, "preferences", cfg, seed, split)
    response_ids, ranks = [], []
    for row in rows:
        responses, row_ranks = ranking_of(row)
        ids = [tokenizer(conversation_text(tokenizer, row["prompt"], r, cfg.chat_template))["input_ids"]
               for r in responses]
        longest = max(len(x) for x in ids)
        if longest > max_len:
            skipped = _too_long(cfg, key, skipped, longest, max_len, row["prompt"])
            continue
        response_ids.append(ids)
        ranks.append(row_ranks)
    if not ranks:
        raise _nothing_usable(key, source, "rows", skipped)
    return PreferenceSet(response_ids, ranks, skipped)


def load_prompts(
    source: str, cfg: DataConfig, tokenizer, max_prompt_len: int, seed: int, split: str = "train"
) -> PromptSet:
    """Tokenize a prompt source (``data.prompts``, or ``data.eval_prompts`` for ``split="test"``);
    over-long prompts are skipped or rejected per ``data.on_bad_row``."""
    key = "data.prompts" if split == "train" else "data.eval_prompts"  # the caller passes the matching source
    if source.startswith("builtin:"):
        rows, skipped = builtin_prompt_rows(source, cfg.num_builtin_prompts, seed, split), 0
    else:
        rows, skipped = read_rows(Path(source).expanduser(), cfg.on_bad_row, key=key)
    texts, ids_list, metadata = [], [], []
    for row in rows:
        text = row["prompt"]
        ids = prompt_token_ids(tokenizer, text, cfg.chat_template)
        if len(ids) > max_prompt_len:
            if cfg.on_bad_row == "error":
                raise DataError(
                    f"{key}={source!r}: prompt of {len(ids)} tokens exceeds "
                    f"model.max_prompt_len={max_prompt_len}: {text[:60]!r}"
                )
            skipped += 1
            continue
        texts.append(text)
        ids_list.append(ids)
        metadata.append({k: v for k, v in row.items() if k != "prompt"})
    if not texts:
        raise _nothing_usable(key, source, "prompts", skipped)
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
            gen = torch.Generator().manual_seed(derive_seed(EPOCH_ORDER, self.seed, epoch))
            self._perms = {epoch: torch.randperm(self.n, generator=gen)}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        out = []
        for pos in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._perm(pos // self.n)[pos % self.n]))
        return out
