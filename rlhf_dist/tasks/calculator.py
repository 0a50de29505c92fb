"""An agentic task, "calculator": two-digit products, with a tool that computes them exactly.

Pure Python (no torch), like `arithmetic.py`. A problem is "a * b" with a and b in
MIN_OPERAND..MAX_OPERAND; prompts read "37 * 41 =". The policy may answer at once (" 1517") or
call the tool first, one line per episode:

    37 * 41 = <calc>37 * 41</calc><result>1517</result> 1517
              \\_ model turn 1 _/\\_ observation _/\\_ turn 2

`CalculatorEnv` runs the call and returns the observation; the episode's reward is the exact
match of the final answer. The tiny policy pretrained on `make_corpus` cannot multiply two
two-digit numbers (products up to 9801 are far past what 2 layers learn in seconds), so its
direct answers are mostly wrong, while a tool call only asks it to copy: the expression from the
prompt, then the result. Only TOOL_FRACTION of the corpus shows the tool, so the policy calls it
on a minority of samples and greedy decoding answers directly: RL has to learn to call it.

The problem space (90 * 90 = 8100 products) is split by a hash of the problem text, as in
`arithmetic.py`, so held-out accuracy is measured on problems the corpus never contained.
("37 * 41" and "41 * 37" are distinct problems and may fall in different splits.)
"""

from __future__ import annotations

import random
import re

from rlhf_dist.tasks.arithmetic import parse_answer
from rlhf_dist.tasks.base import Environment, Recipe, Task, draw, split_problems

MIN_OPERAND = 10
MAX_OPERAND = 99
# Share of corpus lines that call the tool. The choice "tool or answer" is made at one token
# (see make_corpus), where the model learns P(tool) ~ TOOL_FRACTION for every problem: sampled,
# it calls the tool about that often; greedy, it does so only where it is unsure of the
# product's first digit. See RECIPE for the figures this gives.
TOOL_FRACTION = 0.3
TOOL_OPEN, TOOL_CLOSE = "<calc>", "</calc>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
TOOL_TOKENS = (TOOL_OPEN, TOOL_CLOSE, RESULT_OPEN, RESULT_CLOSE)  # atomic, non-special tokens of the policy
ERROR = "error"  # the tool's result for an expression it does not evaluate
MAX_DIGITS = 12  # per operand; a longer number is an error, so no call does unbounded work


def _problem_space(split: str) -> list[tuple[int, int]]:
    operands = range(MIN_OPERAND, MAX_OPERAND + 1)
    return split_problems([(a, b) for a in operands for b in operands], split, lambda p: f"{p[0]} * {p[1]}")


def make_problems(num: int, seed: int, split: str) -> list[dict[str, str]]:
    """`num` rows {"prompt": "37 * 41 =", "answer": "1517"} from the `split` ("train" or "test")
    part of the problem space; distinct until the split is exhausted. Deterministic given seed."""
    rng = random.Random(seed)
    return [{"prompt": f"{a} * {b} =", "answer": str(a * b)} for a, b in draw(num, rng, _problem_space(split))]


def make_corpus(num_lines: int, seed: int, tool_fraction: float = TOOL_FRACTION) -> list[str]:
    """Pretraining lines over TRAIN problems only. Exactly round(num_lines * tool_fraction) lines
    call the tool, "37 * 41 = <calc>37 * 41</calc><result>1517</result> 1517"; the others answer
    directly, "37 * 41 = 1517". Every answer is the true product. Shuffled; deterministic given seed.

    Both kinds continue the prompt "37 * 41 =" with a space, its own token since the tags are
    atomic tokens, so the choice is made at the one token after it: TOOL_OPEN or the first digit.
    The observation follows TOOL_CLOSE with no space, so RESULT_OPEN... tokenises the same alone
    (as the engine appends it) as inside the line."""
    if not 0.0 <= tool_fraction <= 1.0:
        raise ValueError(f"tool_fraction={tool_fraction}: use a value in [0, 1]")
    rng = random.Random(seed)
    num_tool = round(num_lines * tool_fraction)
    lines = []
    for i, (a, b) in enumerate(draw(num_lines, rng, _problem_space("train"))):
        call = f"{TOOL_OPEN}{a} * {b}{TOOL_CLOSE}{RESULT_OPEN}{a * b}{RESULT_CLOSE} " if i < num_tool else ""
        lines.append(f"{a} * {b} = {call}{a * b}")
    rng.shuffle(lines)
    return lines


