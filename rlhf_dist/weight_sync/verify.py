"""The check that every engine serves the trainer's policy after a sync: fixed probe sequences,
scored by every engine and by the trainer, and the worst gap between them
(``rlhf_dist.roles.groups.WeightSync.verify``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PROBE_LENGTH = 24  # tokens per probe sequence


def probe_sequences(vocab_size: int, count: int, seed: int, length: int = PROBE_LENGTH) -> list[list[int]]:
    """``count`` fixed sequences of token ids drawn uniformly from ``[0, vocab_size)``: a probe
    that touches the embedding rows and output logits of many tokens, whatever the task."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count, length), generator=generator).tolist()


@dataclass(frozen=True)
class ProbeGap:
    """The worst (engine, probe sequence) pair: mean |engine - trainer| logprob over its tokens."""

    engine: int
    sequence: int
    gap: float


def worst_probe_gap(engine_logprobs: list[list[list[float]]], trainer_logprobs: torch.Tensor) -> ProbeGap:
    """``engine_logprobs[e][s]``: engine ``e``'s logprobs of tokens 1.. of probe sequence ``s``;
    ``trainer_logprobs``: (S, T) the trainer's of the same tokens (T >= every sequence's length)."""
    worst = ProbeGap(-1, -1, -1.0)
    for e, per_sequence in enumerate(engine_logprobs):
        for s, lps in enumerate(per_sequence):
            gap = float((torch.tensor(lps, dtype=torch.float64) - trainer_logprobs[s, : len(lps)].double()).abs().mean())
            if math.isnan(gap):  # worse than any number
                return ProbeGap(e, s, gap)
            if gap > worst.gap:
                worst = ProbeGap(e, s, gap)
    return worst
