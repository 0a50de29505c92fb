"""Multi-turn rollouts on one vLLM engine: many trajectories in flight, environment calls concurrent.

Token-in/token-out: a trajectory's response is the model's tokens exactly as the engine sampled
them, with the observations' tokens between its turns (``action_mask`` 0: context, never trained
on). Each turn continues from the token ids so far, never from re-tokenised text; only
observations are tokenised (``observation_ids``: as a chat turn for chat models). The engine keeps
generating the other trajectories while an environment runs; each environment call has its own
timeout (``EnvCalls``), and one that raises or runs past it ends only its own trajectory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import inspect
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from rlhf_dist.core.seeds import ENGINE_TURN, derive_seed
from rlhf_dist.roles.worker_group import RoleError

# Markers of the turns in a transcript (the rollout samples table).
MODEL_MARK, ENV_MARK = "⟦model⟧", "⟦env⟧"


class EnvCalls:
    """Environment calls with a per-call timeout: plain methods on a thread pool, ``async`` ones on
    one event-loop thread (a timed-out coroutine is cancelled; a plain call that hangs keeps its
    pool thread, so the pool is sized for that: ``workers``)."""

    def __init__(self, timeout_s: float, workers: int = 64) -> None:
        self.timeout_s = timeout_s
        self.pool = cf.ThreadPoolExecutor(workers, thread_name_prefix="env")
        self.loop: asyncio.AbstractEventLoop | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> cf.Future:
        if inspect.iscoroutinefunction(fn):
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, name="env-loop", daemon=True).start()
            return asyncio.run_coroutine_threadsafe(fn(*args), self.loop)
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)  # a hung call keeps its thread, not us


def observation_ids(tokenizer, text: str, chat: bool, turn_open: bool) -> list[int]:
    """The tokens appended for an observation. Plain models: the text as is. Chat models: the text
    as a ``tool`` turn of the chat template, plus the template's opening of the next assistant
    turn, and, when the model's turn was cut at a stop string rather than its end-of-turn token
    (``turn_open``), the template's close of that turn first. Found by rendering a conversation with
    and without the observation, so it is the template's own markup."""
    if not chat:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    marker = "\x00RLHF_DIST_TURN\x00"
    base = [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}]
    before = tokenizer.apply_chat_template(base, tokenize=False)
    after = tokenizer.apply_chat_template(base + [{"role": "tool", "content": text}], tokenize=False,
                                          add_generation_prompt=True)
    if not after.startswith(before):
        raise ValueError("the chat template renders earlier turns differently once a tool turn follows; "
                         "set data.chat_template=false to append observations as plain text")
    close = before[before.index(marker) + len(marker):]  # the template's end of the assistant turn
    eos = tokenizer.eos_token or ""
    if not turn_open and eos and close.startswith(eos):
        close = close[len(eos):]  # the model sampled its end-of-turn token itself
    return tokenizer(close + after[len(before):], add_special_tokens=False)["input_ids"]


@dataclass
class Trajectory:
    """One sample's multi-turn rollout so far."""

    index: int
    prompt_ids: list[int]
    seed: int
    env: Any = None
    response_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    action_mask: list[int] = field(default_factory=list)
    transcript: list[str] = field(default_factory=list)
    turns: int = 0
    tool_calls: int = 0
    env_return: float = 0.0
    env_s: float = 0.0
    error: str = ""  # "" (none), "error" or "timeout"
    message: str = ""
    truncated: bool = False

    def append(self, ids: list[int], logprobs: list[float] | None, text: str) -> None:
        """Model tokens (with their sampling logprobs) or, ``logprobs`` None, environment tokens."""
        self.response_ids += ids
        self.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)
        self.action_mask += [1 if logprobs is not None else 0] * len(ids)
        if text:
            self.transcript.append(f"{MODEL_MARK if logprobs is not None else ENV_MARK}{text}")

    def stats(self) -> dict[str, Any]:
        failed = bool(self.error)
        return {"turns": self.turns, "tool_calls": self.tool_calls, "seconds": self.env_s,
                "return": float("nan") if failed else self.env_return, "error": self.error, "message": self.message}


