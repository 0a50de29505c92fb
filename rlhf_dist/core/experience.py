"""Rollouts as padded tensors, and how they are split across actors.

Layout: prompts are left-padded to a common width ``P`` and responses are
right-padded to ``T``, so every response token sits in columns ``[P, P+T)``
and all per-token quantities are ``(B, T)`` tensors aligned with
``response_mask``. Position ids skip the left padding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from rlhf_dist.core.losses import comparable_pairs


class TensorRows:
    """Row selection and sharding for a dataclass of equal-length tensors (plus scalars)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def map_tensors(self, fn):
        """A copy with ``fn`` applied to every tensor field (e.g. a device move)."""
        fields = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            fields[f.name] = fn(value) if isinstance(value, torch.Tensor) else value
        return type(self)(**fields)

    def select(self, index: torch.Tensor | slice):
        """Rows ``index`` of every tensor field."""
        return self.map_tensors(lambda t: t[index])

    def sequence_lengths(self) -> list[int]:
        """Real tokens of each row (what a packed forward pass spends on it)."""
        raise NotImplementedError

    def split(self, parts: int) -> list:
        """``parts`` contiguous shards whose sizes differ by at most one (rank order)."""
        bounds = split_sizes(len(self), parts)
        shards, start = [], 0
        for size in bounds:
            shards.append(self.select(slice(start, start + size)))
            start += size
        return shards


@dataclass
class Experience(TensorRows):
    """One rollout batch. Per-token fields are ``(B, T)`` over response positions."""

    input_ids: torch.Tensor  # (B, P+T) long
    attention_mask: torch.Tensor  # (B, P+T) long
    position_ids: torch.Tensor  # (B, P+T) long
    response_mask: torch.Tensor  # (B, T) float, 1 on generated tokens
    prompt_width: int  # P
    old_logprobs: torch.Tensor | None = None  # (B, T) policy logprobs before the update
    ref_logprobs: torch.Tensor | None = None  # (B, T) reference-policy logprobs
    old_values: torch.Tensor | None = None  # (B, T) critic values before the update
    advantages: torch.Tensor | None = None  # (B, T)
    returns: torch.Tensor | None = None  # (B, T)
    rollout_weights: torch.Tensor | None = None  # (B, T) float off-policy correction (algorithms.rollout_correction)
    row_index: torch.Tensor | None = None  # (B,) long: each row's place in its batch (a one-step update, PolicyTrainer.train)
    # (B, P+T, layers, k) int16: the experts the engine routed each token to, -1 where not recorded
    # (padding, a response's last token): a mixture-of-experts policy's forward uses them (algo.routing_replay)
    routing: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def sequence_lengths(self) -> list[int]:
        return self.attention_mask.sum(dim=1).tolist()

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, T) generated token ids (pad on the right)."""
        return self.input_ids[:, self.prompt_width :]

    def with_fields(self, **tensors: torch.Tensor) -> Experience:
        return dataclasses.replace(self, **tensors)


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous chunks of ``n`` items, the first ones larger by one."""
    if parts <= 0:
        raise ValueError(f"parts must be > 0, got {parts}")
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def minibatch_rows(num_rows: int, minibatch_size: int, world_size: int, rank: int,
                   generator: torch.Generator) -> list[torch.Tensor]:
    """Rank ``rank``'s rows of each minibatch of an epoch over a batch of ``num_rows`` rows.

    The whole batch is permuted (``generator``, the same on every rank) and cut into minibatches
    of ``minibatch_size`` rows; each minibatch is dealt across the ranks row by row (rank r takes
    its rows r, r + world_size, ...). Which rows make up each minibatch depends on the
    permutation alone, not on the world size: a run resumed on another number of ranks takes the
    same optimizer steps (``DeepSpeedRank.accumulate`` makes each one the gradient of its whole
    minibatch, however it is cut)."""
    order = torch.randperm(num_rows, generator=generator)
    return [order[i : i + minibatch_size][rank::world_size] for i in range(0, num_rows, minibatch_size)]


