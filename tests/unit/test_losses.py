"""Loss functions against the papers' formulas, computed independently with numpy / math.

Hinton et al. 2015 (arXiv:1503.02531): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, batch mean.
SSLD (arXiv:2103.05959): Jensen–Shannon between teacher and student soft predictions.
Romero et al. 2015 (arXiv:1412.6550) Eq. 3: hint loss ``½‖u_h − r(v_g)‖²``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alambic.data.batch import IGNORE_INDEX
from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses import hint_loss, js_loss, kd_loss, masked_cross_entropy
from tests.reference import np_ce, np_kd, np_softmax

# A tiny fixed example: 2 samples, 3 classes.
S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
T_ = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]


def np_js(s, t, temp: float) -> float:
    p_s = np_softmax(np.asarray(s, dtype=np.float64) / temp)
    p_t = np_softmax(np.asarray(t, dtype=np.float64) / temp)
    m = 0.5 * (p_s + p_t)
    kl_t = (p_t * np.log(p_t / m)).sum(-1)
    kl_s = (p_s * np.log(p_s / m)).sum(-1)
    return float(temp**2 * (0.5 * (kl_t + kl_s)).mean())


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------- kd_loss


def test_kd_loss_matches_pure_math_hand_computation_row_by_row():
    # First row at T=2 spelled out with math only (no numpy), then the batch mean.
    temp = 2.0

    def row(s_row, t_row):
        zs = sum(math.exp(v / temp) for v in s_row)
        zt = sum(math.exp(v / temp) for v in t_row)
        ps = [math.exp(v / temp) / zs for v in s_row]
        pt = [math.exp(v / temp) / zt for v in t_row]
        return sum(a * math.log(a / b) for a, b in zip(pt, ps))

    expected = temp**2 * (row(S[0], T_[0]) + row(S[1], T_[1])) / 2
    got = kd_loss(f64(S), f64(T_), temperature=temp)
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # and the numpy form agrees, at a few temperatures
    for temp in (1.0, 4.0, 7.5):
        assert kd_loss(f64(S), f64(T_), temperature=temp).item() == pytest.approx(np_kd(S, T_, temp), rel=1e-12)


def test_kd_loss_is_not_symmetric_and_direction_is_kl_teacher_to_student():
    # KL(p_t ‖ p_s) and KL(p_s ‖ p_t) differ on this example: the function must compute the first.
    forward = np_kd(S, T_, 3.0)
    reverse = np_kd(T_, S, 3.0)
    assert abs(forward - reverse) > 1e-3
    assert kd_loss(f64(S), f64(T_), 3.0).item() == pytest.approx(forward, rel=1e-12)


def test_kd_loss_zero_with_zero_gradient_for_equal_logits():
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = x.clone().requires_grad_(True)
    loss = kd_loss(s, x.clone(), temperature=3.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert torch.allclose(s.grad, torch.zeros_like(s), atol=1e-12)


def test_kd_loss_is_positive_for_different_logits():
    assert kd_loss(f64(S), f64(T_), 2.0).item() > 0.0


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_kd_loss_invariant_to_per_row_constant_shift(side):
    s, t = f64(S), f64(T_)
    shift = f64([[5.0], [-3.0]])  # a different constant per row
    base = kd_loss(s, t, 2.0)
    shifted = kd_loss(s + shift, t, 2.0) if side == "student" else kd_loss(s, t + shift, 2.0)
    assert shifted.item() == pytest.approx(base.item(), rel=1e-12)


def test_kd_loss_teacher_gets_no_gradient_even_if_it_requires_grad():
    s = f64(S).requires_grad_(True)
    t = f64(T_).requires_grad_(True)
    kd_loss(s, t, 2.0).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kd_loss_gradient_matches_analytic_form():
    # d/ds [T² · mean_b KL] = T · (p_s − p_t) / B   (Hinton §2: ∂C/∂z_i = (q_i − p_i)/T, times T²)
    temp = 2.5
    s = f64(S).requires_grad_(True)
    kd_loss(s, f64(T_), temp).backward()
    p_s = np_softmax(np.asarray(S) / temp)
    p_t = np_softmax(np.asarray(T_) / temp)
    expected = temp * (p_s - p_t) / len(S)
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-10, atol=1e-12)


def _grad_norm(s0, t0, temp, *, undo_t2=False):
    s = s0.clone().requires_grad_(True)
    loss = kd_loss(s, t0, temp)
    if undo_t2:
        loss = loss / temp**2
    loss.backward()
    return s.grad.norm().item()


def test_t_squared_keeps_gradient_magnitude_roughly_constant_across_temperatures():
    g = torch.Generator().manual_seed(1)
    s0 = torch.randn(8, 10, generator=g, dtype=torch.float64)
    t0 = torch.randn(8, 10, generator=g, dtype=torch.float64)
    n1, n4, n20 = (_grad_norm(s0, t0, temp) for temp in (1.0, 4.0, 20.0))
    for n in (n4, n20):
        assert 0.2 < n / n1 < 5.0, (n1, n4, n20)
    # Without the T² factor the soft-target gradient shrinks like 1/T²: > 100× smaller at T=20.
    m1, m20 = _grad_norm(s0, t0, 1.0, undo_t2=True), _grad_norm(s0, t0, 20.0, undo_t2=True)
    assert m1 == pytest.approx(n1, rel=1e-12)  # T=1: the factor is 1
    assert m1 / m20 > 100.0, (m1, m20)


def test_kd_gradient_at_large_temperature_approaches_centred_logit_difference():
    # Hinton §2, high-temperature limit: ∂C/∂z_i ≈ (z_i − v_i)/(N T²) with zero-mean logits; with the T²
    # factor and the batch mean, the gradient tends to ((s − t) − row mean of (s − t)) / (C · B).
    g = torch.Generator().manual_seed(2)
    s0 = torch.randn(3, 6, generator=g, dtype=torch.float64)
    t0 = torch.randn(3, 6, generator=g, dtype=torch.float64)
    s = s0.clone().requires_grad_(True)
    kd_loss(s, t0, 1e4).backward()
    d = (s0 - t0).numpy()
    expected = (d - d.mean(-1, keepdims=True)) / (6 * 3)
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-3, atol=1e-8)


def test_kd_loss_treats_every_leading_position_as_a_sample():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    expected = np_kd(s.reshape(6, 4).numpy(), t.reshape(6, 4).numpy(), 2.0)
    assert kd_loss(s, t, 2.0).item() == pytest.approx(expected, rel=1e-12)


def test_kd_loss_shape_mismatch_names_both_shapes():
    with pytest.raises(ShapeMismatchError) as err:
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    msg = str(err.value)
    assert "(2, 3)" in msg and "(2, 4)" in msg
    assert isinstance(err.value, AlambicError)


@pytest.mark.parametrize("temp", [0.0, -1.0])
def test_kd_loss_rejects_non_positive_temperature(temp):
    with pytest.raises(ValueError):
        kd_loss(f64(S), f64(T_), temp)


# ----------------------------------------------------------------------------------------------- js_loss


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_js_loss_matches_numpy(temp):
    assert js_loss(f64(S), f64(T_), temp).item() == pytest.approx(np_js(S, T_, temp), rel=1e-12)


def test_js_loss_is_symmetric_in_value():
    g = torch.Generator().manual_seed(4)
    a = torch.randn(5, 7, generator=g, dtype=torch.float64)
    b = torch.randn(5, 7, generator=g, dtype=torch.float64)
    for temp in (1.0, 3.0):
        assert js_loss(a, b, temp).item() == pytest.approx(js_loss(b, a, temp).item(), rel=1e-12)
    # unlike KL, which is not symmetric on the same pair
    assert abs(kd_loss(a, b, 1.0).item() - kd_loss(b, a, 1.0).item()) > 1e-4


def test_js_loss_zero_for_equal_inputs_with_zero_gradient():
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    s = x.clone().requires_grad_(True)
    loss = js_loss(s, x.clone(), 2.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert torch.allclose(s.grad, torch.zeros_like(s), atol=1e-12)


@pytest.mark.parametrize("temp", [1.0, 2.0, 5.0])
def test_js_loss_bounded_by_ln2_times_t_squared(temp):
    g = torch.Generator().manual_seed(6)
    a = 10 * torch.randn(16, 5, generator=g, dtype=torch.float64)
    b = 10 * torch.randn(16, 5, generator=g, dtype=torch.float64)
    assert 0.0 <= js_loss(a, b, temp).item() <= math.log(2) * temp**2


def test_js_loss_reaches_ln2_for_disjoint_distributions():
    # Near one-hot on different classes: JS → ln 2 (times T² = 1 here).
    a = f64([[60.0, 0.0, 0.0]])
    b = f64([[0.0, 60.0, 0.0]])
    assert js_loss(a, b, 1.0).item() == pytest.approx(math.log(2), rel=1e-9)


def test_js_loss_teacher_gets_no_gradient():
    s = f64(S).requires_grad_(True)
    t = f64(T_).requires_grad_(True)
    js_loss(s, t, 1.0).backward()
    assert t.grad is None
    assert s.grad.abs().sum() > 0


def test_js_loss_shape_mismatch_names_both_shapes():
    with pytest.raises(ShapeMismatchError) as err:
        js_loss(torch.zeros(3, 5), torch.zeros(2, 5))
    assert "(3, 5)" in str(err.value) and "(2, 5)" in str(err.value)


@pytest.mark.parametrize("temp", [0.0, -1.0])
def test_js_loss_rejects_non_positive_temperature_like_kd_loss(temp):
    with pytest.raises(ValueError):
        js_loss(f64(S), f64(T_), temp)


# ---------------------------------------------------------------------------------- masked_cross_entropy


def test_masked_cross_entropy_equals_ce_over_labelled_rows_only():
    logits = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [4.0, 0.0, 0.0], [0.3, 0.2, 0.1]]
    target = [2, IGNORE_INDEX, 0, IGNORE_INDEX]
    x = f64(logits).requires_grad_(True)
    got = masked_cross_entropy(x, torch.tensor(target))
    expected = np_ce([logits[0], logits[2]], [2, 0])
    assert got.item() == pytest.approx(expected, rel=1e-12)
    got.backward()
    # unlabelled rows get exactly zero gradient; labelled rows get (p − onehot)/n_labelled
    assert torch.equal(x.grad[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(x.grad[3], torch.zeros(3, dtype=torch.float64))
    p0 = np_softmax(np.asarray(logits[0]))
    np.testing.assert_allclose(x.grad[0].numpy(), (p0 - np.eye(3)[2]) / 2, rtol=1e-10)


def test_masked_cross_entropy_value_independent_of_unlabelled_logits():
    target = torch.tensor([1, IGNORE_INDEX, 0])
    a = f64([[0.1, 0.9, 0.0], [5.0, 5.0, 5.0], [1.0, 0.0, 2.0]])
    b = a.clone()
    b[1] = f64([-30.0, 40.0, 7.0])
    assert masked_cross_entropy(a, target).item() == masked_cross_entropy(b, target).item()


def test_masked_cross_entropy_no_labelled_row_is_zero_and_backward_is_finite():
    x = f64([[1.0, 2.0], [3.0, 4.0]]).requires_grad_(True)
    loss = masked_cross_entropy(x, torch.tensor([IGNORE_INDEX, IGNORE_INDEX]))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert torch.equal(x.grad, torch.zeros_like(x))
    # whereas plain F.cross_entropy gives NaN here: the guard is what makes the difference
    plain = torch.nn.functional.cross_entropy(x.detach(), torch.tensor([IGNORE_INDEX, IGNORE_INDEX]))
    assert torch.isnan(plain)


def test_masked_cross_entropy_label_smoothing_formula():
    # (1 − ε)·(−log p_y) + ε·mean_c(−log p_c), averaged over the labelled rows.
    logits = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 2.0, 2.0]]
    eps = 0.2
    logp = np.log(np_softmax(np.asarray(logits)))
    rows = [(0, 1), (2, 0)]
    expected = np.mean([(1 - eps) * -logp[i, y] + eps * -logp[i].mean() for i, y in rows])
    got = masked_cross_entropy(f64(logits), torch.tensor([1, IGNORE_INDEX, 0]), label_smoothing=eps)
    assert got.item() == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------------------------------- hint_loss


def test_hint_loss_equals_half_batch_mean_squared_l2_vectors():
    u = [[1.0, 2.0, 3.0], [0.0, -1.0, 0.5]]
    v = [[0.0, 2.0, 5.0], [1.0, 1.0, 0.5]]
    # row 0: 1 + 0 + 4 = 5; row 1: 1 + 4 + 0 = 5 -> 0.5 * mean(5, 5) = 2.5
    assert hint_loss(f64(u), f64(v)).item() == pytest.approx(2.5, rel=1e-12)


def test_hint_loss_sums_over_every_non_batch_dimension_of_maps():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    b = torch.randn(3, 2, 4, 5, generator=g, dtype=torch.float64)
    d = (a - b).numpy()
    expected = 0.5 * np.mean([(d[i] ** 2).sum() for i in range(3)])
    assert hint_loss(a, b).item() == pytest.approx(float(expected), rel=1e-12)


def test_hint_loss_gradients_student_only():
    s = f64([[1.0, 2.0], [3.0, 4.0]]).requires_grad_(True)
    t = f64([[0.0, 0.0], [1.0, 1.0]]).requires_grad_(True)
    hint_loss(s, t).backward()
    assert t.grad is None
    # d/ds ½·mean_b‖s − t‖² = (s − t)/B
    assert torch.allclose(s.grad, f64([[0.5, 1.0], [1.0, 1.5]]))


def test_hint_loss_shape_mismatch_names_both_shapes():
    with pytest.raises(ShapeMismatchError) as err:
        hint_loss(torch.zeros(2, 8, 4, 4), torch.zeros(2, 16, 4, 4))
    assert "(2, 8, 4, 4)" in str(err.value) and "(2, 16, 4, 4)" in str(err.value)
