"""Cross-modal losses: region pooling, SLidR / PPKT InfoNCE, COMODO queue distributions, region contrast, lifting.

Expected values are computed with NumPy from the papers' equations (and the official code's details named
in the docstrings), never by calling the function under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses import (
    comodo_loss,
    feature_correlation_loss,
    feature_lifting_loss,
    info_nce_loss,
    offset_ids,
    ppkt_loss,
    queue_push,
    region_contrast_loss,
    scatter_mean,
    slidr_loss,
    slidr_pool,
)
from tests.reference import np_softmax


def close(actual, expected, rtol=1e-9, atol=1e-10) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


def f64(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=grad)


def np_log_softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_info_nce(a, p, tau) -> float:
    """−mean_i log softmax_j(a_i·p_j/τ)[i] (CPC Eq. 4, SLidR's NCELoss)."""
    logits = np.asarray(a) @ np.asarray(p).T / tau
    return float(-np.mean(np.diag(np_log_softmax(logits))))


# --- pooling ------------------------------------------------------------------------------------------

def test_scatter_mean_means_each_region_ignores_negative_ids_and_leaves_empty_regions_zero():
    values = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0], [5.0, 5.0], [100.0, 100.0]])
    ids = torch.tensor([0, 0, 2, 2, -1])
    out = scatter_mean(f64(values), ids, 4).numpy()
    close(out, [[2.0, 3.0], [0.0, 0.0], [7.5, 2.5], [0.0, 0.0]])


def test_scatter_mean_gradient_is_one_over_the_region_size_and_zero_for_ignored_rows():
    v = f64(np.ones((4, 3)), grad=True)
    scatter_mean(v, torch.tensor([1, 1, 0, -1]), 2).sum().backward()
    close(v.grad.numpy()[:, 0], [0.5, 0.5, 1.0, 0.0])


def test_scatter_mean_rejects_out_of_range_ids_and_float_ids():
    with pytest.raises(AlambicError):
        scatter_mean(f64(np.ones((2, 2))), torch.tensor([0, 3]), 3)
    with pytest.raises(ShapeMismatchError):
        scatter_mean(f64(np.ones((2, 2))), torch.tensor([0.0, 1.0]), 3)


def test_offset_ids_makes_ids_unique_across_the_batch_and_keeps_negatives_negative():
    ids = torch.tensor([[[0, 1], [2, -1]], [[0, 1], [2, 2]]])
    out = offset_ids(ids, 3)
    assert out.tolist() == [[[0, 1], [2, -1]], [[3, 4], [5, 5]]]
    with pytest.raises(AlambicError):
        offset_ids(ids, 2)


# --- InfoNCE ------------------------------------------------------------------------------------------

def test_info_nce_equals_cross_entropy_with_the_diagonal_as_target_and_the_formula():
    rng = np.random.default_rng(0)
    a, p = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    loss = info_nce_loss(f64(a), f64(p), 0.07)
    ce = F.cross_entropy(f64(a) @ f64(p).T / 0.07, torch.arange(5))
    close(loss.item(), ce.item())
    close(loss.item(), np_info_nce(a, p, 0.07))


def test_info_nce_gradient_reaches_both_sides():
    rng = np.random.default_rng(1)
    a, p = f64(rng.normal(size=(3, 2)), grad=True), f64(rng.normal(size=(3, 2)), grad=True)
    info_nce_loss(a, p, 0.5).backward()
    assert a.grad.abs().sum() > 0 and p.grad.abs().sum() > 0


# --- SLidR --------------------------------------------------------------------------------------------

def _slidr_scene():
    """Two 2x2 images, D = 2. Both images use local superpixel ids 0 (top row) and 1 (bottom row).

    Points: 0, 1 -> image 0 superpixel 0; 2 -> image 0 superpixel 1; 3 -> image 1 superpixel 0;
    point 4 is unpaired; image 1 superpixel 1 has no paired point (empty, must be dropped).
    """
    rng = np.random.default_rng(2)
    points = rng.normal(size=(5, 2))
    images = rng.normal(size=(2, 2, 2, 2))  # [I, D, H, W]
    superpixels = torch.tensor([[[0, 0], [1, 1]], [[0, 0], [1, 1]]])
    pairing_points = torch.tensor([0, 1, 2, 3])
    pairing_images = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 1]])
    return points, images, superpixels, pairing_points, pairing_images


def _np_slidr_expected(points, images):
    pix = images.transpose(0, 2, 3, 1)  # [I, H, W, D]
    k = np.stack([points[[0, 1]].mean(0), points[2], points[3]])
    q = np.stack([pix[0, 0].mean(0), pix[0, 1].mean(0), pix[1, 0].mean(0)])
    return k, q


