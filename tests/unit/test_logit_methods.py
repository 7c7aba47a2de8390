"""The logit family: DKD, DIST, logit standardisation and per-sample weights.

Expected values come from numpy / math written out here from the papers' equations, never from the
functions under test.
"""

from __future__ import annotations


import numpy as np
import pydantic
import pytest
import torch

from alambic.data.batch import IGNORE_INDEX, INPUT, Batch
from alambic.errors import ShapeMismatchError
from alambic.losses import (
    decoupled_kd_terms,
    dist_loss,
    dist_relations,
    dkd_loss,
    kd_loss,
    sample_weights,
    standardize_logits,
    weighted_kd_loss,
)
from alambic.methods import SetupInfo, StepContext
from alambic.methods.dist import DIST, DISTConfig
from alambic.methods.dkd import DKD, WARMUP, DKDConfig, dkd_targets, warmup_ramp
from alambic.methods.kd import KD, KDConfig
from alambic.registry import METHODS
from alambic.teachers.base import ModelOutput
from tests.reference import np_ce, np_softmax

CTX = StepContext(step=0, epoch=0, total_steps=10, steps_per_epoch=5)

# 4 samples, 4 classes; rows 1 and 3 unlabelled.
S = [[1.0, 2.0, 0.5, -0.5], [0.0, -1.0, 3.0, 1.0], [2.0, 0.0, 0.0, 0.5], [0.5, 0.5, -1.0, 2.0]]
T = [[2.0, 0.0, 1.0, 0.5], [1.0, 1.0, -2.0, 0.0], [0.0, 3.0, 0.0, -1.0], [-1.0, 0.0, 1.0, 2.5]]
Y = [2, IGNORE_INDEX, 0, IGNORE_INDEX]
LABELED = [True, False, True, False]
Y_FULL = [2, 1, 0, 3]


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def outs(logits: torch.Tensor) -> dict[str, ModelOutput]:
    return {INPUT: ModelOutput(logits, {})}


def make_batch(target=Y, labeled=LABELED) -> Batch:
    n = len(target)
    return Batch(views={INPUT: torch.zeros(n, 2)}, index=torch.arange(n), target=torch.tensor(target),
                 labeled=None if labeled is None else torch.tensor(labeled))


def np_kl(p, q) -> np.ndarray:
    """KL(p ‖ q) per row."""
    return (p * np.log(p / q)).sum(-1)


def np_tckd_nckd(s, t, target, temp):
    """Per-sample TCKD and NCKD (times T²) written from the DKD paper's definitions."""
    p_s, p_t = np_softmax(np.asarray(s) / temp), np_softmax(np.asarray(t) / temp)
    tckd, nckd = [], []
    for i, y in enumerate(target):
        b_s = np.array([p_s[i, y], 1 - p_s[i, y]])
        b_t = np.array([p_t[i, y], 1 - p_t[i, y]])
        tckd.append(np_kl(b_t, b_s))
        others = [c for c in range(p_s.shape[1]) if c != y]
        hat_s = p_s[i, others] / p_s[i, others].sum()
        hat_t = p_t[i, others] / p_t[i, others].sum()
        nckd.append(np_kl(hat_t, hat_s))
    return np.array(tckd) * temp**2, np.array(nckd) * temp**2


def np_zscore(z):
    z = np.asarray(z, dtype=np.float64)
    return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True) + 1e-7)


# ------------------------------------------------------------------------------------ standardisation


def test_standardize_logits_matches_numpy_zscore_with_unbiased_std():
    out = standardize_logits(f64(S))
    np.testing.assert_allclose(out.numpy(), np_zscore(S), rtol=1e-12)
    # rows have mean 0 and unbiased std ~1
    np.testing.assert_allclose(out.mean(-1).numpy(), 0.0, atol=1e-12)
    np.testing.assert_allclose(out.std(-1).numpy(), 1.0, rtol=1e-6)


def test_standardize_logits_invariant_to_positive_affine_map_per_row():
    z = f64(S)
    a = f64([[0.5], [3.0], [10.0], [1.7]])
    b = f64([[-4.0], [2.0], [0.3], [100.0]])
    np.testing.assert_allclose(standardize_logits(a * z + b, eps=0.0).numpy(),
                               standardize_logits(z, eps=0.0).numpy(), rtol=1e-10, atol=1e-12)


