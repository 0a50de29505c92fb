"""Environments for multi-turn (agentic) rollouts: the interface users implement, and how one is made.

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

A dozen lines make an environment (``rlhf_dist.calculator.CalculatorEnv`` is the built-in one)::

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

import inspect
from collections.abc import Callable
from typing import Any


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


def env_factory(spec: dict[str, Any], key: str = "rollout.env") -> Callable[[str, dict], Any]:
    """``prompt, metadata -> environment`` from a ``_target_`` node; the target is imported and its
    arguments bound now, so a typo or a missing argument fails in one line before any actor starts."""
    from rlhf_dist.roles.reward import import_function

    spec = dict(spec)
    target = spec.pop("_target_", None)
    if not isinstance(target, str) or not target:
        raise ValueError(f"{key}: needs _target_ (an environment class, e.g. rlhf_dist.calculator.CalculatorEnv)")
    cls = import_function(target, f"{key}._target_")  # "pkg.module.Class": one line naming the key if it fails
    try:
        inspect.signature(cls).bind(prompt="", metadata={}, **spec)
    except TypeError as e:
        raise ValueError(f"{key}._target_={target!r}: cannot be called as {target}(prompt=, metadata=, "
                         f"{', '.join(f'{k}=' for k in spec)}): {e}") from e
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise ValueError(f"{key}._target_={target!r}: has no {method}() method (see rlhf_dist.envs.Environment)")
    stop = getattr(cls, "stop", ())
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"{key}._target_={target!r}: stop={stop!r} must be a tuple of non-empty strings")

    def make(prompt: str, metadata: dict) -> Any:
        return cls(prompt=prompt, metadata=metadata, **spec)

    return make
