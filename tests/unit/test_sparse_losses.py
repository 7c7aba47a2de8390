"""Divergences against a teacher's top-k (``alambic.losses.sparse_sequence``): exact values on tiny tensors,
equality with the dense divergences at k = V (values and gradients), the tail bucket's bounds."""

from __future__ import annotations

import math

import pytest
import torch

from alambic.errors import ShapeMismatchError
from alambic.losses import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    sparse_forward_kl,
    sparse_generalized_jsd,
    sparse_reverse_kl,
    sparse_skew_kl,
    sparse_skew_reverse_kl,
    sparse_total_variation,
    total_variation,
)
from alambic.losses.sparse_sequence import log1mexp

PAIRS = {
    "forward_kl": (forward_kl, sparse_forward_kl, {}),
    "reverse_kl": (reverse_kl, sparse_reverse_kl, {}),
    "jsd": (generalized_jsd, sparse_generalized_jsd, {"beta": 0.3}),
    "skew_kl": (skew_kl, sparse_skew_kl, {"alpha": 0.2}),
    "skew_reverse_kl": (skew_reverse_kl, sparse_skew_reverse_kl, {"alpha": 0.2}),
    "tv": (total_variation, sparse_total_variation, {}),
}
B, T, V = 2, 5, 7


def tensors(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    t = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    mask = torch.tensor([[True, False, True, True, False], [False, True, True, True, True]])
    return s, t, mask


def topk(t, k, shuffle_seed=None):
    lp, ids = t.log_softmax(-1).topk(k, -1)
    if shuffle_seed is not None:  # order inside a row must not matter
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(shuffle_seed))
        lp, ids = lp[..., perm], ids[..., perm]
    return ids, lp


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_with_k_equal_v_the_cached_loss_is_the_dense_loss_in_value_and_gradient(name, tail, chunk_size):
    dense_fn, sparse_fn, kw = PAIRS[name]
    s, t, mask = tensors()
    ids, lp = topk(t, V, shuffle_seed=1)
    s1 = s.clone().requires_grad_(True)
    s2 = s.clone().requires_grad_(True)
    dense = dense_fn(s1, t, mask, chunk_size=chunk_size, **kw)
    sparse = sparse_fn(s2, ids, lp, mask, tail=tail, chunk_size=chunk_size, **kw)
    dense.backward()
    sparse.backward()
    assert torch.allclose(sparse, dense, rtol=1e-12, atol=1e-14)
    assert torch.allclose(s2.grad, s1.grad, rtol=1e-10, atol=1e-14)
    assert s2.grad[~mask].abs().max() == 0


def test_exact_values_of_both_tail_policies_on_a_four_token_vocabulary():
    p_t = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    p_s = torch.tensor([0.4, 0.4, 0.1, 0.1], dtype=torch.float64)
    ids = torch.tensor([[0, 1]])
    lp = p_t.log()[:2][None]
    z = p_s.log()[None] + 3.0  # any shift of the logits: same distribution
    bucket = sparse_forward_kl(z, ids, lp, tail="bucket")
    want = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(0.3 / 0.4) + 0.2 * math.log(0.2 / 0.2)
    assert bucket.item() == pytest.approx(want, rel=1e-12)
    renorm = sparse_forward_kl(z, ids, lp, tail="renormalize")
    assert renorm.item() == pytest.approx(5 / 8 * math.log(5 / 4) + 3 / 8 * math.log(3 / 4), rel=1e-12)
    rev = sparse_reverse_kl(z, ids, lp, tail="bucket")
    assert rev.item() == pytest.approx(0.4 * math.log(0.4 / 0.5) + 0.4 * math.log(0.4 / 0.3), rel=1e-12)
    # the tail stored by a cache (here 0.2 exactly) gives the same as the one derived from the top-k
    stored = sparse_forward_kl(z, ids, lp, tail="bucket", tail_logprob=torch.tensor([math.log(0.2)],
                                                                                  dtype=torch.float64))
    assert stored.item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name", list(PAIRS))
def test_below_v_the_bucket_is_nonnegative_zero_at_equality_and_at_most_the_dense_divergence(name):
    dense_fn, sparse_fn, kw = PAIRS[name]
    for seed in range(3):
        s, t, mask = tensors(seed)
        for k in (1, 3, 6):
            ids, lp = topk(t, k)
            value = sparse_fn(s, ids, lp, mask, tail="bucket", **kw)
            assert value >= 0
            # coarse-graining never increases an f-divergence (data processing inequality)
            assert value <= dense_fn(s, t, mask, **kw) + 1e-12
            assert sparse_fn(t, ids, lp, mask, tail="bucket", **kw).abs() < 1e-12
            assert sparse_fn(t, ids, lp, mask, tail="renormalize", **kw).abs() < 1e-12


