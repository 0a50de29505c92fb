"""Every seed a run derives from its ``seed``, in one place.

A stream mixes the run seed and its coordinates (step, epoch, rank, ...) linearly:

    derived = (m0 * seed + m1 * c1 + m2 * c2 + ...) % modulus     (no modulus: not reduced)

The multipliers are the odd primes the code has always used. They are data, not tuning:
changing one changes which prompts, engine samples and minibatch orders a run sees, so a run
resumed from a checkpoint written before the change would no longer follow the original run
(and the reliability tests, which compare runs exactly, would fail). Keep them as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

SPLITS = ("train", "test")  # a split's coordinate is its index here


@dataclass(frozen=True)
class SeedStream:
    """One family of derived seeds: what its coordinates are, their multipliers, the modulus."""

    coordinates: tuple[str, ...]  # names of the coordinates after the run seed
    multipliers: tuple[int, ...]  # one for the run seed, then one per coordinate
    modulus: int | None = None  # what the consumer accepts (vLLM: < 2**31; torch: < 2**64)


# (seed, step, sample index): the vLLM seed of each sample, whatever the engine count.
ENGINE_SAMPLE = SeedStream(("step", "index"), (1_000_003, 65_537, 1), 2**31)
# (sample seed, turn): the vLLM seed of each turn of a multi-turn sample (rollout.env); turn 0 is the sample's.
ENGINE_TURN = SeedStream(("turn",), (1, 7919), 2**31)
# (seed, step, round): the prompts of a dynamic-sampling refill round (rollout.dynamic_sampling).
REFILL_PROMPTS = SeedStream(("step", "round"), (7919, 104_729, 1))
# (seed, optimizer steps so far, epoch): the trainer's order of a batch's rows in an epoch, the same on
# every rank and for every world size (``core.experience.minibatch_rows``).
MINIBATCH_ORDER = SeedStream(("optimizer_step", "epoch"), (1_000_003, 7919, 1009), 2**63)
# (seed, epoch): the permutation of rows in an epoch (the RL prompt sampler, SFT, reward model).
EPOCH_ORDER = SeedStream(("epoch",), (7919, 1))
# (seed, split): the builtin:reviews prompt set of a split.
REVIEW_PROMPTS = SeedStream(("split",), (1, 1_000_003))
# (seed, split, draw): the embedded InstructGPT task's random draws (tasks/reviews/feedback.py); each draw
# (demonstrations, their prompts, preference pairs, their prompts) has its own number.
FEEDBACK = SeedStream(("split", "draw"), (7919, 1_000_003, 1))
# (seed, round, draw): an iterated pipeline round's labelling (rlhf_dist/label.py): draw 0 its prompts,
# 1 the labeller's noise, 2 + i the engine seeds of prompt i's samples (then + j, modulus 2**31).
LABEL_ROUND = SeedStream(("round", "draw"), (7919, 104_729, 1_000_003), 2**31)


def derive_seed(stream: SeedStream, seed: int, *coordinates: int) -> int:
    """The seed of ``stream`` at ``coordinates`` (in the order of ``stream.coordinates``)."""
    if len(coordinates) != len(stream.coordinates):
        raise TypeError(f"this seed stream takes {stream.coordinates}, got {coordinates}")
    key = sum(m * v for m, v in zip(stream.multipliers, (seed, *coordinates)))
    return key if stream.modulus is None else key % stream.modulus


def split_index(split: str) -> int:
    """A split's coordinate in a seed stream: 0 for "train", 1 for "test"."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    return SPLITS.index(split)
