"""Generation role: one vLLM engine per Ray actor.

The engine returns token ids, text and the sampling logprob of every generated
token, and receives new policy weights through vLLM's weight-transfer API. Single-turn responses are
detokenized once each, when they finish, in a batch (``models.detokenize``: the text vLLM's own
incremental detokenizer would give, which then costs ~14 % of a small model's generation). With an
environment (``rollout.env``) each sample is a multi-turn trajectory (``rlhf_dist.roles.agent_loop``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rlhf_dist.config import RolloutConfig
from rlhf_dist.models.detokenize import fast_tokenizer, response_texts
from rlhf_dist.registry import TRANSPORTS
from rlhf_dist.roles.routing_capture import RoutingCapture
from rlhf_dist.roles.spec import RankSpec
from rlhf_dist.weight_sync.adapter import AdapterReceiver, adapter_request, cannot_adapt, max_lora_rank


@dataclass
class Generation:
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]  # engine's logprob of each sampled token
    text: str
    version: int = 0  # the policy version (weight syncs applied) of the engine that sampled it
    truncated: bool = False  # stopped by rollout.max_new_tokens, not by EOS or a stop string
    # Multi-turn samples (rollout.env): 1 on the model's tokens, 0 on the environment's (None: all the model's)
    action_mask: list[int] | None = None
    # turns, tool_calls, seconds (in environment calls), return (NaN if it failed), error ("", error, timeout), message
    env: dict | None = None
    transcript: str = ""  # the turns marked (agent.MODEL_MARK / ENV_MARK), for the samples table
    # algo.routing_replay: (positions, layers, k) int16 expert ids the engine routed each token of the
    # prompt and response to (``routing_capture``; the response's last token has none)
    routing: Any = None


def executor_backend(tensor_parallel_size: int, in_process: bool) -> str | None:
    """vLLM's executor for one engine actor.

    In process (resources.vllm_in_process): the worker runs in this process too, and the engine
    core's process is switched off by the actor's environment (placement.actor_env). Tensor
    parallel: the workers are this actor's subprocesses (``mp``) on the GPUs of its bundle. Left to
    vLLM inside a Ray actor, it would pick its Ray executor, which refuses a bundle holding more than
    one GPU, schedules its workers outside this actor's bundle, and does not run on CPU at all."""
    if in_process:
        return "uni"
    return "mp" if tensor_parallel_size > 1 else None


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _extensions(record_routing: bool, adapter: dict | None) -> dict[str, Any]:
    """vLLM's arguments for what the engine's worker does besides serving: algo.routing_replay records
    the routers' choices per request (routing_capture: eager execution, which the config requires, and
    no prefix caching, or a cached prompt is not routed); adapters are received and served (LoRA)."""
    if record_routing:
        return {"worker_extension_cls": _qualname(RoutingCapture), "enable_prefix_caching": False}
    if adapter is not None:
        return {"worker_extension_cls": _qualname(AdapterReceiver), "enable_lora": True, "max_loras": 1,
                "max_lora_rank": max_lora_rank(adapter["r"])}
    return {}


def _create(llm_class: type, adapter: dict | None, **kwargs: Any):
    """vLLM's ``LLM``; one that cannot serve adapters for this architecture says so in one line."""
    try:
        return llm_class(**kwargs)
    except ValueError as e:
        if adapter is not None and "does not support LoRA" in str(e):
            raise ValueError(f"model.lora.sync=adapter: vLLM cannot serve LoRA adapters on this model ({e}); "
                             "use model.lora.sync=merged") from None
        raise


