"""Reward role: scores (prompt, response) pairs with a rule function or a learned reward model."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import torch

from rlhf_dist.config import RewardConfig


def import_function(path: str) -> Callable[..., float]:
    """Resolve ``"package.module:function"`` (or ``"package.module.function"``)."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"reward.function={path!r}: cannot import it ({e})") from e
    if not callable(fn):
        raise ValueError(f"reward.function={path!r}: {type(fn).__name__} is not callable")
    return fn


class RewardScorer:
    """Hosts either a Python reward function or an ``AutoModelForSequenceClassification``."""

    def __init__(self, cfg: RewardConfig, dtype: str, device: str) -> None:
        self.cfg = cfg
        self.device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        if cfg.kind == "function":
            self.fn = import_function(cfg.function)
        else:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            from rlhf_dist.modeling import torch_dtype

            self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path)
            self.tokenizer.padding_side = "right"
            self.model = AutoModelForSequenceClassification.from_pretrained(
                cfg.model_path, dtype=torch_dtype(dtype)
            ).to(self.device).eval().requires_grad_(False)
            if self.model.config.pad_token_id is None:
                raise ValueError(f"reward.model_path={cfg.model_path!r}: the model config has no pad_token_id")

    def ready(self) -> bool:
        return True

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if self.cfg.kind == "function":
            return [float(self.fn(p, r)) for p, r in zip(prompts, responses)]
        return self._model_scores([p + r for p, r in zip(prompts, responses)])

    @torch.no_grad()
    def _model_scores(self, texts: list[str]) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(texts), self.cfg.batch_size):
            enc = self.tokenizer(texts[i : i + self.cfg.batch_size], return_tensors="pt", padding=True).to(self.device)
            scores.extend(self.model(**enc).logits[:, 0].float().tolist())
        return scores
