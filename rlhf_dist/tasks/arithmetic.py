"""A verifiable task, "arithmetic": two-operand sums and differences with an exact-match reward.

Pure Python (no torch), like `reviews/`. A problem is "a op b" with operands 0..MAX_OPERAND,
op in {+, -} and a non-negative result, so every answer is a canonical decimal string
(no sign, no leading zeros). Prompts read "12 + 7 =" and the expected response " 19".

The problem space (50 * 50 sums + 1275 differences = 3775 problems) is split by a hash
of the problem text (`base.split_problems`), so "train" and "test" are disjoint and a problem's split never depends
on seeds or sample counts: held-out accuracy is measured on problems the pretraining corpus
never contained. (Commuted sums, "7 + 12" vs "12 + 7", are distinct problems and may fall
in different splits.)
"""

from __future__ import annotations

import random
import re

from rlhf_dist.tasks.base import Recipe, Task, draw, split_problems

MAX_OPERAND = 49
# Share of corpus lines whose answer is off by 1 to 3. At 0.25 the tiny policy samples (T=1)
# the right answer for ~22% of held-out problems; at 0.4 it was ~18%.
WRONG_FRACTION = 0.25


def _solve(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b


def _problem_space(split: str) -> list[tuple[int, str, int]]:
    space = [
        (a, op, b)
        for a in range(MAX_OPERAND + 1)
        for op in ("+", "-")
        for b in range(MAX_OPERAND + 1)
        if _solve(a, op, b) >= 0
    ]
    return split_problems(space, split, lambda p: f"{p[0]} {p[1]} {p[2]}")


def make_problems(num: int, seed: int, split: str) -> list[dict[str, str]]:
    """`num` rows {"prompt": "12 + 7 =", "answer": "19"} from the `split` ("train" or "test")
    half of the problem space; distinct until the split is exhausted. Deterministic given seed."""
    rng = random.Random(seed)
    return [
        {"prompt": f"{a} {op} {b} =", "answer": str(_solve(a, op, b))}
        for a, op, b in draw(num, rng, _problem_space(split))
    ]


def make_corpus(num_lines: int, seed: int, wrong_fraction: float = WRONG_FRACTION) -> list[str]:
    """Pretraining lines "12 + 7 = 19" over TRAIN problems only. Exactly
    round(num_lines * wrong_fraction) lines carry a wrong answer, off by 1 to 3 (kept
    non-negative), so a model fitted to the corpus is right only part of the time and an
    exact-match reward has room to improve it. Shuffled; deterministic given seed."""
    if not 0.0 <= wrong_fraction <= 1.0:
        raise ValueError(f"wrong_fraction={wrong_fraction}: use a value in [0, 1]")
    rng = random.Random(seed)
    num_wrong = round(num_lines * wrong_fraction)
    lines = []
    for i, (a, op, b) in enumerate(draw(num_lines, rng, _problem_space("train"))):
        answer = _solve(a, op, b)
        if i < num_wrong:
            offset = rng.choice((1, 2, 3))
            # Subtracting would go below 0 only when answer < offset; add instead, so the
            # answer stays a valid (non-negative) but wrong one.
            answer += offset if answer < offset or rng.random() < 0.5 else -offset
        lines.append(f"{a} {op} {b} = {answer}")
    rng.shuffle(lines)
    return lines


_LEADING_NUMBER_RE = re.compile(r"\s*([0-9]+)")


def parse_answer(response: str) -> str | None:
    """The number a response answers with: after leading whitespace, the run of ASCII digits
    it starts with, up to the first non-digit ("</s>", newline, space, "+", ...); None if the
    response does not start with a digit. " 19</s>" -> "19", "19 + 2" -> "19", "-3" -> None
    (no answer is negative, so a sign is never right), "x 19" -> None (the answer must come first).
    The digits are kept as written: "019" stays "019"."""
    match = _LEADING_NUMBER_RE.match(response)
    return match.group(1) if match else None


def exact_match_reward(prompt: str, response: str, metadata: dict[str, str]) -> float:
    """1.0 if `parse_answer(response)` equals metadata["answer"] as a string, else 0.0.

    String equality makes the canonical form part of the task: "019" does not match "19",
    just as the corpus never writes leading zeros. Text after the number is ignored.
    """
    del prompt  # part of the reward-function interface; the answer comes from metadata
    answer = metadata["answer"]
    if not isinstance(answer, str):
        raise TypeError(f"metadata['answer']={answer!r}: pass the answer as a decimal string, e.g. '19'")
    return 1.0 if parse_answer(response) == answer else 0.0


# The tiny policy: the reviews shape, smaller (hidden 64), with one token per digit, pretrained for
# ~25 s on make_corpus (a quarter of its answers wrong): it samples the right answer to roughly a
# fifth of held-out problems, room for the exact-match reward to act on. Smaller than the reviews
# recipe so that 4x its steps fit in ~25 s on one thread; at hidden 128 that time bought half the
# steps and held-out accuracy stayed near 10%.
RECIPE = Recipe(
    name="tiny-arith-v1", corpus_lines=20000, hidden_size=64, intermediate_size=128,
    split_digits=True, pretrain_steps=1200, batch_size=64, learning_rate=3e-3,
)  # fmt: skip

TASK = Task(name="arithmetic", model="tiny-arith", recipe=RECIPE, prompts=make_problems, corpus=make_corpus)