class GenerationEngine:
    """A vLLM ``LLM`` behind a small interface; created as a Ray actor by ``placement``."""

    def __init__(
        self, *, spec: RankSpec, cfg: RolloutConfig, dtype: str, weight_sync_backend: str, in_process: bool,
        env_step_s: float = 30.0, chat_template: bool = True, record_routing: bool = False,
        adapter: dict | None = None,
    ) -> None:
        from vllm import LLM

        self.cfg = cfg
        # model.lora.sync=adapter: the base weights stay; each sync's adapter (peft's r and lora_alpha in
        # ``adapter``) is loaded in memory as the one served (weight_sync.adapter)
        self.adapter_config, self.adapter = adapter, None  # the LoRARequest of the adapter served (None: the base)
        self.llm = _create(
            LLM, adapter,
            model=spec.model_path,
            dtype=dtype,
            seed=spec.seed + spec.rank,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30) or None,
            max_model_len=cfg.max_model_len,
            enforce_eager=cfg.enforce_eager,
            # Logprobs after temperature/top-p, i.e. of the distribution actually sampled.
            logprobs_mode="processed_logprobs",
            weight_transfer_config={"backend": TRANSPORTS[weight_sync_backend].vllm_backend},
            distributed_executor_backend=executor_backend(cfg.tensor_parallel_size, in_process),
            # rollout.sleep_level > 0 (GPU): the engine frees its GPU memory while the trainer
            # sharing the GPU trains (colocated placement).
            enable_sleep_mode=cfg.sleep_level > 0,
            **_extensions(record_routing, adapter),
        )
        # a fast tokenizer's raw tokenizer: single-turn text is decoded here, not by vLLM (None: by vLLM)
        self.detokenizer = fast_tokenizer(self.llm.get_tokenizer())
        self.record_routing = record_routing
        if record_routing:
            self.llm.collective_rpc("start_routing_capture")
        self.version = 0  # the policy version served: set by every weight update (and a resume)
        self.updating = False  # from start_weight_update to the update's end (vLLM's worker keeps its own flag)
        self.agent = None
        if cfg.env:
            from rlhf_dist.models.chat import has_chat_template
            from rlhf_dist.registry import env_factory
            from rlhf_dist.roles.agent_loop import AgentLoop

            chat = has_chat_template(self.llm.get_tokenizer(), chat_template)
            self.agent = AgentLoop(self.llm, env_factory(cfg.env), self._turn_params, cfg.max_turns,
                                   cfg.max_new_tokens, cfg.max_model_len, env_step_s, chat, lambda: self.adapter)

    def pid(self) -> int:
        return os.getpid()

    def _sampling_params(self, seeds: list[int], greedy: bool) -> list:
        from vllm import SamplingParams

        return [
            SamplingParams(
                max_tokens=self.cfg.max_new_tokens,
                temperature=0.0 if greedy else self.cfg.temperature,
                top_p=1.0 if greedy else self.cfg.top_p,
                logprobs=0,
                seed=s,
                detokenize=self.detokenizer is None,
            )
            for s in seeds
        ]

    def _turn_params(self, max_tokens: int, stop: list[str], seed: int, greedy: bool = False):
        """One turn of a multi-turn sample: ends at EOS or one of the environment's stop strings."""
        from vllm import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else self.cfg.temperature,
                              top_p=1.0 if greedy else self.cfg.top_p, logprobs=0, seed=seed, stop=stop or None,
                              include_stop_str_in_output=True)

    def _trajectories(self, prompt_ids: list[list[int]], seeds: list[int], rows: list[dict] | None,
                      greedy: bool) -> Iterator[tuple[int, Generation]]:
        """Multi-turn samples (``rlhf_dist.roles.agent_loop.AgentLoop``) as they finish."""
        if rows is None or len(rows) != len(prompt_ids):
            raise ValueError(f"rollout.env is set: every prompt needs its row (prompt text, metadata); got "
                             f"{None if rows is None else len(rows)} rows for {len(prompt_ids)} prompts")
        for i, traj in self.agent.run(prompt_ids, seeds, rows, greedy):
            text = self.agent.tokenizer.decode(traj.response_ids, skip_special_tokens=True)
            yield i, Generation(prompt_ids[i], traj.response_ids, traj.logprobs, text, self.version, traj.truncated,
                                traj.action_mask, traj.stats(), "".join(traj.transcript))

    def _generations(self, prompts: list[list[int]], outputs: list, routes: list) -> list[Generation]:
        """The finished ``outputs`` of ``prompts`` as Generations, the text decoded here in one batch
        (``models.detokenize``) unless vLLM made it (a slow tokenizer)."""
        completions = [out.outputs[0] for out in outputs]
        ids = [list(c.token_ids) for c in completions]
        texts = ([c.text for c in completions] if self.detokenizer is None
                 else response_texts(self.detokenizer, prompts, ids))
        return [Generation(prompt, tokens, [step[t].logprob for step, t in zip(c.logprobs, tokens)], text,
                           self.version, c.finish_reason == "length", routing=r)
                for prompt, c, tokens, text, r in zip(prompts, completions, ids, texts, routes)]

    def _routing(self, outputs: list, idle: bool) -> list:
        """The recorded routing of finished requests (Nones without algo.routing_replay); ``idle``:
        nothing else is in flight, so what no one took (probes, evaluations) is forgotten."""
        if not self.record_routing:
            return [None] * len(outputs)
        return self.llm.collective_rpc("take_routing", args=([o.request_id for o in outputs], idle))[0]

    def generate(self, prompt_ids: list[list[int]], seeds: list[int], greedy: bool = False,
                 rows: list[dict] | None = None) -> list[Generation]:
        """One response per prompt; ``seeds`` makes each sample reproducible. ``greedy`` is for
        evaluation only (temperature 0 is not a valid RL policy). ``rows`` ({"prompt", "metadata"}
        per prompt) create the environments of multi-turn samples (``rollout.env``)."""
        from vllm import TokensPrompt

        if self.agent is not None:
            done = dict(self._trajectories(prompt_ids, seeds, rows, greedy))
            return [done[i] for i in range(len(prompt_ids))]

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompt_ids], self._sampling_params(seeds, greedy),
            use_tqdm=False, lora_request=self.adapter,
        )
        return self._generations(prompt_ids, outputs, self._routing(outputs, idle=True))

    def generate_stream(
        self, prompt_ids: list[list[int]], seeds: list[int], chunk: int, rows: list[dict] | None = None
    ) -> Iterator[list[tuple[int, Generation]]]:
        """``generate`` as a stream (a Ray streaming generator): yields (index, generation) pairs
        as responses finish, ``chunk`` at a time (the rest at the end), so the caller can
        score them while the engine goes on. The same requests and seeds as ``generate``: the same
        samples."""
        from vllm import TokensPrompt

        if self.agent is not None:
            ready = []
            for pair in self._trajectories(prompt_ids, seeds, rows, False):
                ready.append(pair)
                if len(ready) >= chunk:
                    yield ready
                    ready = []
            if ready:
                yield ready
            return

        ids = self.llm.enqueue(
            [TokensPrompt(prompt_token_ids=p) for p in prompt_ids], self._sampling_params(seeds, False),
            use_tqdm=False, lora_request=self.adapter,
        )
        # enqueue returns vLLM's internal ids ("<id>-<8 random characters>"); outputs carry "<id>"
        index = {request.rsplit("-", 1)[0]: i for i, request in enumerate(ids)}
        engine, ready = self.llm.llm_engine, []
        while engine.has_unfinished_requests():
            finished = [out for out in engine.step() if out.finished]
            if finished:
                rows = [index[out.request_id] for out in finished]
                gens = self._generations([prompt_ids[i] for i in rows], finished, self._routing(finished, idle=False))
                ready += zip(rows, gens)
            if len(ready) >= chunk or (ready and not engine.has_unfinished_requests()):
                for start in range(0, len(ready), chunk):  # many finishing at once: still chunks
                    yield ready[start : start + chunk]
                ready = []

    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Logprob of tokens 1..L-1 of each sequence given its prefix (raw model, temperature 1)."""
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        # With LoRA enabled, one sequence per batch: vLLM 0.32's CPU LoRA logits (PunicaWrapperCPU.add_lora_logits)
        # index the prompt-logprob rows of several requests by request, not by token, and fail.
        batches = [[t] for t in token_ids] if self.adapter_config is not None else [token_ids]
        outputs = [out for batch in batches for out in self.llm.generate(
            [TokensPrompt(prompt_token_ids=t) for t in batch], params, use_tqdm=False, lora_request=self.adapter)]
        return [
            [step[token].logprob for step, token in zip(out.prompt_logprobs[1:], ids[1:])]
            for ids, out in zip(token_ids, outputs)
        ]

    def sleep(self) -> None:
        """Free GPU memory until ``wake_up`` (level 1: weights to CPU memory and KV cache dropped;
        level 2: both dropped, the next weight update refills the weights)."""
        self.llm.sleep(level=self.cfg.sleep_level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Reallocate ``tags`` (``weights``, ``kv_cache``; all if None)."""
        self.llm.wake_up(tags)

    # Weight transfer: thin wrappers over vLLM's RL API so the controller can call them by role.
    def init_weight_transfer(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def check_adapter(self, names: list[str]) -> None:
        """Refuse at start, in one line, adapter tensors (``names``, as a sync sends them) for layers this
        engine cannot adapt (a mixture of experts' experts), rather than at the first sync."""
        if unknown := self.llm.collective_rpc("unknown_adapter_layers", args=(names,))[0]:
            raise ValueError(cannot_adapt(unknown))

    # With adapters (model.lora.sync=adapter) an update is an adapter's tensors, received by the worker
    # (weight_sync.adapter.AdapterReceiver) and loaded at its end as version's adapter; the base stays.
    def start_weight_update(self) -> None:
        if self.adapter_config is None:
            self.llm.start_weight_update()
        self.updating = True

    def update_weights(self, update_info: dict) -> None:
        if self.adapter_config is not None:
            self.llm.collective_rpc("receive_adapter", args=(update_info,))
            return
        try:
            self.llm.update_weights({"update_info": update_info})
        except BaseException:
            self.updating = False  # vLLM's worker ends an update whose receive failed
            raise

    def finish_weight_update(self, version: int) -> None:
        if self.adapter_config is None:
            self.llm.finish_weight_update(weight_version=str(version))
        elif self.llm.collective_rpc("load_adapter", args=(version + 1, self.adapter_config))[0]:
            self.adapter = adapter_request(version)  # (an update that received nothing keeps the adapter it had)
        self.updating = False
        self.version = version
        # Cached KV blocks were computed with the old weights; vLLM would reuse them for a
        # repeated prefix (e.g. the same held-out prompts every evaluation).
        self.llm.reset_prefix_cache()

    def shutdown_weight_transfer(self) -> None:
        """Leave the weight-transfer group (before joining a new one, after a peer was lost). vLLM
        refuses to during an update: one started but never received (a sync that stopped when
        another engine was found lost) is finished first, on the weights it had."""
        if self.updating:
            self.finish_weight_update(self.version)
        self.llm.shutdown_weight_transfer_engine()
