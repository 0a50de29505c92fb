"""``reload.process_in_place``: a processing step that registers new Parameters leaves the served ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rlhf_dist.weight_sync.reload import process_in_place


class _Experts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w13_weight = nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.tensor([5.0, 6.0]), requires_grad=False)


def _transpose_w13(layer: nn.Module) -> None:
    # what a prepacking step does: a new Parameter, same shape, another layout
    layer.w13_weight = nn.Parameter(layer.w13_weight.t().contiguous(), requires_grad=False)


def test_the_replaced_parameter_is_refilled_in_place_and_put_back():
    layer = _Experts()
    w13, w2 = layer.w13_weight, layer.w2_weight
    pointer = w13.data_ptr()
    process_in_place(layer, _transpose_w13)
    # [[1, 2], [3, 4]] transposed is [[1, 3], [2, 4]], in the same Parameter and storage
    assert layer.w13_weight is w13 and w13.data_ptr() == pointer
    assert torch.equal(w13, torch.tensor([[1.0, 3.0], [2.0, 4.0]]))
    assert layer.w2_weight is w2 and torch.equal(w2, torch.tensor([5.0, 6.0]))  # untouched


def test_a_step_that_changes_a_shape_is_refused():
    layer = _Experts()

    def pad(module: nn.Module) -> None:
        module.w2_weight = nn.Parameter(torch.zeros(4), requires_grad=False)

    # a padded copy cannot be served in the place of the tensor it pads
    with pytest.raises(RuntimeError, match=r"_Experts.w2_weight: processing made \(4,\)"):
        process_in_place(layer, pad)
