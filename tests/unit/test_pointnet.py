"""The zoo's PointNet: order-invariant global feature and logits, per-point features that follow their point and
see the whole shape."""

from __future__ import annotations

import pytest
import torch

from alambic.errors import AlambicError
from alambic.models.heads import DEFAULT_FEATURES
from alambic.models.pointnet import PointNetConfig
from alambic.models.taps import Taps
from alambic.models.zoo import build_model
from alambic.recipe.schema import ModelSpec
from alambic.registry import MODELS


def _net(**kw):
    spec = ModelSpec(arch="pointnet", **kw)
    spec._options = MODELS.get("pointnet").config.model_validate(spec.raw_options())
    return build_model(spec, (20, 2), 5).eval()


def test_logits_and_the_pooled_feature_ignore_the_order_of_the_points():
    torch.manual_seed(0)
    net = _net(widths=[8, 16], point_dim=4)
    x = torch.randn(3, 20, 2)
    perm = torch.randperm(20)
    with Taps(net, ["pool", "point_head"]) as taps:
        logits = net(x)
        out = taps.take()
        logits_p = net(x[:, perm])
        out_p = taps.take()
    assert logits.shape == (3, 5) and out["pool"].shape == (3, 16) and out["point_head"].shape == (3, 20, 4)
    assert torch.allclose(logits, logits_p, atol=1e-6) and torch.allclose(out["pool"], out_p["pool"], atol=1e-6)
    assert torch.allclose(out["point_head"][:, perm], out_p["point_head"], atol=1e-6)  # each feature follows its point


def test_a_points_feature_depends_on_the_other_points():
    """The per-point head sees the global feature: moving one point changes the features of the others (a
    feature of a point's own coordinates alone could not say which shape it belongs to)."""
    torch.manual_seed(1)
    net = _net(widths=[8, 16], point_dim=4)
    x = torch.randn(1, 20, 2)
    y = x.clone()
    y[0, 0] += 5.0
    with Taps(net, ["point_head"]) as taps:
        net(x)
        a = taps.take()["point_head"]
        net(y)
        b = taps.take()["point_head"]
    assert not torch.allclose(a[0, 1:], b[0, 1:])


def test_the_representation_is_the_pooled_feature_and_bad_shapes_are_one_line():
    assert DEFAULT_FEATURES["pointnet"] == "pool"
    with pytest.raises(AlambicError, match=r"point clouds \[P, d\]"):
        MODELS.get("pointnet").obj(PointNetConfig(), (1, 8, 8), 10)
    with pytest.raises(AlambicError, match=r"wants point clouds \[B, P, d\]"):
        _net()(torch.zeros(2, 40))
