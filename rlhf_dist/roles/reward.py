"""Reward role: a weighted sum of a Python function, a learned reward model and a remote endpoint.

Each source is checked when the actor starts (the function's signature is bound,
the model is loaded), so a bad source fails before the first step. A score that
raises or is not finite is handled by ``reward.on_invalid``: ``error`` fails the
step naming the sample, ``drop`` returns NaN for it and the controller excludes it.
"""

from __future__ import annotations

import json
import math
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch

from rlhf_dist.config import RewardConfig
from rlhf_dist.registry import import_function, takes_metadata
from rlhf_dist.roles.spec import RankSpec


class RewardError(ValueError):
    """A reward source failed or returned a non-finite score; the message names the sample."""


def post_scores(cfg: RewardConfig, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
    """POST the batch to ``reward.http_url``; retries with back-off, then one clear error."""
    body = json.dumps({"prompts": prompts, "responses": responses, "metadata": metadata}).encode()
    last = ""
    for attempt in range(cfg.http_retries + 1):
        if attempt:
            time.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
        request = urllib.request.Request(cfg.http_url, body, {"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=cfg.http_timeout_s) as response:
                scores = json.loads(response.read())["scores"]
            if len(scores) != len(prompts):
                raise RewardError(f"reward.http_url={cfg.http_url!r}: {len(scores)} scores for {len(prompts)} samples")
            # null or a string is not a score: NaN, handled by reward.on_invalid like an infinite one
            return [float(s) if isinstance(s, (int, float)) else math.nan for s in scores]
        except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError, KeyError) as e:
            last = f"{type(e).__name__}: {e}"
    raise RewardError(f"reward.http_url={cfg.http_url!r}: failed after {cfg.http_retries + 1} attempts ({last})")


NORMALIZATION_FILE = "reward_normalization.json"


def read_normalization(model_path: str) -> tuple[float, float] | None:
    """(mean, std) saved next to a reward model by the reward-model stage, if any."""
    path = Path(model_path) / NORMALIZATION_FILE
    if not path.is_file():
        return None
    stats = json.loads(path.read_text())
    mean, std = float(stats["mean"]), float(stats["std"])
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"{path}: invalid normalisation mean={mean} std={std}")
    return mean, std


class RewardScorer:
    """Hosts the configured reward sources and returns one weighted score per sample."""

    def __init__(self, *, spec: RankSpec, cfg: RewardConfig, dtype: str, chat_template: bool) -> None:
        # The sources are the reward group's: its model is cfg.model_path (the same as spec.model_path),
        # named in errors by its key reward.model_path.
        self.cfg, self.chat_template = cfg, chat_template
        self.device = torch.device("cuda", 0) if spec.device == "cuda" else torch.device("cpu")
        if cfg.function_weight:
            self.fn = import_function(cfg.function)
            self.fn_takes_metadata = takes_metadata(self.fn, cfg.function)
        if cfg.model_weight:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from rlhf_dist.models.modeling import score_pad_id, torch_dtype

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                cfg.model_path, dtype=torch_dtype(dtype)
            ).to(self.device).eval().requires_grad_(False)
            # Padded here, not by the tokenizer, which may have no pad token or another one.
            self.pad_id = score_pad_id(self.model, cfg.model_path, f"reward.model_path={cfg.model_path!r}")
            # Scores are normalised with the statistics saved at training time (InstructGPT: the
            # reward of the demonstrations has mean 0), so one KL coefficient suits any reward model.
            self.normalization = read_normalization(cfg.model_path) if cfg.normalize else None

    def pid(self) -> int:
        return os.getpid()

    def score(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        """Weighted sum of the sources; NaN marks a dropped sample (reward.on_invalid=drop)."""
        cfg, total = self.cfg, [0.0] * len(prompts)
        if cfg.function_weight:
            scores = self._function_scores(prompts, responses, metadata)
            self._add(total, f"reward.function={cfg.function!r}", cfg.function_weight, scores, prompts)
        if cfg.model_weight:
            scores = self._model_scores(prompts, responses)
            self._add(total, f"reward.model_path={cfg.model_path!r}", cfg.model_weight, scores, prompts)
        if cfg.http_weight:
            scores = post_scores(cfg, prompts, responses, metadata)
            self._add(total, f"reward.http_url={cfg.http_url!r}", cfg.http_weight, scores, prompts)
        return total

    def _invalid(self, message: str) -> float:
        """A score that cannot be used: fail the step (reward.on_invalid=error) or mark it dropped."""
        if self.cfg.on_invalid == "error":
            raise RewardError(f"{message} (reward.on_invalid=drop skips such samples)")
        return math.nan

    def _add(self, total: list[float], source: str, weight: float, scores: list[float], prompts: list[str]) -> None:
        for i, s in enumerate(scores):
            if not math.isfinite(s):
                s = self._invalid(f"{source}: reward for sample {i} (prompt {prompts[i][:40]!r}) is {s}")
            total[i] += weight * s

    def _function_scores(self, prompts: list[str], responses: list[str], metadata: list[dict]) -> list[float]:
        scores, source = [], f"reward.function={self.cfg.function!r}"
        for i, (p, r, m) in enumerate(zip(prompts, responses, metadata)):
            sample = f"sample {i} (prompt {p[:40]!r})"
            try:
                value = self.fn(p, r, m) if self.fn_takes_metadata else self.fn(p, r)
            except Exception as e:  # noqa: BLE001 -- any error in user code is this sample's problem, not the actor's
                scores.append(self._invalid(f"{source} raised on {sample}: {e!r}"))
                continue
            try:
                scores.append(float(value))
            except (TypeError, ValueError):
                scores.append(self._invalid(f"{source} returned {value!r} on {sample}, not a number"))
        return scores

    @torch.no_grad()
    def _model_scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        from rlhf_dist.core.experience import pad_sequences
        from rlhf_dist.models.chat import conversation_text

        texts = [conversation_text(self.tokenizer, p, r, self.chat_template) for p, r in zip(prompts, responses)]
        scores: list[float] = []
        for i in range(0, len(texts), self.cfg.batch_size):
            rows = [self.tokenizer(text)["input_ids"] for text in texts[i : i + self.cfg.batch_size]]
            ids, mask = pad_sequences(rows, self.pad_id)  # right-padded
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            scores.extend(logits[:, 0].float().tolist())
        if self.normalization is not None:
            mean, std = self.normalization
            scores = [(s - mean) / std for s in scores]
        return scores