class AgentLoop:
    """Runs trajectories of ``make_env`` environments on a vLLM ``LLM`` until each ends; ``run``
    yields (index, Trajectory) as they finish. ``sampling(max_tokens, stop, seed, greedy)`` makes
    one turn's SamplingParams; ``adapter()`` the LoRARequest of the adapter the engine serves (None: none)."""

    def __init__(self, llm, make_env: Callable[[str, dict], Any], sampling: Callable[..., Any], max_turns: int,
                 max_new_tokens: int, max_model_len: int, env_step_s: float, chat: bool,
                 adapter: Callable[[], Any] = lambda: None) -> None:
        self.llm, self.make_env, self.sampling, self.adapter = llm, make_env, sampling, adapter
        self.max_turns, self.max_new_tokens, self.max_model_len = max_turns, max_new_tokens, max_model_len
        self.env_step_s, self.chat = env_step_s, chat
        self.tokenizer = llm.get_tokenizer()

    def run(self, prompt_ids: list[list[int]], seeds: list[int], rows: list[dict],
            greedy: bool = False) -> Iterator[tuple[int, Trajectory]]:
        """Every prompt's trajectory (``rows``: its {"prompt", "metadata"}), in the order they end."""
        calls, self.greedy = EnvCalls(self.env_step_s), greedy
        self.requests: dict[str, Trajectory] = {}
        self.pending: dict[cf.Future, tuple[Trajectory, str, float]] = {}  # future -> (trajectory, kind, started)
        self.done: list[Trajectory] = []
        try:
            for i, (prompt, seed, row) in enumerate(zip(prompt_ids, seeds, rows)):
                traj = Trajectory(i, list(prompt), seed)
                try:
                    traj.env = self.make_env(row["prompt"], row["metadata"])
                except Exception as e:  # noqa: BLE001 -- a user's environment: ends this trajectory only
                    self._fail(traj, "error", f"creating the environment raised {type(e).__name__}: {e}")
                    continue
                self._call(calls, traj, "reset")
            engine = self.llm.llm_engine
            while self.requests or self.pending or self.done:
                while self.done:
                    traj = self.done.pop()
                    yield traj.index, traj
                if engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished:
                            self._turn_ended(calls, self.requests.pop(out.request_id), out.outputs[0])
                    finished = [f for f in self.pending if f.done()]
                elif self.pending:
                    deadline = min(started for _, _, started in self.pending.values()) + self.env_step_s
                    finished, _ = cf.wait(list(self.pending), max(deadline - time.monotonic(), 0.0),
                                          return_when=cf.FIRST_COMPLETED)
                elif self.requests:
                    raise RuntimeError(f"{len(self.requests)} turns were enqueued but the engine has no request left")
                else:
                    continue
                for future in finished:
                    self._env_answered(calls, future)
                self._expire()
        finally:
            calls.close()

    # -- environment calls

    def _call(self, calls: EnvCalls, traj: Trajectory, kind: str, *args: Any) -> None:
        fn = getattr(traj.env, kind)
        self.pending[calls.submit(fn, *args)] = (traj, kind, time.monotonic())

    def _expire(self) -> None:
        now = time.monotonic()
        for future, (traj, kind, started) in list(self.pending.items()):
            if now - started > self.env_step_s:
                del self.pending[future]
                future.cancel()
                traj.env_s += now - started
                self._fail(traj, "timeout", f"{kind}() ran past timeouts.env_step_s={self.env_step_s:g}s")

    def _env_answered(self, calls: EnvCalls, future: cf.Future) -> None:
        traj, kind, started = self.pending.pop(future)
        traj.env_s += time.monotonic() - started
        try:
            answer = future.result()
            if kind == "reset":
                observation, _info = answer if isinstance(answer, tuple) else (answer, {})
                terminated = truncated = False
            else:
                observation, reward, terminated, truncated, info = answer
                traj.env_return += float(reward)
                traj.tool_calls += int(bool(info.get("tool_call", not (terminated or truncated))))
            if not isinstance(observation, str):
                raise TypeError(f"the observation is a {type(observation).__name__}, not text")
        except Exception as e:  # noqa: BLE001 -- a user's environment: ends this trajectory only
            self._fail(traj, "error", f"{kind}() raised {type(e).__name__}: {e}")
            return
        if terminated or truncated or traj.turns >= self.max_turns:
            traj.truncated = bool(truncated or not terminated)
            return self.done.append(traj)
        last_closed = kind == "reset" or bool(traj.response_ids and traj.response_ids[-1] == self.tokenizer.eos_token_id)
        ids = observation_ids(self.tokenizer, observation, self.chat, turn_open=not last_closed) if observation else []
        traj.append(ids, None, observation)
        self._next_turn(traj)

    def _fail(self, traj: Trajectory, error: str, message: str) -> None:
        traj.error, traj.message = error, message
        self.done.append(traj)

    # -- model turns

    def _next_turn(self, traj: Trajectory) -> None:
        from vllm import TokensPrompt

        context = len(traj.prompt_ids) + len(traj.response_ids)
        budget = min(self.max_new_tokens - len(traj.response_ids), self.max_model_len - context)
        if budget <= 0:
            traj.truncated = True
            return self.done.append(traj)
        seed = derive_seed(ENGINE_TURN, traj.seed, traj.turns)
        params = self.sampling(budget, list(getattr(traj.env, "stop", ())), seed, self.greedy)
        [request] = self.llm.enqueue([TokensPrompt(prompt_token_ids=traj.prompt_ids + traj.response_ids)], [params],
                                     use_tqdm=False, lora_request=self.adapter())
        # enqueue returns vLLM's internal id ("<id>-<8 random characters>"); outputs carry "<id>"
        self.requests[request.rsplit("-", 1)[0]] = traj

    def _turn_ended(self, calls: EnvCalls, traj: Trajectory, completion) -> None:
        ids = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, ids)]
        action = self.tokenizer.decode(ids, skip_special_tokens=True)  # exactly the sampled tokens
        traj.append(ids, logprobs, action)
        traj.turns += 1
        if completion.finish_reason == "length":  # the token budget (or the engine's length) is spent
            traj.truncated = True
            return self.done.append(traj)
        self._call(calls, traj, "step", action)


def env_rows(texts: list[str], metadata: list[dict]) -> list[dict]:
    """What each sample's environment is made from: its prompt text and its row's metadata."""
    return [{"prompt": t, "metadata": m} for t, m in zip(texts, metadata)]


class EnvError(RoleError):
    """An environment call raised or timed out, with reward.on_invalid=error; names the sample (a
    failed call, not a lost actor: the run stops with this one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "generation", "env")
