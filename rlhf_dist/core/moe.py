"""Mixture-of-experts routing math: the router's load-balancing loss, and top-k routing made to
use given experts (routing replay). Pure torch; tested against hand-computed numbers."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int, mask: torch.Tensor) -> torch.Tensor:
    """The Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4-6) as transformers computes
    it for its MoE families (``load_balancing_loss_func``, which ``router_aux_loss_coef`` is tuned
    for): the layers' tokens pooled, ``E * sum_e f_e * P_e``, with ``f_e`` the share of the top-k
    assignments that go to expert e (the k per token count, so ``sum_e f_e = k``) and ``P_e`` the
    mean router probability of e. Balanced routing gives k; everything to the same k experts gives E.
    Only ``P`` carries a gradient (to the router). A mean over the tokens of one forward pass, so
    not additive over passes: two halves' losses do not average to the whole's.
    Shape: per MoE layer (N, E) logits, mask (N,) (1 on the tokens that count) -> scalar."""
    # f_e = sum_{l, n} m_n [e in topk_{l, n}] / sum_{l, n} m_n;  P_e = sum_{l, n} m_n p_{l, n, e} / sum_{l, n} m_n
    experts = router_logits[0].shape[-1]
    weight = mask.float()
    counts = torch.zeros(experts, device=weight.device)
    probs_sum = torch.zeros(experts, device=weight.device)
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        chosen = probs.topk(top_k, dim=-1).indices
        counts = counts.scatter_add(0, chosen.flatten(), weight.repeat_interleave(top_k))
        probs_sum = probs_sum + (probs * weight[:, None]).sum(dim=0)
    total = weight.sum() * len(router_logits)
    return experts * (counts / total * probs_sum / total).sum()


def forced_topk(
    router_logits: torch.Tensor, own_ids: torch.Tensor, forced_ids: torch.Tensor, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids) of top-k routing made to use ``forced_ids`` where a token has them (a
    row of -1: not recorded, the token keeps its own top-k ``own_ids``): each expert's router
    probability, the k of a token renormalised to sum to 1 with ``renormalize`` (norm_topk_prob),
    exactly as the router weighs the experts it picks itself. So forcing the routing the router
    would choose changes nothing, and the router still gets a gradient through the weights.
    Shape: logits (N, E), ids (N, k) -> (N, k) weights in the logits' dtype, (N, k) ids."""
    # w_{n, i} = p_{n, ids_{n, i}}  (p = softmax(logits_n) in float32), then w_n / sum_i w_{n, i} with renormalize
    given = (forced_ids >= 0).all(dim=-1, keepdim=True)
    ids = torch.where(given, forced_ids.to(own_ids.dtype), own_ids)
    weights = torch.softmax(router_logits, dtype=torch.float, dim=-1).gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids
