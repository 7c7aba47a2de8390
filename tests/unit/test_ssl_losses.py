"""Self-supervised distillation losses: DINO (+ center), BYOL, iBOT masked tokens, SEED, SwAV Sinkhorn.

Expected values are computed with NumPy / math here from the papers' equations, never by calling the
function under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses import (
    byol_loss, dino_center, dino_loss, masked_token_loss, seed_loss, sinkhorn, swapped_prediction_loss,
)
from tests.reference import np_softmax


def close(actual, expected, rtol=1.3e-6, atol=1e-5) -> None:
    """Elementwise closeness (NumPy's, cheaper to import than torch.testing)."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


def f64(x) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=torch.float64)


def np_log_softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# --- DINO -------------------------------------------------------------------------------------------

def np_dino(students, teachers, center, tau_s, tau_t) -> float:
    """Caron et al. 2021, Eq. (3): mean over pairs (i teacher view, v student view, v != i) of batch-mean CE."""
    terms = []
    for i, t in enumerate(teachers):
        p_t = np_softmax((np.asarray(t) - np.asarray(center)) / tau_t)
        for v, s in enumerate(students):
            if v == i:
                continue
            log_p_s = np_log_softmax(np.asarray(s) / tau_s)
            per_row = [-sum(p_t[b, k] * log_p_s[b, k] for k in range(p_t.shape[1])) for b in range(p_t.shape[0])]
            terms.append(sum(per_row) / len(per_row))
    return sum(terms) / len(terms)


def test_dino_uniform_outputs_give_ln_k():
    k = 7
    students = [torch.zeros(3, k) for _ in range(4)]
    teachers = [torch.zeros(3, k) for _ in range(2)]
    loss = dino_loss(students, teachers, torch.zeros(k))
    assert loss.item() == pytest.approx(math.log(k), rel=1e-6)


def test_dino_matches_numpy_two_global_one_local():
    rng = np.random.default_rng(0)
    b, k = 3, 5
    students = [rng.normal(size=(b, k)) for _ in range(3)]  # 2 global + 1 local
    teachers = [rng.normal(size=(b, k)) for _ in range(2)]
    center = rng.normal(size=k) * 0.3
    got = dino_loss([f64(s) for s in students], [f64(t) for t in teachers], f64(center), 0.2, 0.07)
    assert got.item() == pytest.approx(np_dino(students, teachers, center, 0.2, 0.07), rel=1e-10)
    # a [1, K] center is the same center
    got_row = dino_loss([f64(s) for s in students], [f64(t) for t in teachers], f64(center[None]), 0.2, 0.07)
    assert got_row.item() == pytest.approx(got.item(), rel=1e-12)


def test_dino_skips_same_view_pairs():
    # Changing student view 0 changes only the term (teacher view 1, student view 0): the pair
    # (teacher 0, student 0) is skipped. With 2 teacher and 3 student views there are 4 pairs.
    rng = np.random.default_rng(1)
    b, k, tau_s, tau_t = 4, 6, 0.1, 0.04
    students = [rng.normal(size=(b, k)) for _ in range(3)]
    teachers = [rng.normal(size=(b, k)) for _ in range(2)]
    center = np.zeros(k)
    changed = [students[0] + rng.normal(size=(b, k)) * 3.0] + students[1:]

    def pair(i, v, studs):
        p_t = np_softmax(teachers[i] / tau_t)
        return float((-(p_t * np_log_softmax(studs[v] / tau_s)).sum(-1)).mean())

    before = dino_loss([f64(s) for s in students], [f64(t) for t in teachers], f64(center), tau_s, tau_t)
    after = dino_loss([f64(s) for s in changed], [f64(t) for t in teachers], f64(center), tau_s, tau_t)
    expected_delta = (pair(1, 0, changed) - pair(1, 0, students)) / 4
    assert abs(expected_delta) > 1e-3  # the case really changes something
    assert (after - before).item() == pytest.approx(expected_delta, rel=1e-9)
    # and if teacher view 0 were paired with student view 0, the delta would also include that term
    wrong_delta = (pair(1, 0, changed) - pair(1, 0, students) + pair(0, 0, changed) - pair(0, 0, students)) / 5
    assert (after - before).item() != pytest.approx(wrong_delta, rel=1e-3)


