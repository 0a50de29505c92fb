"""Reference role: the frozen initial policy, serving the logprobs of the KL penalty."""

from __future__ import annotations

import os

import torch

from rlhf_dist.core.experience import Experience
from rlhf_dist.models.modeling import in_chunks, load_causal_lm, response_logprobs
from rlhf_dist.roles.spec import RankSpec


class ReferenceModel:
    """A plain transformers model in eval mode; never updated."""

    def __init__(
        self, *, spec: RankSpec, dtype: str, batch_size: int, temperature: float, packing: bool, chunk_tokens: int
    ) -> None:
        self.device = torch.device("cuda", 0) if spec.device == "cuda" else torch.device("cpu")
        self.model = load_causal_lm(spec.model_path, dtype).to(self.device).eval().requires_grad_(False)
        self.batch_size, self.temperature = batch_size, temperature
        self.packing, self.chunk_tokens = packing, chunk_tokens

    def pid(self) -> int:
        return os.getpid()

    @torch.no_grad()
    def logprobs(self, exp: Experience) -> torch.Tensor:
        """(b, T) reference logprobs of the response tokens."""
        exp = exp.map_tensors(lambda t: t.to(self.device))
        return in_chunks(
            lambda e: response_logprobs(self.model, e, self.temperature, packed=self.packing,
                                        chunk_tokens=self.chunk_tokens)[0],
            exp, self.batch_size,
        ).cpu()
