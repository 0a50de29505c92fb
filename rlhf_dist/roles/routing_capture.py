"""Routing replay's engine side: the experts a vLLM engine routed each token to, per request.

vLLM 0.32 returns routed experts per request (``enable_return_routed_experts``) only through its
V2 model runner, which needs Triton, which its CPU build lacks (README, "Model families and
mixtures of experts"). What runs on every runner is the routers' capture hook
(``BaseRouter.set_capture_fn``: each MoE layer's top-k expert ids of each forward pass, one row
per token of the batch). ``RoutingCapture`` is a worker extension (vLLM mixes it into its worker
class: ``worker_extension_cls``) that binds that hook on every MoE layer and records which rows
of each forward pass are whose: the V1 runner lays a step's tokens out as its input batch orders
the requests, each request's scheduled tokens from its computed ones (``_prepare_inputs``), so
every (token, layer) routing lands at its request's position.

It needs eager execution (a CUDA graph replays the kernels, not the Python hook) and no prefix
caching (a cached prompt is not routed again): ``GenerationEngine`` asks for both. The last
token of a response is never fed back to the model, so it has no routing (nor needs one: the
logits at the last position score nothing)."""

from __future__ import annotations

from functools import partial

import torch

NOT_RECORDED = -1


def request_routing(chunks: dict[int, torch.Tensor], layers: int, k: int) -> torch.Tensor:
    """One request's (positions, layers, k) expert ids from the chunks of its forward passes
    ({first position: (tokens, layers, k)}); -1 where nothing was recorded."""
    length = max((start + len(ids) for start, ids in chunks.items()), default=0)
    out = torch.full((length, layers, k), NOT_RECORDED, dtype=torch.int16)
    for start, ids in chunks.items():
        out[start : start + len(ids)] = ids
    return out


def external_id(request_id: str) -> str:
    """The id a request's output carries: vLLM's internal id is "<id>-<8 random characters>"."""
    return request_id.rsplit("-", 1)[0]


class RoutingCapture:
    """Mixed into vLLM's worker (``self`` is the worker: ``self.model_runner``); called through
    ``LLM.collective_rpc``."""

    def start_routing_capture(self) -> int:
        """Record the routing of every forward pass from now on; returns the number of layers."""
        from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
        from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

        runner = self.model_runner
        moe = [m for m in runner.get_model().modules() if isinstance(m, MoERunner) and isinstance(m.router, BaseRouter)]
        if not moe:
            raise ValueError("algo.routing_replay: the engine's model has no mixture-of-experts router to record "
                             "(a dense policy has no routing to replay)")
        self.routing_shape = (max(m.layer_id for m in moe) + 1, moe[0].router.top_k)
        self.routing: dict[str, dict[int, torch.Tensor]] = {}  # request -> {first position: (n, layers, k)}
        self.routing_rows: list[tuple[str, int, int]] = []  # (request, first position, tokens) of this pass
        for m in moe:
            m.router.set_capture_fn(partial(self._capture_routing, m.layer_id))
        prepare = runner._prepare_inputs

        def recording_prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs):
            batch = runner.input_batch  # requests in the batch's order, as the rows are laid out
            computed = batch.num_computed_tokens_cpu
            self.routing_rows = [(external_id(r), int(computed[i]), int(n))
                                 for i, (r, n) in enumerate(zip(batch.req_ids, num_scheduled_tokens))]
            return prepare(scheduler_output, num_scheduled_tokens, *args, **kwargs)

        runner._prepare_inputs = recording_prepare
        return self.routing_shape[0]

    def _capture_routing(self, layer: int, topk_ids: torch.Tensor) -> None:
        rows = self.routing_rows
        if sum(n for _, _, n in rows) > topk_ids.shape[0]:  # a warm-up or dummy pass: not a step's tokens
            return
        ids, row = topk_ids.to("cpu", torch.int16), 0
        layers, k = self.routing_shape
        for request, start, n in rows:
            chunks = self.routing.setdefault(request, {})
            if start not in chunks or len(chunks[start]) != n:  # a new chunk (or a recomputed one)
                chunks[start] = torch.full((n, layers, k), NOT_RECORDED, dtype=torch.int16)
            chunks[start][:, layer] = ids[row : row + n]
            row += n

    def take_routing(self, request_ids: list[str], forget_rest: bool = False) -> list[torch.Tensor | None]:
        """The (positions, layers, k) routing of each finished request (None: none recorded).
        ``forget_rest`` (the engine is idle): also forget the requests nobody took (weight-sync
        probes, evaluations)."""
        layers, k = self.routing_shape
        out = [request_routing(self.routing[r], layers, k) if r in self.routing else None for r in request_ids]
        for r in request_ids:
            self.routing.pop(r, None)
        if forget_rest:
            self.routing.clear()
        return out