def test_dino_errors():
    x = torch.zeros(2, 4)
    with pytest.raises(AlambicError, match="no \\(teacher view"):
        dino_loss([x], [x], torch.zeros(4))
    with pytest.raises(AlambicError, match="student_outputs is empty"):
        dino_loss([], [x], torch.zeros(4))
    with pytest.raises(AlambicError, match="teacher_outputs is empty"):
        dino_loss([x, x], [], torch.zeros(4))
    with pytest.raises(ShapeMismatchError, match=r"student_outputs\[1\]"):
        dino_loss([x, torch.zeros(2, 5)], [x], torch.zeros(4))
    with pytest.raises(ShapeMismatchError, match="teacher views"):
        dino_loss([x, x], [torch.zeros(2, 5)], torch.zeros(5))
    with pytest.raises(ShapeMismatchError, match="center"):
        dino_loss([x, x], [x], torch.zeros(5))
    with pytest.raises(AlambicError, match="only 1 student"):
        dino_loss([x], [x, x], torch.zeros(4))


def test_dino_gradient_flows_to_student_only():
    torch.manual_seed(0)
    students = [torch.randn(3, 5, requires_grad=True) for _ in range(3)]
    teachers = [torch.randn(3, 5, requires_grad=True) for _ in range(2)]
    center = torch.randn(5, requires_grad=True)
    dino_loss(students, teachers, center).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in students)
    assert all(t.grad is None for t in teachers)
    assert center.grad is None


def test_dino_center_update_is_the_ema_of_the_batch_mean():
    rng = np.random.default_rng(2)
    c = rng.normal(size=4)
    t1, t2 = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    teacher = [f64(t1).requires_grad_(), f64(t2)]
    center = f64(c)
    new = dino_center(center, teacher, momentum=0.8)
    expected = 0.8 * c + 0.2 * np.concatenate([t1, t2]).mean(0)
    np.testing.assert_allclose(new.numpy(), expected, rtol=0, atol=1e-14)
    assert not new.requires_grad
    np.testing.assert_array_equal(center.numpy(), c)  # not modified in place
    assert dino_center(f64(c[None]), teacher).shape == (1, 4)


# --- BYOL -------------------------------------------------------------------------------------------

