"""The engine side of routing replay without an engine: how ``RoutingCapture`` files the rows of
each forward pass (as vLLM's V1 runner lays them out) under their requests' positions. The engine
itself records in tests/integration/test_architectures.py (qwen3-moe, algo.routing_replay)."""

from __future__ import annotations

import torch

from rlhf_dist.roles.routing_capture import RoutingCapture, external_id, request_routing


def _capture(layers: int = 2, k: int = 2) -> RoutingCapture:
    capture = RoutingCapture()  # vLLM mixes it into its worker; here only its bookkeeping runs
    capture.routing_shape, capture.routing, capture.routing_rows = (layers, k), {}, []
    return capture


def _pass(capture: RoutingCapture, rows: list[tuple[str, int, int]], base: int, padded: int = 0) -> None:
    """One forward pass: each layer's (tokens, k) ids are base + 10 * layer + the row's index."""
    capture.routing_rows = rows
    tokens = sum(n for _, _, n in rows) + padded
    for layer in range(capture.routing_shape[0]):
        ids = torch.arange(tokens)[:, None].expand(tokens, 2) + base + 10 * layer
        capture._capture_routing(layer, ids)


def test_each_rows_routing_lands_at_its_requests_positions():
    capture = _capture()
    # step 1: request a's prompt (3 tokens) and b's (2): rows 0-2 are a's, 3-4 b's
    _pass(capture, [("a", 0, 3), ("b", 0, 2)], base=100)
    # step 2: one decode token each, b first now (the batch's order), padded to 4 rows (CUDA graph sizes)
    _pass(capture, [("b", 2, 1), ("a", 3, 1)], base=200, padded=2)
    a, b = capture.take_routing(["a", "b"])
    assert a.dtype == torch.int16 and a.shape == (4, 2, 2)
    assert a[:, 0, 0].tolist() == [100, 101, 102, 201] and a[:, 1, 0].tolist() == [110, 111, 112, 211]
    assert b[:, 0, 0].tolist() == [103, 104, 200]
    assert capture.take_routing(["a"]) == [None]  # taken once


def test_a_pass_with_fewer_rows_than_scheduled_is_not_filed_and_forget_rest_drops_the_untaken():
    capture = _capture()
    capture.routing_rows = [("a", 0, 5)]
    capture._capture_routing(0, torch.zeros(3, 2, dtype=torch.long))  # a warm-up pass of 3 tokens
    assert capture.routing == {}
    _pass(capture, [("a", 0, 2), ("probe", 0, 3)], base=0)
    (a,) = capture.take_routing(["a"], forget_rest=True)
    assert a.shape == (2, 2, 2) and capture.routing == {}


def test_unrecorded_positions_are_minus_one_and_ids_are_vllms_without_their_suffix():
    route = request_routing({0: torch.ones(2, 1, 2, dtype=torch.int16), 4: torch.ones(1, 1, 2, dtype=torch.int16)}, 1, 2)
    assert route[:, 0, 0].tolist() == [1, 1, -1, -1, 1]
    assert external_id("17-3fa9c2d1") == "17" and external_id("req-7-0a1b2c3d") == "req-7"
