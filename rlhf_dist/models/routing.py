"""Routing replay's trainer side: a transformers mixture-of-experts model whose routers send given
tokens to given experts (those an engine routed them to), and everything else where they choose.

Transformers 5's MoE blocks (Qwen2/3-MoE, OLMoE, Mixtral...) call their router, the block's
``gate`` child, on the flattened (batch x sequence, hidden) states; it returns (logits, top-k
weights, top-k expert ids), and the block runs the experts on those ids with those weights. A
forward hook on the router replaces the last two (``core.moe.forced_topk``), so the experts, the
ZeRO-3 gathers (the block is one leaf) and the gradients all follow the given routing.
"""

from __future__ import annotations

import re
from functools import partial

import torch
from torch import nn

from rlhf_dist.core.moe import forced_topk
from rlhf_dist.core.packing import TokenLayout


class RoutingReplay:
    """Forward hooks on the routers of ``model`` (built before DeepSpeed wraps it), one per MoE
    layer. While ``routing`` is set, (N, layers, k) expert ids of the N flattened tokens of the
    forward pass (-1 rows: not recorded), each router's top-k is replaced by the given experts of
    its layer; None: the routers choose. It stays set until changed, so a layer recomputed in the
    backward pass (gradient checkpointing) routes as its forward did."""

    def __init__(self, model: nn.Module) -> None:
        self.routing: torch.Tensor | None = None
        # (token, layer) routings given, and those on which the router would have chosen other experts,
        # counted once per forward pass (a layer recomputed in the backward pass is not counted again)
        # while ``counting``
        self.given = self.changed = 0
        self.counting = True
        self._counted: set[int] = set()
        self.unsupported: list[str] = []  # routers without the top-k interface above, by class
        self.layers = 0
        for name, block in model.named_modules():
            if "experts" not in block._modules:
                continue
            gate = block._modules.get("gate")
            layer = re.search(r"layers\.(\d+)\.", name + ".")  # vLLM numbers routing by decoder layer
            if layer is None or not hasattr(gate, "top_k") or not hasattr(gate, "norm_topk_prob"):
                self.unsupported.append(type(gate or block).__name__)
                continue
            gate.register_forward_hook(partial(self._route, int(layer.group(1))))
            self.layers = max(self.layers, int(layer.group(1)) + 1)

    def set(self, routing: torch.Tensor | None) -> None:
        if routing is not None and self.unsupported:
            raise ValueError(f"routing replay: the routers {sorted(set(self.unsupported))} do not return (logits, "
                             "top-k weights, top-k ids) with top_k and norm_topk_prob; their routing cannot be replayed")
        self.routing = routing
        self._counted = set()

    def _route(self, layer: int, router: nn.Module, args, output):
        if self.routing is None:
            return None
        logits, _, own_ids = output
        if self.routing.shape[0] != logits.shape[0]:
            raise ValueError(f"routing replay: routing for {self.routing.shape[0]} tokens, the router of layer "
                             f"{layer} got {logits.shape[0]}")
        forced = self.routing[:, layer]
        if self.counting and layer not in self._counted:
            self._counted.add(layer)
            given = (forced >= 0).all(dim=-1)
            other = (own_ids.sort(dim=-1).values != forced.to(own_ids.dtype).sort(dim=-1).values).any(dim=-1)
            self.given += int(given.sum())
            self.changed += int((given & other).sum())
        weights, ids = forced_topk(logits, own_ids, forced, router.norm_topk_prob)
        return logits, weights, ids

    def take_counts(self) -> tuple[int, int]:
        """(routings given, routings changed) since the last call."""
        counts, self.given, self.changed = (self.given, self.changed), 0, 0
        return counts


@torch.no_grad()
def own_routing(model: nn.Module, exp) -> torch.Tensor:
    """(B, W, layers, k): the experts the routers of ``model`` (a transformers MoE whose decoder
    layers' ``mlp.gate`` is the router) choose for every token of ``exp``'s padded rows, in a plain
    forward pass (routing replay off). For tests and measurements."""
    chosen: dict[int, torch.Tensor] = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: chosen.__setitem__(i, out[2]))
             for i, layer in enumerate(model.model.layers)]
    try:
        model(input_ids=exp.input_ids, attention_mask=exp.attention_mask, position_ids=exp.position_ids,
              use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([chosen[i].view(*exp.input_ids.shape, -1) for i in sorted(chosen)], dim=2)


def layout_routing(layout: TokenLayout, routing: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Routing stored like the rows, (B, W, layers, k) expert ids (-1 where not recorded), laid
    out for the forward pass of ``layout`` (made from those rows, whose attention mask is
    ``attention_mask``): (R * L, layers, k), -1 at padding and at packed rows' dummy sequences."""
    rows, width = layout.input_ids.shape
    out = routing.new_full((rows * width, *routing.shape[2:]), -1)
    out[layout.tokens] = routing[attention_mask.bool()]
    return out


def router_aux_coef(text_config, coef: float | None) -> float:
    """The weight of the routers' load-balancing loss for a model of ``text_config``: ``coef``;
    None: the config's ``router_aux_loss_coef`` where its ``output_router_logits`` is set (when
    transformers adds the loss to the model's own), else 0. Released MoE checkpoints (Qwen3-MoE,
    OLMoE, Mixtral) ship a coefficient with ``output_router_logits`` false: off unless asked."""
    if coef is not None:
        return coef
    # Keys of the MoE families' configs only: a dense config has neither, and asks for no loss
    if not getattr(text_config, "output_router_logits", False):
        return 0.0
    return float(text_config.router_aux_loss_coef)