# A call is the turn's last "<calc>...</calc>"; its expression is the text after the last TOOL_OPEN.
_CALL_RE = re.compile(
    rf"{re.escape(TOOL_OPEN)}((?:(?!{re.escape(TOOL_OPEN)}).)*){re.escape(TOOL_CLOSE)}\s*\Z", re.DOTALL
)
_EXPR_RE = re.compile(rf"\s*([0-9]{{1,{MAX_DIGITS}}})\s*([-+*])\s*([0-9]{{1,{MAX_DIGITS}}})\s*")


def evaluate(expression: str) -> str:
    """The tool: "37 * 41" -> "1517". Only "int op int" with op in + - * (ASCII digits, at most
    MAX_DIGITS each, any spacing) is evaluated; anything else -> ERROR. Never calls eval()."""
    match = _EXPR_RE.fullmatch(expression)
    if not match:
        return ERROR
    a, op, b = int(match.group(1)), match.group(2), int(match.group(3))
    return str(a + b if op == "+" else a - b if op == "-" else a * b)


class CalculatorEnv(Environment):
    """One episode of the calculator task: up to `max_calls` tool calls, then a final answer.

    A turn that ends with "<calc>EXPR</calc>" (trailing whitespace allowed) is a call: the
    observation is "<result>VALUE</result>" (VALUE = `evaluate(EXPR)`), reward 0, and the episode
    goes on. A call beyond `max_calls` ends it, truncated, with reward 0. Any other turn is the
    final answer: reward 1.0 if its leading number (`arithmetic.parse_answer`) equals
    metadata["answer"], else 0.0, and the episode terminates.
    """

    stop = (TOOL_CLOSE,)

    def __init__(self, prompt: str, metadata: dict[str, str], max_calls: int = 2) -> None:
        del prompt  # the answer comes from metadata
        if max_calls < 0:
            raise ValueError(f"max_calls={max_calls}: use a count >= 0")
        self.answer = _answer_of(metadata)
        self.max_calls = max_calls
        self.calls = 0

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        call = _CALL_RE.search(action)
        if call is None:
            return "", 1.0 if parse_answer(action) == self.answer else 0.0, True, False, {}
        if self.calls == self.max_calls:
            return "", 0.0, False, True, {"tool_call": False}  # refused, not run
        self.calls += 1
        return f"{RESULT_OPEN}{evaluate(call.group(1))}{RESULT_CLOSE}", 0.0, False, False, {"tool_call": True}


def answer_reward(prompt: str, response: str, metadata: dict[str, str]) -> float:
    """The episode's check as a reward function of the whole response (model turns and
    observations): 1.0 if the number after the last RESULT_CLOSE, or the response's leading
    number if it has none, equals metadata["answer"] as a string (`arithmetic.parse_answer`)."""
    del prompt  # part of the reward-function interface; the answer comes from metadata
    final = response.rpartition(RESULT_CLOSE)[2]
    return 1.0 if parse_answer(final) == _answer_of(metadata) else 0.0


def _answer_of(metadata: dict[str, str]) -> str:
    answer = metadata["answer"]
    if not isinstance(answer, str):
        raise TypeError(f"metadata['answer']={answer!r}: pass the answer as a decimal string, e.g. '1517'")
    return answer


# The tiny policy: the arithmetic shape, 800 steps (~38 s), with the tool tags as atomic tokens.
# Measured with scripts/check_calculator_model.py on 200 test problems: greedy accuracy 0.05 (tool
# on 11 %), tool on 26 % of T=1 samples, and with the tool forced the final answer copies the result
# on 82 %: it answers greedily without the tool, so RL has to teach it to call. The copy is what
# varies with the build: seed 1 of the same recipe copied on 5 %, hidden 96 x 600 steps on 84 % but
# greedy accuracy 0.24.
RECIPE = Recipe(
    name="tiny-calc-v1", corpus_lines=20000, hidden_size=64, intermediate_size=128,
    split_digits=True, pretrain_steps=800, batch_size=64, learning_rate=3e-3,
    tool_tokens=TOOL_TOKENS,
)  # fmt: skip

TASK = Task(name="calculator", model="tiny-calc", recipe=RECIPE, prompts=make_problems, corpus=make_corpus)