def test_slidr_pool_pools_paired_points_and_all_pixels_per_superpixel_unique_across_the_batch():
    points, images, sp, pp, pi = _slidr_scene()
    k, q = slidr_pool(f64(points), f64(images), sp, pp, pi, num_superpixels=2)
    k_exp, q_exp = _np_slidr_expected(points, images)
    # 3 regions: the empty one is dropped; image 0's and image 1's superpixel 0 are NOT pooled together
    # (without the per-image offset they would share id 0 and this would be 2 rows of mixed means)
    assert k.shape == (3, 2) and q.shape == (3, 2)
    close(k.numpy(), k_exp)
    close(q.numpy(), q_exp)


def test_slidr_pooled_vectors_are_not_renormalised():
    points, images, sp, pp, pi = _slidr_scene()
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    k, _ = slidr_pool(f64(unit), f64(images), sp, pp, pi, num_superpixels=2)
    mean01 = unit[[0, 1]].mean(0)
    close(k[0].numpy(), mean01)
    assert np.linalg.norm(mean01) < 0.999  # the mean of two distinct unit vectors is shorter than 1


def test_slidr_loss_value_equals_infonce_over_the_pooled_superpixels_and_is_finite_with_empty_ones():
    points, images, sp, pp, pi = _slidr_scene()
    loss = slidr_loss(f64(points), f64(images), sp, pp, pi, num_superpixels=2, temperature=0.07)
    k_exp, q_exp = _np_slidr_expected(points, images)
    assert torch.isfinite(loss)
    close(loss.item(), np_info_nce(k_exp, q_exp, 0.07))


def test_slidr_ignores_unpaired_points_and_duplicated_points_do_not_change_the_loss():
    points, images, sp, pp, pi = _slidr_scene()
    base = slidr_loss(f64(points), f64(images), sp, pp, pi, num_superpixels=2).item()
    moved = points.copy()
    moved[4] = [1e3, -1e3]  # the unpaired point
    close(slidr_loss(f64(moved), f64(images), sp, pp, pi, num_superpixels=2).item(), base)
    # point 2 paired twice more (same pixel): its superpixel's mean is unchanged, so is the loss
    pp2 = torch.cat([pp, torch.tensor([2, 2])])
    pi2 = torch.cat([pi, torch.tensor([[0, 1, 0], [0, 1, 0]])])
    close(slidr_loss(f64(points), f64(images), sp, pp2, pi2, num_superpixels=2).item(), base)


def test_slidr_gradient_reaches_points_and_pixels_but_not_unpaired_points():
    points, images, sp, pp, pi = _slidr_scene()
    p, im = f64(points, grad=True), f64(images, grad=True)
    slidr_loss(p, im, sp, pp, pi, num_superpixels=2).backward()
    assert p.grad[:4].abs().sum(1).min() > 0
    assert p.grad[4].abs().sum() == 0
    # every pixel of a kept superpixel has gradient (the 2D decoder trains); the empty one's pixels do not
    g = im.grad.abs().sum(1)  # [I, H, W]
    assert g[0].min() > 0 and g[1, 0].min() > 0 and g[1, 1].sum() == 0


def test_slidr_rejects_ids_beyond_the_per_image_range():
    points, images, sp, pp, pi = _slidr_scene()
    with pytest.raises(AlambicError):
        slidr_pool(f64(points), f64(images), sp, pp, pi, num_superpixels=1)


# --- PPKT ---------------------------------------------------------------------------------------------

def test_ppkt_with_all_pairs_equals_infonce_over_the_paired_point_pixel_features():
    points, images, _, pp, pi = _slidr_scene()
    pix = images.transpose(0, 2, 3, 1)
    k = points[[0, 1, 2, 3]]
    q = np.stack([pix[b, r, c] for b, r, c in pi.tolist()])
    loss = ppkt_loss(f64(points), f64(images), pp, pi, num_matches=100, temperature=0.07,
                     generator=torch.Generator().manual_seed(0))
    close(loss.item(), np_info_nce(k, q, 0.07))  # a joint permutation of the rows leaves InfoNCE unchanged