def test_renormalize_at_a_temperature_is_the_tempered_dense_divergence_when_k_is_v():
    s, t, mask = tensors()
    ids, lp = topk(t, V)
    for tau in (0.5, 2.0):
        dense = forward_kl(s, t, mask, temperature=tau, scale_t2=True)
        sparse = sparse_forward_kl(s, ids, lp, mask, tail="renormalize", temperature=tau, scale_t2=True)
        assert torch.allclose(sparse, dense, rtol=1e-12)
    with pytest.raises(ValueError, match="tail='bucket' needs temperature=1"):
        sparse_forward_kl(s, ids, lp, mask, tail="bucket", temperature=2.0)


def test_a_teacher_whose_top_k_holds_all_its_mass_gives_finite_values_and_gradients():
    s, _, mask = tensors(dtype=torch.float32)
    t = torch.full((B, T, V), -math.inf)
    t[..., :2] = torch.tensor([1.0, 0.0])  # two tokens hold all the mass: tail = 0 exactly
    ids, lp = topk(t, 3)  # the third entry is -inf
    for fn, kw in ((sparse_forward_kl, {}), (sparse_generalized_jsd, {}), (sparse_total_variation, {})):
        for tail in ("bucket", "renormalize"):
            x = s.clone().requires_grad_(True)
            value = fn(x, ids, lp, mask, tail=tail, **kw)
            value.backward()
            assert torch.isfinite(value) and torch.isfinite(x.grad).all(), (fn.__name__, tail)
    # the reverse KL is +inf where the student has tail mass and the teacher none, as the divergence is
    assert sparse_reverse_kl(s, ids, lp, mask, tail="bucket") == math.inf


def test_masked_positions_never_leak_and_num_tokens_sums_chunks():
    s, t, mask = tensors()
    ids, lp = topk(t, 3)
    garbage = s.clone()
    garbage[~mask] = math.nan
    x = garbage.clone().requires_grad_(True)
    value = sparse_forward_kl(x, ids, lp, mask)
    value.backward()
    assert value == sparse_forward_kl(s, ids, lp, mask) and torch.isfinite(x.grad).all()
    n = int(mask.sum())
    halves = sum(sparse_forward_kl(s[i:i + 1], ids[i:i + 1], lp[i:i + 1], mask[i:i + 1], num_tokens=n)
                 for i in range(B))
    assert torch.allclose(halves, sparse_forward_kl(s, ids, lp, mask), rtol=1e-12)
    empty = sparse_forward_kl(s.clone().requires_grad_(True), ids, lp, torch.zeros_like(mask))
    assert empty == 0


def test_float16_log_probs_are_widened_and_bf16_logits_computed_in_float32():
    s, t, mask = tensors(dtype=torch.float32)
    ids, lp = topk(t, 4)
    value = sparse_forward_kl(s.bfloat16(), ids.to(torch.int32), lp.half(), mask)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(sparse_forward_kl(s.bfloat16().float(), ids, lp.half().float(), mask).item(),
                                         rel=1e-6)


def test_bad_inputs_are_refused_in_one_line():
    s, t, mask = tensors()
    ids, lp = topk(t, 3)
    with pytest.raises(ShapeMismatchError, match=r"ids \(2, 5, 3\) and log-probs \(2, 5, 2\)"):
        sparse_forward_kl(s, ids, lp[..., :2])
    with pytest.raises(ValueError, match="tail must be one of renormalize, bucket"):
        sparse_forward_kl(s, ids, lp, tail="drop")
    with pytest.raises(TypeError, match="topk_ids must be integer"):
        sparse_forward_kl(s, ids.double(), lp)
    with pytest.raises(ShapeMismatchError, match="tail_logprob goes with tail='bucket'"):
        sparse_forward_kl(s, ids, lp, tail="renormalize", tail_logprob=lp[..., 0])
    with pytest.raises(ValueError, match="for beta=0 use sparse_forward_kl"):
        sparse_generalized_jsd(s, ids, lp, beta=0.0)


def test_log1mexp_is_accurate_at_both_ends_and_empty_at_zero():
    x = torch.tensor([-1e-10, -0.5, -50.0, 0.0, 1e-7], dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    assert y[0].item() == pytest.approx(math.log(1e-10), rel=1e-8)
    assert y[1].item() == pytest.approx(math.log(1 - math.exp(-0.5)), rel=1e-14)
    assert y[2].item() == pytest.approx(-math.exp(-50.0), rel=1e-12)
    assert y[3] == -math.inf and y[4] == -math.inf
    y[1].backward()
    assert torch.isfinite(x.grad).all() and x.grad[3] == 0