def test_standardize_logits_rejects_a_single_class():
    with pytest.raises(ShapeMismatchError, match=r"\(3, 1\)"):
        standardize_logits(torch.zeros(3, 1))


def test_kd_with_standardization_is_kd_on_zscores_at_base_temperature():
    cfg = KDConfig(alpha=0.6, temperature=4.0, logit_standardization=True, base_temperature=2.0)
    out = KD(cfg)(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    p_s, p_t = np_softmax(np_zscore(S) / 2.0), np_softmax(np_zscore(T) / 2.0)
    expected_kd = 0.6 * 4.0 * np_kl(p_t, p_s).mean()
    assert out.terms["kd"].item() == pytest.approx(expected_kd, rel=1e-9)
    # the label term still sees the raw logits
    assert out.terms["ce"].item() == pytest.approx(0.4 * np_ce(S, Y), rel=1e-12)


def test_kd_with_standardization_is_invariant_to_affine_rescaling_of_student_logits():
    method = KD(KDConfig(alpha=1.0, logit_standardization=True))
    base = method(outs(f64(S)), outs(f64(T)), make_batch(), CTX).loss.item()
    scaled = method(outs(7.5 * f64(S) - 3.0), outs(f64(T)), make_batch(), CTX).loss.item()
    assert scaled == pytest.approx(base, rel=1e-6)
    # without standardisation the same rescaling changes KD: the invariance is the option's doing
    plain = KD(KDConfig(alpha=1.0))
    a = plain(outs(f64(S)), outs(f64(T)), make_batch(), CTX).loss.item()
    b = plain(outs(7.5 * f64(S) - 3.0), outs(f64(T)), make_batch(), CTX).loss.item()
    assert abs(a - b) > 0.1


def test_kd_with_standardization_gradient_reaches_student_not_teacher():
    s, t = f64(S).requires_grad_(True), f64(T).requires_grad_(True)
    KD(KDConfig(logit_standardization=True))(outs(s), outs(t), make_batch(), CTX).loss.backward()
    assert t.grad is None
    assert s.grad.abs().sum() > 0
    # z-scoring removes the per-row mean, so the gradient of the KD part sums to 0 over each row's classes;
    # with alpha < 1 the CE gradient (also zero-sum) is added: every row's gradient sums to 0
    np.testing.assert_allclose(s.grad.sum(-1).numpy(), 0.0, atol=1e-12)


# ----------------------------------------------------------------------------------- per-sample weights


def test_confidence_weights_are_teacher_top1_probability():
    w = sample_weights(f64(T), "confidence", normalize=False)
    np.testing.assert_allclose(w.numpy(), np_softmax(T).max(-1), rtol=1e-12)


def test_margin_weights_are_top1_minus_top2_probability():
    w = sample_weights(f64(T), "margin", normalize=False)
    p = np.sort(np_softmax(T), -1)
    np.testing.assert_allclose(w.numpy(), p[:, -1] - p[:, -2], rtol=1e-12)


def test_margin_weight_of_two_equal_top_probabilities_is_zero():
    t = f64([[2.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
    w = sample_weights(t, "margin")
    assert w[0].item() == 0.0
    assert w[1].item() == pytest.approx(2.0, rel=1e-12)  # normalised: the batch mean is 1


@pytest.mark.parametrize("kind", ["confidence", "margin"])
def test_normalised_weights_average_one_and_keep_ratios(kind):
    raw = sample_weights(f64(T), kind, normalize=False).numpy()
    w = sample_weights(f64(T), kind).numpy()
    assert w.mean() == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(w, raw / raw.mean(), rtol=1e-12)


def test_weights_are_detached_and_none_is_ones():
    t = f64(T).requires_grad_(True)
    assert not sample_weights(t, "margin").requires_grad
    assert torch.equal(sample_weights(t, "none"), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="'entropy'"):
        sample_weights(t, "entropy")


def test_weighted_kd_loss_equals_weighted_mean_of_per_sample_kl():
    w = f64([0.5, 2.0, 0.0, 1.5])
    p_s, p_t = np_softmax(np.asarray(S) / 3.0), np_softmax(np.asarray(T) / 3.0)
    expected = 9.0 * float((w.numpy() * np_kl(p_t, p_s)).mean())
    assert weighted_kd_loss(f64(S), f64(T), w, 3.0).item() == pytest.approx(expected, rel=1e-12)
    assert weighted_kd_loss(f64(S), f64(T), torch.ones(4, dtype=torch.float64), 3.0).item() == pytest.approx(
        kd_loss(f64(S), f64(T), 3.0).item(), rel=1e-12)
    with pytest.raises(ShapeMismatchError, match=r"\(3,\).*\(4, 4\)"):
        weighted_kd_loss(f64(S), f64(T), torch.ones(3), 3.0)


def test_kd_margin_weighting_matches_numpy_and_silences_ambiguous_samples():
    t = f64(T)
    t[1] = f64([1.0, 1.0, -2.0, 0.0])  # teacher torn between classes 0 and 1: margin 0
    s = f64(S).requires_grad_(True)
    out = KD(KDConfig(alpha=1.0, temperature=2.0, weighting="margin"))(outs(s), outs(t), make_batch(), CTX)
    p = np.sort(np_softmax(t.numpy()), -1)
    w = p[:, -1] - p[:, -2]
    w = w / w.mean()
    p_s, p_t = np_softmax(np.asarray(S) / 2), np_softmax(t.numpy() / 2)
    assert out.loss.item() == pytest.approx(4.0 * float((w * np_kl(p_t, p_s)).mean()), rel=1e-12)
    out.loss.backward()
    assert torch.equal(s.grad[1], torch.zeros(4, dtype=torch.float64))  # weight 0: nothing learnt from it
    assert s.grad[0].abs().sum() > 0


def test_kd_weighting_default_is_plain_kd():
    a = KD(KDConfig(temperature=2.0, alpha=0.5))(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    b = KD(KDConfig(temperature=2.0, alpha=0.5, weighting="none"))(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    assert a.loss.item() == b.loss.item()


# ------------------------------------------------------------------------------------------------- DKD


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_tckd_and_nckd_match_their_definitions(temp):
    tckd, nckd = decoupled_kd_terms(f64(S), f64(T), torch.tensor(Y_FULL), temp, reduction="none")
    e_t, e_n = np_tckd_nckd(S, T, Y_FULL, temp)
    np.testing.assert_allclose(tckd.numpy(), e_t, rtol=1e-10)
    np.testing.assert_allclose(nckd.numpy(), e_n, rtol=1e-10)
    mean_t, mean_n = decoupled_kd_terms(f64(S), f64(T), torch.tensor(Y_FULL), temp)
    assert mean_t.item() == pytest.approx(e_t.mean(), rel=1e-10)
    assert mean_n.item() == pytest.approx(e_n.mean(), rel=1e-10)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_kd_decomposes_into_tckd_plus_teacher_weighted_nckd(temp):
    # DKD Eq. (1): KD = TCKD + (1 − p_t^T)·NCKD, per sample
    tckd, nckd = decoupled_kd_terms(f64(S), f64(T), torch.tensor(Y_FULL), temp, reduction="none")
    p_s, p_t = np_softmax(np.asarray(S) / temp), np_softmax(np.asarray(T) / temp)
    kd = temp**2 * np_kl(p_t, p_s)
    p_target = p_t[np.arange(4), Y_FULL]
    np.testing.assert_allclose((tckd + f64(1 - p_target) * nckd).numpy(), kd, rtol=1e-10)


def test_dkd_loss_reduces_to_its_components():
    y = torch.tensor(Y_FULL)
    e_t, e_n = np_tckd_nckd(S, T, Y_FULL, 4.0)
    assert dkd_loss(f64(S), f64(T), y, alpha=1.0, beta=0.0).item() == pytest.approx(e_t.mean(), rel=1e-10)
    assert dkd_loss(f64(S), f64(T), y, alpha=0.0, beta=1.0).item() == pytest.approx(e_n.mean(), rel=1e-10)
    assert dkd_loss(f64(S), f64(T), y).item() == pytest.approx(e_t.mean() + 8 * e_n.mean(), rel=1e-10)
    # alpha = beta = 1 is not KD: KD damps NCKD by 1 − p_t^T
    assert abs(dkd_loss(f64(S), f64(T), y, 1.0, 1.0).item() - kd_loss(f64(S), f64(T), 4.0).item()) > 1e-3


def test_dkd_is_zero_with_zero_gradient_when_student_equals_teacher():
    s = f64(T).requires_grad_(True)
    loss = dkd_loss(s, f64(T), torch.tensor(Y_FULL))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(s.grad.numpy(), 0.0, atol=1e-12)


def test_dkd_with_two_classes_has_no_non_target_knowledge():
    s, t = f64([[1.0, -1.0], [0.3, 2.0]]), f64([[2.0, 0.0], [-1.0, 1.0]])
    tckd, nckd = decoupled_kd_terms(s, t, torch.tensor([0, 1]), 2.0)
    assert nckd.item() == 0.0
    # with two classes the binary split is the whole distribution: TCKD is KD
    assert tckd.item() == pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-12)


def test_dkd_stays_finite_for_saturated_float32_logits():
    s = torch.tensor([[0.0, 5.0, -3.0], [1.0, 1.0, 1.0]], requires_grad=True)
    t = torch.tensor([[300.0, 0.0, 0.0], [0.0, -200.0, 250.0]])  # softmax is exactly one-hot in float32
    loss = dkd_loss(s, t, torch.tensor([0, 2]), temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_teacher_gets_no_gradient():
    s, t = f64(S).requires_grad_(True), f64(T).requires_grad_(True)
    dkd_loss(s, t, torch.tensor(Y_FULL)).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


def test_dkd_rejects_bad_targets_and_shapes():
    with pytest.raises(ValueError, match="outside"):
        dkd_loss(f64(S), f64(T), torch.tensor(Y))  # IGNORE_INDEX is not a class
    with pytest.raises(ShapeMismatchError, match=r"\(3,\)"):
        dkd_loss(f64(S), f64(T), torch.tensor([0, 1, 2]))
    with pytest.raises(ShapeMismatchError, match=r"\(4, 4\).*\(4, 3\)"):
        dkd_loss(f64(S), f64(T)[:, :3], torch.tensor(Y_FULL))
    with pytest.raises(ValueError, match="temperature"):
        dkd_loss(f64(S), f64(T), torch.tensor(Y_FULL), temperature=0.0)


def test_warmup_ramp_is_linear_per_step_and_meets_mdistiller_staircase_at_epoch_ends():
    ramp = warmup_ramp(total_steps=12, steps_per_epoch=3, warmup_epochs=2)
    np.testing.assert_allclose(ramp, [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1, 1, 1, 1, 1, 1, 1])
    # mdistiller: min(epoch / warmup, 1) with 1-based epochs, here at the last step of each epoch
    big = warmup_ramp(total_steps=30 * 7, steps_per_epoch=7, warmup_epochs=20)
    for epoch in range(1, 31):
        assert big[epoch * 7 - 1] == pytest.approx(min(epoch / 20, 1.0))
    np.testing.assert_array_equal(warmup_ramp(5, 5, 0), np.ones(5))


def test_dkd_declares_its_warmup_schedule_for_every_step():
    method = DKD(DKDConfig(warmup_epochs=1))
    info = SetupInfo(student=torch.nn.Linear(1, 1), num_classes=4, num_samples=8, steps_per_epoch=4, epochs=3)
    sched = method.schedules(info)
    assert set(sched) == {WARMUP}
    np.testing.assert_allclose(sched[WARMUP], [0.25, 0.5, 0.75] + [1.0] * 9)


def test_dkd_targets_fill_unlabelled_rows_with_teacher_argmax():
    t = f64(T)
    got = dkd_targets(torch.tensor(Y), t, all_labeled=False)
    assert got.tolist() == [2, int(np.argmax(T[1])), 0, int(np.argmax(T[3]))]
    assert dkd_targets(None, t, all_labeled=False).tolist() == np.argmax(T, -1).tolist()


def test_dkd_method_matches_numpy_with_teacher_argmax_for_unlabelled_and_ce_on_labels_only():
    cfg = DKDConfig(alpha=1.5, beta=6.0, temperature=2.0, ce_weight=0.7)
    ctx = StepContext(step=3, epoch=0, total_steps=10, steps_per_epoch=5, values={WARMUP: 0.4})
    out = DKD(cfg)(outs(f64(S)), outs(f64(T)), make_batch(), ctx)
    filled = [2, int(np.argmax(T[1])), 0, int(np.argmax(T[3]))]
    e_t, e_n = np_tckd_nckd(S, T, filled, 2.0)
    assert out.terms["tckd"].item() == pytest.approx(0.4 * 1.5 * e_t.mean(), rel=1e-10)
    assert out.terms["nckd"].item() == pytest.approx(0.4 * 6.0 * e_n.mean(), rel=1e-10)
    assert out.terms["ce"].item() == pytest.approx(0.7 * np_ce(S, Y), rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-12)


def test_dkd_method_warmup_zero_leaves_only_cross_entropy():
    ctx = StepContext(step=0, epoch=0, total_steps=10, steps_per_epoch=5, values={WARMUP: 0.0})
    s, t = f64(S).requires_grad_(True), f64(T).requires_grad_(True)
    out = DKD()(outs(s), outs(t), make_batch(), ctx)
    assert out.loss.item() == pytest.approx(np_ce(S, Y), rel=1e-12)
    out.loss.backward()
    assert t.grad is None
    assert torch.equal(s.grad[1], torch.zeros(4, dtype=torch.float64))  # unlabelled: no CE, DKD ramped off


def test_dkd_method_with_standardization_uses_zscores_at_base_temperature():
    cfg = DKDConfig(logit_standardization=True, base_temperature=2.0, ce_weight=0.0)
    out = DKD(cfg)(outs(f64(S)), outs(f64(T)), make_batch(Y_FULL, None), CTX)
    e_t, e_n = np_tckd_nckd(np_zscore(S), np_zscore(T), Y_FULL, 2.0)
    assert out.loss.item() == pytest.approx(e_t.mean() + 8 * e_n.mean(), rel=1e-8)
    shifted = DKD(cfg)(outs(3 * f64(S) + 1), outs(f64(T)), make_batch(Y_FULL, None), CTX)
    assert shifted.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_dkd_config_defaults_follow_mdistiller_and_are_strict():
    cfg = DKDConfig()
    assert (cfg.alpha, cfg.beta, cfg.temperature, cfg.warmup_epochs, cfg.ce_weight) == (1.0, 8.0, 4.0, 20.0, 1.0)
    with pytest.raises(pydantic.ValidationError):
        DKDConfig(warmup=5)
    with pytest.raises(pydantic.ValidationError):
        DKDConfig(temperature=0)


# ------------------------------------------------------------------------------------------------ DIST


def np_dist_terms(s, t, temp):
    y_s, y_t = np_softmax(np.asarray(s) / temp), np_softmax(np.asarray(t) / temp)
    inter = 1 - np.mean([np.corrcoef(y_s[i], y_t[i])[0, 1] for i in range(y_s.shape[0])])
    intra = 1 - np.mean([np.corrcoef(y_s[:, c], y_t[:, c])[0, 1] for c in range(y_s.shape[1])])
    return temp**2 * inter, temp**2 * intra


@pytest.mark.parametrize("temp", [1.0, 4.0])
def test_dist_relations_are_one_minus_mean_pearson_of_rows_and_columns(temp):
    inter, intra = dist_relations(f64(S), f64(T), temp)
    e_inter, e_intra = np_dist_terms(S, T, temp)
    assert inter.item() == pytest.approx(e_inter, rel=1e-6)
    assert intra.item() == pytest.approx(e_intra, rel=1e-6)
    assert dist_loss(f64(S), f64(T), beta=2.0, gamma=0.5, temperature=temp).item() == pytest.approx(
        2.0 * e_inter + 0.5 * e_intra, rel=1e-6)


def test_dist_pearson_on_a_hand_computed_pair():
    # softmax rows that are [0.5, 0.25, 0.25] and [0.25, 0.5, 0.25]: centred [1/6, -1/12, -1/12] and
    # [-1/12, 1/6, -1/12]; their correlation is (-1/72 - 1/72 + 1/144) / (1/24) = -1/2
    s = torch.log(f64([[0.5, 0.25, 0.25]]))
    t = torch.log(f64([[0.25, 0.5, 0.25]]))
    inter, intra = dist_relations(s, t)
    assert inter.item() == pytest.approx(1.5, rel=1e-6)
    assert intra.item() == pytest.approx(1.0, abs=1e-12)  # one sample: a column has no variance


def test_dist_is_zero_with_zero_gradient_when_student_equals_teacher():
    s = f64(T).requires_grad_(True)
    loss = dist_loss(s, f64(T))
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    np.testing.assert_allclose(s.grad.numpy(), 0.0, atol=1e-6)


def test_dist_is_zero_for_a_linear_map_of_the_teachers_probabilities_where_kl_is_not():
    # p_s = a·p_t + (1 − a)/C is a valid distribution, linearly related to p_t in every row and column
    p_t = np_softmax(T)
    p_s = 0.3 * p_t + 0.7 / 4
    s = f64(np.log(p_s))
    assert dist_loss(s, f64(T)).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, f64(T), 1.0).item() > 0.05


def test_dist_invariant_to_per_row_constant_on_logits_and_joint_class_permutation():
    base = dist_loss(f64(S), f64(T), temperature=2.0).item()
    shifted = f64(S) + f64([[5.0], [-3.0], [0.5], [10.0]])
    assert dist_loss(shifted, f64(T), temperature=2.0).item() == pytest.approx(base, rel=1e-9)
    perm = [2, 0, 3, 1]
    assert dist_loss(f64(S)[:, perm], f64(T)[:, perm], temperature=2.0).item() == pytest.approx(base, rel=1e-9)
    rows = [3, 1, 0, 2]
    assert dist_loss(f64(S)[rows], f64(T)[rows], temperature=2.0).item() == pytest.approx(base, rel=1e-9)


def test_dist_teacher_gets_no_gradient_and_shapes_are_checked():
    s, t = f64(S).requires_grad_(True), f64(T).requires_grad_(True)
    dist_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    with pytest.raises(ShapeMismatchError, match=r"\(4, 4\).*\(4, 3\)"):
        dist_loss(f64(S), f64(T)[:, :3])
    with pytest.raises(ShapeMismatchError, match=r"\(2, 2, 4\)"):
        dist_loss(f64(S).reshape(2, 2, 4), f64(T).reshape(2, 2, 4))


def test_dist_method_terms_match_numpy_and_ce_reads_labels_only():
    cfg = DISTConfig(beta=2.0, gamma=3.0, temperature=4.0, ce_weight=0.5)
    out = DIST(cfg)(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    e_inter, e_intra = np_dist_terms(S, T, 4.0)
    assert out.terms["inter"].item() == pytest.approx(2.0 * e_inter, rel=1e-6)
    assert out.terms["intra"].item() == pytest.approx(3.0 * e_intra, rel=1e-6)
    assert out.terms["ce"].item() == pytest.approx(0.5 * np_ce(S, Y), rel=1e-12)
    assert out.loss.item() == pytest.approx(sum(v.item() for v in out.terms.values()), rel=1e-12)
    relabelled = DIST(cfg)(outs(f64(S)), outs(f64(T)), make_batch([1, IGNORE_INDEX, 3, IGNORE_INDEX]), CTX)
    assert relabelled.terms["inter"].item() == out.terms["inter"].item()  # the relations read no label


def test_dist_config_defaults_are_the_official_ones_and_strict():
    cfg = DISTConfig()
    assert (cfg.beta, cfg.gamma, cfg.temperature, cfg.ce_weight) == (1.0, 1.0, 1.0, 1.0)
    with pytest.raises(pydantic.ValidationError):
        DISTConfig(tau=4)


# -------------------------------------------------------------------------------------------- registry


def test_logit_methods_registered_with_papers_and_teacher_needs():
    assert "2203.08679" in METHODS.get("dkd").paper
    assert "2205.10536" in METHODS.get("dist").paper
    assert METHODS.get("dkd").obj is DKD and METHODS.get("dist").obj is DIST
    for cls in (DKD, DIST):
        assert cls.needs_teacher and cls.uses_unlabeled
    with pytest.raises(pydantic.ValidationError):
        KDConfig(weighting="entropy")
