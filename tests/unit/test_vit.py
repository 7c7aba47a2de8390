"""The tiny ViT (``arch: vit``): token layout, tappable q/k that are the ones attention uses, pooling, errors."""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch

from alambic.errors import AlambicError
from alambic.models import Taps
from alambic.models.vit import ViT, ViTConfig
from alambic.recipe import load_recipe
from alambic.registry import MODELS


def build(**cfg) -> ViT:
    torch.manual_seed(0)
    return MODELS.get("vit").obj(ViTConfig(**cfg), (1, 8, 8), 10)


@pytest.mark.parametrize("patch,pool,tokens", [(4, "cls", 5), (2, "cls", 17), (2, "mean", 16), (8, "cls", 2)])
def test_vit_token_count_and_tap_shapes(patch, pool, tokens):
    model = build(patch_size=patch, dim=8, depth=2, heads=2, pool=pool)
    paths = ["blocks.1.attn.q", "blocks.1.attn.k", "blocks.0.attn.softmax", "blocks.1", "pool", "patch_embed"]
    with Taps(model, paths) as taps:
        logits = model(torch.randn(3, 1, 8, 8))
        shapes = {p: tuple(taps[p].shape) for p in paths}
    assert logits.shape == (3, 10)
    assert shapes["blocks.1.attn.q"] == shapes["blocks.1.attn.k"] == shapes["blocks.1"] == (3, tokens, 8)
    assert shapes["blocks.0.attn.softmax"] == (3, 2, tokens, tokens)
    assert shapes["pool"] == (3, 8)
    assert shapes["patch_embed"] == (3, 8, 8 // patch, 8 // patch)


def test_tapped_q_and_k_are_the_ones_the_attention_uses():
    model = build(patch_size=4, dim=8, depth=1, heads=2).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    with Taps(model, ["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.softmax"]) as taps:
        model(x)
        q, k, attn = (taps[p].detach().numpy() for p in ("blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.softmax"))
    b, n, d = q.shape
    qh = q.reshape(b, n, 2, d // 2).transpose(0, 2, 1, 3)
    kh = k.reshape(b, n, 2, d // 2).transpose(0, 2, 1, 3)
    z = qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(d // 2)
    expected = np.exp(z - z.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(attn, expected, rtol=1e-10, atol=1e-12)


def test_cls_pool_reads_position_zero_and_mean_pool_averages_the_tokens():
    model = build(patch_size=4, dim=8, heads=2, pool="mean")
    x = torch.randn(2, 1, 8, 8)
    with Taps(model, ["norm", "pool"]) as taps:
        model(x)
        assert torch.allclose(taps["pool"], taps["norm"].mean(1), atol=1e-6)
    cls_model = build(patch_size=4, dim=8, heads=2, pool="cls")
    with Taps(cls_model, ["norm", "pool"]) as taps:
        cls_model(x)
        assert torch.equal(taps["pool"], taps["norm"][:, 0])


def test_every_parameter_gets_a_gradient():
    model = build(patch_size=2, dim=8, depth=2, heads=2)
    torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []
    assert {"cls_token", "pos_embed"} <= {n for n, _ in model.named_parameters()}


def test_position_embeddings_make_the_model_depend_on_patch_order():
    model = build(patch_size=4, dim=8, heads=2).eval()
    x = torch.randn(1, 1, 8, 8)
    swapped = torch.cat([x[..., 4:, :], x[..., :4, :]], dim=2)  # swap the top and bottom rows of patches
    assert not torch.allclose(model(x), model(swapped))


def test_vit_rejects_bad_shapes_and_options():
    with pytest.raises(AlambicError, match="patch_size 3"):
        build(patch_size=3)
    with pytest.raises(AlambicError, match=r"\[C, H, W\]"):
        MODELS.get("vit").obj(ViTConfig(), (64,), 10)
    with pytest.raises(pydantic.ValidationError, match="divisible by heads"):
        ViTConfig(dim=10, heads=4)
    with pytest.raises(pydantic.ValidationError):
        ViTConfig(patchsize=2)


def test_vit_is_a_recipe_architecture_for_students_and_teachers():
    recipe = load_recipe({"student": {"arch": "vit", "patch_size": 4, "dim": 16},
                          "teacher": {"model": {"arch": "vit", "dim": 32, "heads": 4}},
                          "method": {"name": "token_relation", "student_taps": "blocks.1.attn",
                                     "teacher_taps": "blocks.1.attn", "num_heads": 2}})
    assert recipe.student.options.dim == 16 and recipe.student.options.depth == 2
    assert recipe.teacher.model.options.heads == 4
