"""The mixture-of-experts math by hand: the routers' load-balancing loss and forced top-k routing."""

import math

import torch

from rlhf_dist.core.moe import forced_topk, load_balancing_loss

LN3 = math.log(3.0)


def test_the_load_balancing_loss_pools_the_layers_valid_tokens():
    # E = 2 experts, k = 1. Layer A: token 1 p = [3/4, 1/4] -> e0, token 2 p = [1/4, 3/4] -> e1,
    # token 3 masked out. Layer B: tokens 1 and 2 p = [3/4, 1/4] -> e0.
    # pooled over 4 (layer, token) rows: f = [3/4, 1/4]; P = ([1/4 + 3/4 ... ]) = [1 + 1.5, 1 + 0.5] / 4
    # = [0.625, 0.375]; loss = E * (0.75 * 0.625 + 0.25 * 0.375) = 2 * 0.5625 = 1.125
    layer_a = torch.tensor([[LN3, 0.0], [0.0, LN3], [LN3, 0.0]])
    layer_b = torch.tensor([[LN3, 0.0], [LN3, 0.0], [0.0, 5.0]])
    mask = torch.tensor([1.0, 1.0, 0.0])
    torch.testing.assert_close(load_balancing_loss([layer_a, layer_b], 1, mask), torch.tensor(1.125), atol=1e-6, rtol=0)
    # layer A alone: f = [1/2, 1/2], P = [1/2, 1/2]: balanced, loss = 2 * (1/4 + 1/4) = 1 = k
    torch.testing.assert_close(load_balancing_loss([layer_a], 1, mask), torch.tensor(1.0), atol=1e-6, rtol=0)
    # token 3 counted: f = [2/3, 1/3], P = [1.75, 1.25] / 3: loss = 2 * (3.5 + 1.25) / 9 = 9.5 / 9
    torch.testing.assert_close(load_balancing_loss([layer_a], 1, torch.ones(3)), torch.tensor(9.5 / 9), atol=1e-6,
                               rtol=0)


def test_the_load_balancing_loss_has_a_gradient_through_the_probabilities_only():
    # d loss / d P_e = E * f_e / 1 (one token, so P = p): with p = [3/4, 1/4] and f = [1, 0],
    # d loss / d logit_j = 2 * sum_e f_e * p_e * ([e = j] - p_j) = 2 * 3/4 * ([0 = j] - p_j) = [3/8, -3/8]
    logits = torch.tensor([[LN3, 0.0]], requires_grad=True)
    load_balancing_loss([logits], 1, torch.ones(1)).backward()
    torch.testing.assert_close(logits.grad, torch.tensor([[0.375, -0.375]]), atol=1e-6, rtol=0)


def test_forced_top_k_weighs_the_given_experts_as_the_router_would():
    # softmax(log [1, 2, 3, 4]) = [0.1, 0.2, 0.3, 0.4]; the router's own top-2 is [3, 2]
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]]))
    own = torch.tensor([[3, 2], [3, 2]])
    forced = torch.tensor([[0, 1], [-1, -1]])  # row 2 not recorded: it keeps its own
    weights, ids = forced_topk(logits, own, forced, renormalize=False)
    assert ids.tolist() == [[0, 1], [3, 2]]
    torch.testing.assert_close(weights, torch.tensor([[0.1, 0.2], [0.4, 0.3]]), atol=1e-6, rtol=0)
    # renormalised over the k: [0.1, 0.2] / 0.3 = [1/3, 2/3]; [0.4, 0.3] / 0.7 = [4/7, 3/7]
    weights, _ = forced_topk(logits, own, forced, renormalize=True)
    torch.testing.assert_close(weights, torch.tensor([[1 / 3, 2 / 3], [4 / 7, 3 / 7]]), atol=1e-6, rtol=0)


def test_forcing_the_routers_own_choice_gives_its_own_weights_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 8, generator=gen).to(torch.bfloat16)
    probs = torch.softmax(logits, dtype=torch.float, dim=-1)
    top, own = probs.topk(2, dim=-1)
    weights, ids = forced_topk(logits, own, own.clone(), renormalize=True)
    assert torch.equal(ids, own) and weights.dtype == torch.bfloat16
    assert torch.equal(weights, (top / top.sum(dim=-1, keepdim=True)).to(torch.bfloat16))