def test_ppkt_samples_num_matches_pairs_reproducibly():
    rng = np.random.default_rng(3)
    points, images = rng.normal(size=(40, 3)), rng.normal(size=(1, 3, 8, 8))
    pp = torch.arange(40)
    pi = torch.stack([torch.zeros(40, dtype=torch.long), torch.arange(40) // 8, torch.arange(40) % 8], 1)
    a = ppkt_loss(f64(points), f64(images), pp, pi, num_matches=7, generator=torch.Generator().manual_seed(5))
    b = ppkt_loss(f64(points), f64(images), pp, pi, num_matches=7, generator=torch.Generator().manual_seed(5))
    assert a.item() == b.item()
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(5))[:7].numpy()
    pix = images.transpose(0, 2, 3, 1)[0]
    q = np.stack([pix[i // 8, i % 8] for i in idx])
    close(a.item(), np_info_nce(points[idx], q, 0.07))


# --- COMODO -------------------------------------------------------------------------------------------

def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_comodo(z_x, z_v, queue, tau_s, tau_t) -> float:
    keys = np.concatenate([queue, z_v])
    p_v = np_softmax(z_v @ keys.T / tau_t)
    log_p_x = np_log_softmax(_unit(z_x) @ keys.T / tau_s)
    return float(-(p_v * log_p_x).sum() / z_x.shape[0])


def test_comodo_loss_value_from_the_formula_with_the_batch_as_extra_keys():
    rng = np.random.default_rng(4)
    z_x, z_v, queue = rng.normal(size=(3, 4)), _unit(rng.normal(size=(3, 4))), _unit(rng.normal(size=(6, 4)))
    loss = comodo_loss(f64(z_x), f64(z_v), f64(queue), 0.05, 0.1)
    close(loss.item(), np_comodo(z_x, z_v, queue, 0.05, 0.1))
    # the keys are a set: the queue's order (ring buffer vs shifted queue) does not matter
    close(comodo_loss(f64(z_x), f64(z_v), f64(queue[::-1].copy()), 0.05, 0.1).item(), loss.item())


def test_comodo_gradient_reaches_the_student_only():
    rng = np.random.default_rng(5)
    z_x = f64(rng.normal(size=(2, 3)), grad=True)
    z_v = f64(_unit(rng.normal(size=(2, 3))), grad=True)
    q = f64(_unit(rng.normal(size=(4, 3))), grad=True)
    comodo_loss(z_x, z_v, q).backward()
    assert z_x.grad.abs().sum() > 0
    assert z_v.grad is None and q.grad is None


def test_comodo_at_equal_temperatures_and_student_equal_teacher_is_the_teacher_entropy_its_minimum():
    rng = np.random.default_rng(6)
    z_v, queue = _unit(rng.normal(size=(3, 4))), _unit(rng.normal(size=(5, 4)))
    at_teacher = comodo_loss(f64(z_v), f64(z_v), f64(queue), 0.1, 0.1).item()
    p_v = np_softmax(z_v @ np.concatenate([queue, z_v]).T / 0.1)
    close(at_teacher, float(-(p_v * np.log(p_v)).sum() / 3))
    for _ in range(5):
        other = comodo_loss(f64(rng.normal(size=(3, 4))), f64(z_v), f64(queue), 0.1, 0.1).item()
        assert other > at_teacher


def test_queue_push_is_fifo_with_wrap_around_and_matches_the_official_shifted_queue():
    rng = np.random.default_rng(7)
    queue = f64(rng.normal(size=(5, 2)))
    official, ptr = queue.clone(), 0  # official COMODO: Q <- cat(Q, z)[B:]
    for step in range(6):  # B = 2 does not divide K = 5: writes wrap around the end
        batch = f64(rng.normal(size=(2, 2)))
        prev, snapshot = queue, queue.clone()
        queue, ptr = queue_push(prev, ptr, batch)
        official = torch.cat([official, batch])[2:]
        assert torch.equal(prev, snapshot)  # the input queue is not modified
        assert queue.shape == (5, 2) and ptr == (2 * (step + 1)) % 5
        oldest_first = torch.roll(queue, -ptr, 0)
        assert torch.equal(oldest_first, official)
        assert torch.equal(oldest_first[-2:], batch)  # the batch is the newest keys, in order


def test_queue_push_does_not_modify_its_input_and_keeps_the_newest_k_when_the_batch_is_longer():
    queue = torch.zeros(3, 1)
    new, ptr = queue_push(queue, 1, torch.arange(5.0)[:, None])
    assert torch.equal(queue, torch.zeros(3, 1))
    assert ptr == (1 + 5) % 3
    assert torch.roll(new, -ptr, 0).flatten().tolist() == [2.0, 3.0, 4.0]
    with pytest.raises(AlambicError):
        queue_push(queue, 3, torch.zeros(1, 1))


def test_queue_push_output_has_no_gradient():
    keys = torch.ones(2, 2, requires_grad=True)
    new, _ = queue_push(torch.zeros(4, 2), 0, keys * 2)
    assert not new.requires_grad


# --- region contrast ----------------------------------------------------------------------------------

def test_region_contrast_value_uses_same_region_cross_modal_positives_over_shared_regions():
    rng = np.random.default_rng(8)
    s, t = rng.normal(size=(6, 3)), rng.normal(size=(5, 3))
    s_reg, t_reg = torch.tensor([0, 0, 1, 2, 2, 3]), torch.tensor([0, 1, 1, 2, -1])
    # region 3 has no teacher member: dropped; teacher row 4 is in no region
    s_pool = np.stack([s[[0, 1]].mean(0), s[2], s[[3, 4]].mean(0)])
    t_pool = np.stack([t[0], t[[1, 2]].mean(0), t[3]])
    loss = region_contrast_loss(f64(s), f64(t), s_reg, t_reg, num_regions=4, temperature=0.2)
    close(loss.item(), np_info_nce(_unit(s_pool), _unit(t_pool), 0.2))
    raw = region_contrast_loss(f64(s), f64(t), s_reg, t_reg, num_regions=4, temperature=0.2, normalize=False)
    close(raw.item(), np_info_nce(s_pool, t_pool, 0.2))


def test_region_contrast_teacher_side_is_constant():
    rng = np.random.default_rng(9)
    s, t = f64(rng.normal(size=(4, 2)), grad=True), f64(rng.normal(size=(4, 2)), grad=True)
    ids = torch.tensor([0, 1, 2, 3])
    region_contrast_loss(s, t, ids, ids, 4).backward()
    assert s.grad.abs().sum() > 0 and t.grad is None


# --- 2D-to-3D lifting (3D-OVS) --------------------------------------------------------------------------

def test_feature_lifting_is_one_minus_mean_cosine_zero_at_a_scaled_match_and_teacher_constant():
    rng = np.random.default_rng(10)
    r, t = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    cos = (_unit(r) * _unit(t)).sum(1)
    close(feature_lifting_loss(f64(r), f64(t)).item(), 1 - cos.mean())
    close(feature_lifting_loss(f64(3.0 * t), f64(t)).item(), 0.0, atol=1e-12)
    rr, tt = f64(r, grad=True), f64(t, grad=True)
    feature_lifting_loss(rr, tt).backward()
    assert rr.grad.abs().sum() > 0 and tt.grad is None


def _np_pairwise(p, kind):
    """[L, L] KL(p_i||p_j) or JS(p_i, p_j) for one patch, written out pair by pair."""
    n = p.shape[0]
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if kind == "kl":
                out[i, j] = np.sum(p[i] * np.log(p[i] / p[j]))
            else:
                m = (p[i] + p[j]) / 2
                out[i, j] = 0.5 * np.sum(p[i] * np.log(p[i] / m)) + 0.5 * np.sum(p[j] * np.log(p[j] / m))
    return out


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_feature_correlation_value_from_the_shifted_teacher_correlation_and_pairwise_divergence(kind):
    rng = np.random.default_rng(11)
    logits, feats = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 4, 5))
    log_p = np_log_softmax(logits)
    shift, wp, wn = 0.1, 2.0, 0.5
    corr = np.stack([_unit(f) @ _unit(f).T for f in feats]) - shift
    d = np.stack([_np_pairwise(np.exp(lp), kind) for lp in log_p])
    pos, neg = np.clip(corr, 0, None), np.clip(corr, None, 0)
    expected = wp * (pos * d).sum() / np.count_nonzero(pos) + wn * (neg * d).sum() / np.count_nonzero(neg)
    loss = feature_correlation_loss(f64(log_p), f64(feats), shift, wp, wn, divergence=kind)
    close(loss.item(), expected, rtol=1e-8)


def test_feature_correlation_teacher_constant_and_an_empty_side_gives_zero_not_nan():
    rng = np.random.default_rng(12)
    lp = f64(np_log_softmax(rng.normal(size=(1, 3, 4))), grad=True)
    feats = f64(rng.normal(size=(1, 3, 2)), grad=True)
    # shift -2: every correlation is > 0, so there is no negative pair; shift 2: no positive pair
    for shift in (-2.0, 2.0):
        loss = feature_correlation_loss(lp, feats, shift=shift)
        assert torch.isfinite(loss)
    feature_correlation_loss(lp, feats, shift=0.0).backward()
    assert lp.grad.abs().sum() > 0 and feats.grad is None
