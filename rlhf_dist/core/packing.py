"""Token layouts of the trainer's forward passes: padded or packed rows, and token-budget micro-batches.

A rollout ``Experience`` is stored padded (prompts left-padded to ``P``, responses right-padded
to ``T``). A forward pass does not have to run on that grid: ``token_layout`` lays the rows out
either padded, as stored, or packed: the rows' real tokens concatenated into few rows, the
position ids restarting at 0 at each sequence. Transformers tells packed sequences apart by exactly
that restart when no attention mask is given (``masking_utils.find_packed_sequence_indices``: a
block-diagonal causal mask for SDPA and eager attention, variable-length kernels for flash
attention), so no token attends across a sequence boundary and no compute is spent on padding.

Either way the layout records, for every response token, the flat index of the position whose
output predicts it (``source``) and its ``(row, column)`` in the ``(B, T)`` grid, so per-token
outputs computed on the layout go back to the stored grid with ``scatter``. Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenLayout:
    """Model inputs for some rows of an Experience, and where their response tokens sit.

    input_ids, position_ids: (R, L); attention_mask: (R, L), or None for packed rows (several
    sequences per row, told apart by position ids restarting at 0). source, rows, cols, labels: (M,)
    over the M real response tokens: the flat index into R * L of the position predicting each
    token, its (row, column) in the (B, T) response grid, and its token id. tokens: (N,) over the N
    real tokens of the stored rows, prompts included, in their order (``attention_mask.nonzero()``):
    the flat index into R * L where each is (what a per-token input, such as recorded routing, is
    laid out by; every other position is padding or a packed row's dummy sequence)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    source: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor
    grid: tuple[int, int]  # (B, T)
    tokens: torch.Tensor

    def scatter(self, values: torch.Tensor) -> torch.Tensor:
        """(M,) per-token values -> (B, T), zero where no real response token is."""
        out = values.new_zeros(self.grid)
        out[self.rows, self.cols] = values
        return out


def token_layout(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, prompt_width: int,
    packed: bool,
) -> TokenLayout:
    """The padded or packed layout of rows stored as ``collate`` writes them: (B, P + T) ids,
    attention mask and position ids (0 at each row's first real token), prompts in columns
    [0, P), responses in [P, P + T). A response token is real where the attention mask is 1.

    Packed: the sequences go into rows by first-fit decreasing, each row at most as long as the
    longest sequence, and the end of a row is filled with a dummy sequence (token 0, positions from
    0) whose outputs are never read. So a packed micro-batch never has more rows, or longer ones,
    than the padded one: with an attention kernel that masks rather than skips (SDPA and eager on
    CPU) it costs at most what padding costs, and mixed lengths fill far fewer rows."""
    # Response token (b, t) is column P + t; the output at position j predicts token j + 1, so its
    # source is the position just before it: column P + t - 1 of row b, wherever the layout put it.
    batch, width = input_ids.shape
    real = attention_mask.bool()
    rows, cols = real[:, prompt_width:].nonzero(as_tuple=True)
    labels = input_ids[rows, cols + prompt_width]
    grid = (batch, width - prompt_width)
    token_rows, token_cols = real.nonzero(as_tuple=True)
    if not packed:
        source = rows * width + cols + prompt_width - 1
        return TokenLayout(input_ids, position_ids, attention_mask, source, rows, cols, labels, grid,
                           token_rows * width + token_cols)
    ids, positions, start = pack_rows(input_ids, real, position_ids)
    source = start[rows] + cols + prompt_width - 1
    return TokenLayout(ids, positions, None, source, rows, cols, labels, grid, start[token_rows] + token_cols)


def pack_rows(
    input_ids: torch.Tensor, real: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, position ids, start) of rows whose real tokens (``real``, each row's contiguous)
    are packed as ``token_layout`` describes; ``start[i]`` is the flat packed index that column 0
    of stored row i maps to, so column c of row i lands at ``start[i] + c`` (for real columns)."""
    lengths = real.sum(dim=1).tolist()
    first = real.long().argmax(dim=1).tolist()  # column of each row's first real token (after left padding)
    packs = budget_micro_batches(lengths, max(lengths))
    packed_width = max(sum(lengths[i] for i in pack) for pack in packs)
    device = input_ids.device  # the layout goes where the inputs are: a CUDA pass must get CUDA ids
    ids = torch.zeros(len(packs), packed_width, dtype=input_ids.dtype, device=device)
    positions = torch.zeros_like(ids, dtype=position_ids.dtype)
    start = [0] * len(lengths)
    for r, pack in enumerate(packs):
        offset = 0
        for i in pack:
            n, keep = lengths[i], real[i]
            ids[r, offset : offset + n] = input_ids[i, keep]
            positions[r, offset : offset + n] = position_ids[i, keep]
            start[i] = r * packed_width + offset - first[i]
            offset += n
        positions[r, offset:] = torch.arange(packed_width - offset, device=device)  # the dummy sequence at the row's end
    return ids, positions, torch.tensor(start, dtype=torch.long, device=device)


@dataclass
class ScoreLayout:
    """Model inputs for right-padded sequences scored at one position each (a reward model):
    input_ids, position_ids (R, L), attention_mask (R, L) or None when packed, and source (B,):
    the flat index into R * L of each sequence's score position."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    source: torch.Tensor


def score_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int, packed: bool) -> ScoreLayout:
    """The padded or packed layout of right-padded (B, L) rows, each scored at its last real token
    that is not ``pad_id`` (where transformers' sequence classifiers read their score)."""
    batch, width = input_ids.shape
    real = attention_mask.bool()
    columns = torch.arange(width, device=input_ids.device).expand(batch, width)
    last = (columns * (real & (input_ids != pad_id))).argmax(dim=1)  # (B,)
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    if not packed:
        return ScoreLayout(input_ids, positions, attention_mask, torch.arange(batch, device=input_ids.device) * width + last)
    ids, packed_positions, start = pack_rows(input_ids, real, positions)
    return ScoreLayout(ids, packed_positions, None, start + last)


def budget_micro_batches(lengths: list[int], budget: int, count: int | None = None) -> list[list[int]]:
    """Row indices of micro-batches that each hold at most ``budget`` tokens (sum of ``lengths``),
    a row alone in its micro-batch when it is longer than the budget.

    First-fit decreasing: rows from the longest, each into the first micro-batch it fits. With
    ``count`` (at least the number that needs), micro-batches are then split, the one with the
    most rows in halves, until there are ``count`` of them (so data-parallel ranks can run the
    same number of forward passes); when every one holds a single row, empty ones are added.
    Each micro-batch lists its rows in ascending order; deterministic for equal inputs."""
    if budget <= 0:
        raise ValueError(f"budget_micro_batches: budget must be > 0 tokens, got {budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in order:
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    if count is not None:
        if count < len(bins):
            raise ValueError(f"budget_micro_batches: count={count} is below the {len(bins)} micro-batches needed")
        while len(bins) < count:
            largest = max(range(len(bins)), key=lambda b: (len(bins[b]), -b))
            rows = bins[largest]
            if len(rows) < 2:
                bins.append([])
                continue
            half = len(rows) // 2
            bins[largest], extra = rows[:half], rows[half:]
            bins.append(extra)
    return [sorted(b) for b in bins]