def test_byol_values():
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    assert byol_loss(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert byol_loss(p, -p).item() == pytest.approx(4.0, abs=1e-6)
    assert byol_loss(p, torch.tensor([[0.0, 1.0], [-0.8, 0.6]])).item() == pytest.approx(2.0, abs=1e-6)


def test_byol_scale_invariant_and_target_constant():
    torch.manual_seed(0)
    p, z = torch.randn(5, 8), torch.randn(5, 8)
    cos = F.cosine_similarity(p.double(), z.double(), dim=-1)
    assert byol_loss(p, z).item() == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    scales = torch.rand(5, 1) * 10 + 0.1
    assert byol_loss(p * scales, z * 3.0).item() == pytest.approx(byol_loss(p, z).item(), rel=1e-5)
    p.requires_grad_()
    z.requires_grad_()
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None
    with pytest.raises(ShapeMismatchError, match="byol_loss"):
        byol_loss(p, z[:, :4])


# --- iBOT masked tokens ------------------------------------------------------------------------------

def np_masked_tokens(s, t, mask, center, tau_s, tau_t) -> float:
    """iBOT Eq. (1): per sample Σ_masked CE / max(1, #masked), then mean over samples."""
    per_sample = []
    for b in range(s.shape[0]):
        total, count = 0.0, 0
        for n in range(s.shape[1]):
            if mask[b, n]:
                p_t = np_softmax((t[b, n] - center) / tau_t)
                total += -(p_t * np_log_softmax(s[b, n] / tau_s)).sum()
                count += 1
        per_sample.append(total / max(1, count))
    return float(np.mean(per_sample))


def test_masked_token_loss_matches_numpy():
    rng = np.random.default_rng(3)
    b, n, k = 3, 5, 4
    s, t, center = rng.normal(size=(b, n, k)), rng.normal(size=(b, n, k)), rng.normal(size=k) * 0.2
    mask = np.array([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=bool)  # sample 1: none masked
    got = masked_token_loss(f64(s), f64(t), torch.as_tensor(mask), f64(center), 0.1, 0.05)
    assert got.item() == pytest.approx(np_masked_tokens(s, t, mask, center, 0.1, 0.05), rel=1e-10)


def test_masked_token_loss_ignores_unmasked_tokens():
    rng = np.random.default_rng(4)
    s, t = rng.normal(size=(2, 6, 3)), rng.normal(size=(2, 6, 3))
    mask = rng.random((2, 6)) < 0.5
    mask[:, 0] = True
    s2 = s.copy()
    s2[~mask] += rng.normal(size=s2[~mask].shape) * 5
    m, c = torch.as_tensor(mask), torch.zeros(3, dtype=torch.float64)
    base = masked_token_loss(f64(s), f64(t), m, c)
    assert masked_token_loss(f64(s2), f64(t), m, c).item() == pytest.approx(base.item(), rel=1e-12)
    s3 = s.copy()
    s3[0, 0, 0] += 5.0  # a masked token does matter
    assert masked_token_loss(f64(s3), f64(t), m, c).item() != pytest.approx(base.item(), rel=1e-6)


def test_masked_token_loss_normalises_per_sample():
    # Every token of sample 0 has CE a, every token of sample 1 has CE b: sample 0 has 1 masked token,
    # sample 1 has 5, yet the loss is (a + b) / 2, not (a + 5b) / 6.
    k = 3
    teacher = torch.zeros(2, 5, k, dtype=torch.float64)  # uniform targets
    student = torch.zeros(2, 5, k, dtype=torch.float64)
    student[1, :, 0] = 2.0
    mask = torch.tensor([[True, False, False, False, False], [True] * 5])
    a = math.log(k)
    b = float(-np_log_softmax(np.array([2.0, 0.0, 0.0]) / 0.1).mean())
    got = masked_token_loss(student, teacher, mask, torch.zeros(k, dtype=torch.float64))
    assert got.item() == pytest.approx((a + b) / 2, rel=1e-10)
    assert got.item() != pytest.approx((a + 5 * b) / 6, rel=1e-3)


def test_masked_token_loss_errors_and_gradients():
    s = torch.randn(2, 4, 3, requires_grad=True)
    t = torch.randn(2, 4, 3, requires_grad=True)
    with pytest.raises(ShapeMismatchError, match="mask has shape"):
        masked_token_loss(s, t, torch.ones(2, 3, dtype=torch.bool), torch.zeros(3))
    masked_token_loss(s, t, torch.ones(2, 4, dtype=torch.bool), torch.zeros(3)).backward()
    assert s.grad is not None and t.grad is None


# --- SEED -------------------------------------------------------------------------------------------

def np_seed(s, t, queue, tau_s, tau_t) -> float:
    """Fang et al. 2021, Eq. (3)/(4): support [z_t_i; queue], CE(p_t, p_s) averaged over the batch."""
    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    s, t, queue = unit(s), unit(t), unit(queue) if len(queue) else queue
    losses = []
    for i in range(len(s)):
        support = [t[i]] + list(queue)
        l_s = np.array([s[i] @ d for d in support]) / tau_s
        l_t = np.array([t[i] @ d for d in support]) / tau_t
        losses.append(-(np_softmax(l_t) * np_log_softmax(l_s)).sum())
    return float(np.mean(losses))


def test_seed_matches_numpy_with_a_small_queue():
    rng = np.random.default_rng(5)
    s, t, q = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    for tau_s, tau_t in [(0.2, 0.05), (0.2, 1e-4), (0.5, 0.5)]:
        got = seed_loss(f64(s), f64(t), f64(q), tau_s, tau_t)
        assert got.item() == pytest.approx(np_seed(s, t, q, tau_s, tau_t), rel=1e-9)


def test_seed_empty_queue_gives_zero():
    s, t = torch.randn(4, 6), torch.randn(4, 6)
    assert seed_loss(s, t, torch.empty(0, 6)).item() == 0.0


def test_seed_minimised_at_the_teacher():
    rng = np.random.default_rng(6)
    t, q = rng.normal(size=(5, 8)), rng.normal(size=(10, 8))
    tau = 0.2
    at_teacher = seed_loss(f64(t) * 2.0, f64(t), f64(q), tau, tau).item()
    # CE(p_t, p_t) = H(p_t): the entropy of the teacher's distribution
    unit_t, unit_q = t / np.linalg.norm(t, axis=1, keepdims=True), q / np.linalg.norm(q, axis=1, keepdims=True)
    p_t = np_softmax(np.concatenate([np.ones((5, 1)), unit_t @ unit_q.T], axis=1) / tau)
    entropy = float((-(p_t * np.log(p_t)).sum(-1)).mean())
    assert at_teacher == pytest.approx(entropy, rel=1e-9)
    for _ in range(5):
        moved = f64(t + rng.normal(size=t.shape) * 0.5)
        assert seed_loss(moved, f64(t), f64(q), tau, tau).item() > at_teacher
    student, teacher = f64(t).requires_grad_(), f64(t).requires_grad_()
    seed_loss(student + 0.1, teacher, f64(q)).backward()
    assert student.grad is not None and teacher.grad is None
    with pytest.raises(ShapeMismatchError, match="queue"):
        seed_loss(student, teacher, f64(q[:, :4]))


# --- SwAV -------------------------------------------------------------------------------------------

def test_sinkhorn_rows_sum_to_one_and_columns_equipartition():
    torch.manual_seed(0)
    k, b = 10, 80
    scores = F.normalize(torch.randn(b, 16), dim=1) @ F.normalize(torch.randn(k, 16), dim=1).T  # cosines
    raw_error = (F.softmax(scores / 0.05, dim=1).sum(0) - b / k).abs().max().item()
    assert raw_error > 0.2 * b / k  # the plain row softmax is far from equipartitioned
    errors = {}
    for iterations in (3, 20):
        codes = sinkhorn(scores, epsilon=0.05, iterations=iterations)
        assert codes.shape == (b, k) and not codes.requires_grad
        close(codes.sum(1), torch.ones(b), rtol=0, atol=1e-5)
        errors[iterations] = (codes.sum(0) - b / k).abs().max().item()
    # SwAV's 3 iterations move part of the way (from 0.74 to 0.40 of B/K here: its first normalisation is
    # over the whole matrix, not per sample); at ε = 0.05 on cosines 20 reach 1% of B/K
    assert errors[3] < 0.75 * raw_error
    assert errors[20] < 0.01 * b / k, errors


def test_sinkhorn_invariant_to_per_prototype_shift_and_stable():
    # a per-prototype factor exp(c_k/ε) is absorbed by the first per-prototype normalisation (SwAV Alg. 1);
    # a per-sample one is not (tests/unit/test_loss_references.py checks the codes against the algorithm)
    torch.manual_seed(1)
    scores = torch.randn(16, 4, dtype=torch.float64)
    shift = torch.randn(1, 4, dtype=torch.float64) * 100
    close(sinkhorn(scores + shift), sinkhorn(scores), rtol=0, atol=1e-12)
    big = sinkhorn(torch.randn(16, 4) * 50)  # exp(1000) would overflow in the plain algorithm
    assert torch.isfinite(big).all()
    with pytest.raises(ShapeMismatchError, match="sinkhorn"):
        sinkhorn(torch.randn(2, 3, 4))


def test_swapped_prediction_matches_formula_and_hard_equals_soft_on_one_hot():
    rng = np.random.default_rng(7)
    sa, sb = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    qa, qb = np_softmax(rng.normal(size=(4, 5))), np_softmax(rng.normal(size=(4, 5)))
    tau = 0.1
    expected = 0.5 * (
        (-(qb * np_log_softmax(sa / tau)).sum(-1)).mean() + (-(qa * np_log_softmax(sb / tau)).sum(-1)).mean()
    )
    got = swapped_prediction_loss(f64(sa), f64(sb), f64(qa), f64(qb), tau)
    assert got.item() == pytest.approx(expected, rel=1e-10)

    one_a, one_b = np.eye(5)[qa.argmax(1)], np.eye(5)[qb.argmax(1)]
    soft = swapped_prediction_loss(f64(sa), f64(sb), f64(one_a), f64(one_b), tau)
    hard_from_soft_codes = swapped_prediction_loss(f64(sa), f64(sb), f64(qa), f64(qb), tau, hard=True)
    assert hard_from_soft_codes.item() == pytest.approx(soft.item(), rel=1e-12)
    assert hard_from_soft_codes.item() != pytest.approx(got.item(), rel=1e-3)

    a = f64(sa).requires_grad_()
    codes = f64(qb).requires_grad_()
    swapped_prediction_loss(a, f64(sb), f64(qa), codes).backward()
    assert a.grad is not None and codes.grad is None
