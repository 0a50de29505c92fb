"""What a built-in task is made of, and what tasks share: ``Task``, the tiny policy's ``Recipe``,
the ``Environment`` interface of multi-turn tasks, the hash split of a problem space and the draw
of problems from it. Pure Python (standard library and ``core.seeds``).

An environment is any class picked by ``rollout.env`` (a Hydra ``_target_`` node; the other keys
are its keyword arguments). One is created per trajectory, from its prompt row, as
``Env(prompt=<text>, metadata=<the row's other fields>, **kwargs)``, and follows Gymnasium's
conventions:

    reset()        -> (observation, info)     text appended to the prompt before the first turn ("" for none)
    step(action)   -> (observation, reward, terminated, truncated, info)

``action`` is the text of the model's turn (decoded from exactly the tokens it sampled, the stop
string included); ``observation`` is text the engine tokenises and appends as context (never
trained on). A trajectory ends when ``terminated`` or ``truncated``, after ``rollout.max_turns``
turns, or when ``rollout.max_new_tokens`` (the whole response: model and environment tokens) is
spent; its return, the sum of the step rewards, is added to the reward sources' score with weight
``reward.env_weight``. A model turn ends at EOS or at one of the environment's ``stop`` strings.

``reset`` and ``step`` may be plain or ``async`` methods. Each call has ``timeouts.env_step_s``;
one that raises or runs past it ends its trajectory (counted in ``env/errors`` / ``env/timeouts``,
scored as ``reward.on_invalid`` says) while the others go on.

A dozen lines make an environment (``rlhf_dist.tasks.calculator.CalculatorEnv`` is the built-in one)::

    class Guess(Environment):
        stop = ("</guess>",)

        def __init__(self, prompt, metadata):
            self.answer = int(metadata["answer"])

        def step(self, action):
            guess = int(action.split("<guess>")[-1].removesuffix("</guess>"))
            if guess == self.answer:
                return "", 1.0, True, False, {}
            return (" higher" if guess < self.answer else " lower"), 0.0, False, False, {"tool_call": True}
"""

from __future__ import annotations

import hashlib
import importlib
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from rlhf_dist.core.seeds import split_index
from rlhf_dist.registry import TASKS

Problem = TypeVar("Problem")

# Share of a problem space, by hash, held out for evaluation.
TEST_PERCENT = 20


@dataclass(frozen=True)
class Recipe:
    """What differs between the tiny models: shape, tokenizer and pretraining budget."""

    name: str  # cache directory name; bump its suffix when the recipe or corpus changes
    corpus_lines: int  # pretraining corpus size
    hidden_size: int  # num_attention_heads = hidden_size / tiny_model.HEAD_DIM
    intermediate_size: int  # MLP width
    split_digits: bool  # pre-tokenize every digit on its own, so numbers are digit sequences
    pretrain_steps: int
    batch_size: int  # corpus lines per step
    learning_rate: float  # peak, after tiny_model.WARMUP_STEPS; cosine decay to a tenth
    num_layers: int = 2  # decoder layers
    # Each corpus line ends with </s> in pretraining, so the model learns to stop; without it the
    # model never samples </s> and every completion runs to max_new_tokens (throughput benchmarks).
    end_with_eos: bool = True
    # Atomic tokens, not special (skip_special_tokens=True keeps them in decoded text): tool tags.
    tool_tokens: tuple[str, ...] = ()


@dataclass(frozen=True)
class Task:
    """A built-in task: its prompt set ``builtin:<name>``, its embedded tiny policy and, for the
    InstructGPT stages, its demonstrations and preference pairs. The reward function and the
    environment are named in the task's config (``conf/task/<name>.yaml``), as a user's are."""

    name: str  # its key in rlhf_dist.registry.TASKS; data.prompts=builtin:<name>
    model: str  # the name model.path gives its tiny policy (e.g. "tiny"), built and cached on first use
    recipe: Recipe  # that policy's shape, tokenizer and pretraining budget
    # (num, seed, split) -> num rows {"prompt": text, ...metadata} of split "train" or "test".
    prompts: Callable[[int, int, str], list[dict]]
    # (num_lines, seed) -> the text the tiny policy is pretrained on (train-split content only).
    corpus: Callable[[int, int], list[str]]
    # (kind, num, seed, split, noise, ranking_k) -> SFT ("sft": prompt, response) or reward-model
    # ("preferences": prompt, chosen, rejected; or prompt, responses, ranks for ranking_k > 2) rows,
    # with label noise; None: the task has none.
    supervised_rows: Callable[[str, int, int, str, float, int], list[dict]] | None = None
    # (prompt, responses, noise, random.Random) -> {"prompt", "responses" best first, "ranks"}, or None
    # when they all tie: the labeller of the iterated pipeline's rounds; None: the task has none.
    rank_responses: Callable[..., dict | None] | None = None


def load_task(name: str) -> Task:
    """The built-in task ``name``, imported from its ``rlhf_dist.registry.TASKS`` entry."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: use one of {', '.join(TASKS)} (rlhf_dist.registry.TASKS)")
    module_name, _, attr = TASKS[name].target.partition(":")
    task = getattr(importlib.import_module(module_name), attr)
    if not isinstance(task, Task):
        raise TypeError(f"TASKS[{name!r}]={TASKS[name].target!r} is a {type(task).__name__}, not a Task")
    return task


class Environment:
    """Base class of the environments (subclassing it is optional: the methods are what counts)."""

    # Strings that end a model turn besides EOS (e.g. a tool call's closing tag); kept in the action.
    stop: tuple[str, ...] = ()

    def reset(self) -> tuple[str, dict]:
        """Text to append to the prompt before the first model turn, and an info dict."""
        return "", {}

    def step(self, action: str) -> tuple[str, float, bool, bool, dict]:
        """(observation, reward, terminated, truncated, info) after the model's turn ``action``.
        ``info["tool_call"]`` (optional) marks a step that ran a tool (``env/tool_calls_mean``);
        without it a step that does not terminate counts as one."""
        raise NotImplementedError


def is_held_out(problem: str, test_percent: int = TEST_PERCENT) -> bool:
    """Whether the problem written ``problem`` ("12 + 7") is in the test split: decided by a hash of
    its text, so a problem's split never depends on seeds or sample counts."""
    # sha256, not hash(): str hashes are salted per process, and the split must never move.
    digest = hashlib.sha256(problem.encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100 < test_percent


def split_problems(space: Iterable[Problem], split: str, text: Callable[[Problem], str]) -> list[Problem]:
    """The problems of ``space`` in ``split`` ("train" or "test"), in order: those whose
    ``text(problem)`` is held out (``is_held_out``) for "test", the others for "train"."""
    test = split_index(split) == split_index("test")
    return [p for p in space if is_held_out(text(p)) == test]


def draw(num: int, rng: random.Random, space: list[Problem]) -> list[Problem]:
    """``num`` problems: every problem of ``space`` once (shuffled) before any repeats."""
    drawn: list[Problem] = []
    while len(drawn) < num:
        epoch = list(space)
        rng.shuffle(epoch)
        drawn.extend(epoch[: num - len(drawn)])
    return drawn
