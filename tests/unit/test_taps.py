"""Taps capture the right tensors by dotted path and leave no hook behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alambic.errors import AlambicError
from alambic.models import MLP, SmallCNN, Taps


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_taps_capture_the_named_submodule_outputs_and_are_removed():
    torch.manual_seed(0)
    model = MLP(8, [5, 3], 2)
    x = torch.randn(4, 8)
    expected_act0 = torch.relu(model.body.fc0(x))
    expected_act1 = torch.relu(model.body.fc1(expected_act0))
    with Taps(model, ["body.act0", "body.act1"]) as taps:
        logits = model(x)
        assert torch.equal(taps["body.act0"], expected_act0)
        assert torch.equal(taps["body.act1"], expected_act1)
        assert hook_count(model) == 2
    assert hook_count(model) == 0
    assert torch.equal(logits, model.head(expected_act1))


def test_hooks_are_removed_even_when_the_forward_fails():
    model = MLP(8, [5], 2)
    with pytest.raises(RuntimeError):
        with Taps(model, ["body.act0"]):
            model(torch.randn(2, 7))  # wrong width
    assert hook_count(model) == 0


def test_tapped_features_keep_their_graph_unless_detached():
    model = MLP(8, [5], 2)
    with Taps(model, ["body.act0"]) as taps:
        model(torch.randn(3, 8))
        taps["body.act0"].sum().backward()
    assert model.body.fc0.weight.grad is not None
    with Taps(model, ["body.act0"], detach=True) as taps:
        model(torch.randn(3, 8))
        assert not taps["body.act0"].requires_grad


def test_conv_taps_have_map_shapes():
    model = SmallCNN(1, (8, 8), [4, 6], 3)
    with Taps(model, ["features.block0", "features.block1", "pool"]) as taps:
        model(torch.randn(2, 1, 8, 8))
        shapes = {k: tuple(v.shape) for k, v in taps.take().items()}
    assert shapes == {"features.block0": (2, 4, 4, 4), "features.block1": (2, 6, 2, 2), "pool": (2, 6)}


def test_unknown_path_names_the_missing_part_and_children_without_attaching():
    model = MLP(8, [5], 2)
    with pytest.raises(AlambicError) as info:
        Taps(model, ["body.act0", "body.act9"])
    assert str(info.value) == "tap 'body.act9': body has no submodule 'act9' (children: fc0, act0)"
    assert hook_count(model) == 0


def test_take_reports_taps_that_never_ran():
    model = MLP(8, [5], 2)
    with Taps(model, ["body.act0"]) as taps:
        with pytest.raises(AlambicError, match="captured nothing"):
            taps.take()