def collate(
    prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int,
    action_masks: list[list[int] | None] | None = None,
) -> Experience:
    """Pad prompts on the left and responses on the right into one ``Experience``.

    An empty response (the engine stopped at once) keeps one pad token so that every
    row has a valid position; its mask is set to 1 there so the row still carries
    the sequence reward. (``algorithms.token_rewards`` and the ``seq_mean_*`` loss
    aggregations refuse a row with no valid position, naming it.)

    ``action_masks`` (multi-turn samples; None or a None row: every token is the model's) puts
    0 in ``response_mask`` on a response's environment tokens: they stay in the sequence (and in
    the attention mask) as context, but carry no loss, KL, entropy or advantage.
    """
    if len(prompt_ids) != len(response_ids) or not prompt_ids:
        raise ValueError(f"need equal, non-zero numbers of prompts and responses: {len(prompt_ids)} vs {len(response_ids)}")
    width = max(len(p) for p in prompt_ids)
    resp_width = max(max(len(r) for r in response_ids), 1)
    batch = len(prompt_ids)
    input_ids = torch.full((batch, width + resp_width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    response_mask = torch.zeros(batch, resp_width)
    for i, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        response = response or [pad_id]
        input_ids[i, width - len(prompt) : width] = torch.tensor(prompt)
        input_ids[i, width : width + len(response)] = torch.tensor(response)
        attention[i, width - len(prompt) : width + len(response)] = 1
        response_mask[i, : len(response)] = 1
        if action_masks is not None and action_masks[i] is not None and response_ids[i]:
            if len(action_masks[i]) != len(response):
                raise ValueError(f"row {i}: action mask of {len(action_masks[i])} for a response of {len(response)} tokens")
            response_mask[i, : len(response)] = torch.tensor(action_masks[i], dtype=response_mask.dtype)
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return Experience(input_ids, attention, position_ids, response_mask, width)


def routing_grid(exp: Experience, routes: list[torch.Tensor | None]) -> torch.Tensor:
    """The engine's routing of each row's sequence, ``routes[i]`` (positions, layers, k) expert ids
    from the prompt's first token on (None: not recorded), laid out like ``exp`` (``collate``:
    prompts left-padded to ``prompt_width``): (B, P+T, layers, k) int16, -1 where nothing was recorded."""
    if len(routes) != len(exp):
        raise ValueError(f"routing of {len(routes)} sequences for {len(exp)} rows")
    recorded = [r for r in routes if r is not None]
    if not recorded:
        raise ValueError("no routing recorded for any row")
    layers, k = recorded[0].shape[1:]
    out = torch.full((*exp.input_ids.shape, layers, k), -1, dtype=torch.int16)
    starts = exp.prompt_width - exp.attention_mask[:, : exp.prompt_width].sum(dim=1)
    for i, (route, start) in enumerate(zip(routes, starts.tolist())):
        if route is None:
            continue
        if route.shape[1:] != (layers, k):
            raise ValueError(f"row {i}: routing of shape {tuple(route.shape)}, the others' (n, {layers}, {k})")
        length = min(len(route), out.shape[1] - start)
        out[i, start : start + length] = route[:length]
    return out


NO_RESPONSE = -1  # the rank of an empty slot of a RankingBatch (a prompt with fewer than K responses)


@dataclass
class RankingBatch(TensorRows):
    """Reward-model rankings, one batch element per prompt: the token ids of its K exchanges (prompt +
    response, right-padded) and their ranks (lower is better, equal ranks a tie). A preference pair
    is a ranking of two, ranks [0, 1]. A prompt with fewer than K responses has ``NO_RESPONSE``
    in the empty slots (all-pad rows, never run through the model)."""

    input_ids: torch.Tensor  # (B, K, L) long
    attention_mask: torch.Tensor  # (B, K, L) long
    ranks: torch.Tensor  # (B, K) long

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def sequence_lengths(self) -> list[int]:
        return self.attention_mask.sum(dim=(1, 2)).tolist()

    def comparisons(self) -> int:
        """Comparable pairs of responses (of one prompt, with different ranks) in the batch."""
        return int(comparable_pairs(self.ranks).sum())


def pad_sequences(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), each (B, max length), of token rows padded on the right."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def collate_rankings(responses: list[list[list[int]]], ranks: list[list[int]], pad_id: int) -> RankingBatch:
    """A ``RankingBatch`` of each prompt's exchanges (token ids) and their ranks; prompts with fewer
    responses than the most get empty slots."""
    if len(responses) != len(ranks) or not responses:
        raise ValueError(f"need equal, non-zero numbers of rankings and rank lists: {len(responses)} vs {len(ranks)}")
    k = max(len(r) for r in responses)
    width = max(len(seq) for r in responses for seq in r)
    input_ids = torch.full((len(responses), k, width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    rank_t = torch.full((len(responses), k), NO_RESPONSE, dtype=torch.long)
    for b, (seqs, row_ranks) in enumerate(zip(responses, ranks)):
        if len(seqs) != len(row_ranks) or any(r < 0 for r in row_ranks):
            raise ValueError(f"ranking {b}: {len(seqs)} responses with ranks {row_ranks} (one rank >= 0 each)")
        for i, seq in enumerate(seqs):
            input_ids[b, i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[b, i, : len(seq)] = 1
        rank_t[b, : len(seqs)] = torch.tensor(row_ranks, dtype=torch.long)
    return RankingBatch(input_ids, attention, rank_t)


def pad_right(rows: list[list[float]], width: int, value: float = 0.0) -> torch.Tensor:
    """(B, width) float tensor of ragged rows padded on the right."""
    out = torch.full((len(rows), width), value)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=out.dtype)
    return out


def concat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate per-shard results (in shard order) back into one batch."""
    return torch.cat(tensors, dim=0)
