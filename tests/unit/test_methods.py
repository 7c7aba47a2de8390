"""Methods: each loss against its paper's formula on tiny hand-computed tensors, plus the registry.

Expected values are computed with numpy / math here, never by calling the loss under test.
"""

from __future__ import annotations


import numpy as np
import pydantic
import pytest
import torch
from torch import nn

from alambic.data.batch import IGNORE_INDEX, INPUT, Batch
from alambic.errors import ShapeMismatchError
from alambic.methods import StepContext
from alambic.methods.ce import CEConfig, CrossEntropy
from alambic.methods.fitnet import FitNet, FitNetConfig, make_regressor
from alambic.methods.kd import KD, KDConfig, LabelFreeConfig, LabelFreeKD
from alambic.registry import METHODS, Registry
from alambic.teachers.base import ModelOutput
from tests.reference import np_ce, np_kd, np_softmax

CTX = StepContext(step=0, epoch=0, total_steps=10, steps_per_epoch=5)

# 4 samples, 3 classes; rows 1 and 3 are unlabelled.
S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.0, 0.0], [0.5, 0.5, -1.0]]
T = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0], [0.0, 3.0, 0.0], [-1.0, 0.0, 1.0]]
Y = [2, IGNORE_INDEX, 0, IGNORE_INDEX]
LABELED = [True, False, True, False]


def np_js(s, t, temp) -> float:
    p_s, p_t = np_softmax(np.asarray(s) / temp), np_softmax(np.asarray(t) / temp)
    m = (p_s + p_t) / 2
    return float(temp**2 * 0.5 * ((p_t * np.log(p_t / m)).sum(-1) + (p_s * np.log(p_s / m)).sum(-1)).mean())


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def outs(logits: torch.Tensor, **features: torch.Tensor) -> dict[str, ModelOutput]:
    return {INPUT: ModelOutput(logits, dict(features))}


def make_batch(target=Y, labeled=LABELED) -> Batch:
    n = len(target)
    return Batch(
        views={INPUT: torch.zeros(n, 2)},
        index=torch.arange(n),
        target=torch.tensor(target),
        labeled=torch.tensor(labeled),
    )


# ------------------------------------------------------------------------------------------------- ce


def test_ce_uses_only_labelled_targets():
    s = f64(S).requires_grad_(True)
    out = CrossEntropy(CEConfig())(outs(s), None, make_batch(), CTX)
    assert out.loss.item() == pytest.approx(np_ce(S, Y), rel=1e-12)
    assert set(out.terms) == {"ce"}
    assert out.logits is s
    out.loss.backward()
    assert torch.equal(s.grad[1], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(s.grad[3], torch.zeros(3, dtype=torch.float64))
    assert s.grad[0].abs().sum() > 0 and s.grad[2].abs().sum() > 0


def test_ce_label_smoothing_reaches_the_loss():
    eps = 0.3
    out = CrossEntropy(CEConfig(label_smoothing=eps))(outs(f64(S)), None, make_batch(), CTX)
    logp = np.log(np_softmax(S))
    expected = np.mean([(1 - eps) * -logp[i, y] + eps * -logp[i].mean() for i, y in [(0, 2), (2, 0)]])
    assert out.loss.item() == pytest.approx(float(expected), rel=1e-12)


def test_ce_declares_no_teacher_and_no_use_of_unlabelled():
    assert CrossEntropy.needs_teacher is False
    assert CrossEntropy.uses_unlabeled is False


# ------------------------------------------------------------------------------------------------- kd


@pytest.mark.parametrize("temp,alpha", [(2.0, 0.5), (4.0, 0.9), (1.0, 0.25)])
def test_kd_loss_is_weighted_sum_of_labelled_ce_and_t2_kl(temp, alpha):
    out = KD(KDConfig(temperature=temp, alpha=alpha))(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    ce = (1 - alpha) * np_ce(S, Y)
    kd = alpha * np_kd(S, T, temp)
    assert out.terms["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert out.terms["kd"].item() == pytest.approx(kd, rel=1e-12)
    assert out.loss.item() == pytest.approx(ce + kd, rel=1e-12)
    assert set(out.terms) == {"ce", "kd"}
    assert not any(v.requires_grad for v in out.terms.values())


def test_kd_unlabelled_samples_change_kd_term_but_not_ce_term():
    method = KD(KDConfig(temperature=2, alpha=0.5))
    batch = make_batch()
    a = f64(S)
    b = a.clone()
    b[1] = f64([4.0, -2.0, 0.0])  # an unlabelled row of the student
    b[3] = f64([-3.0, 1.0, 2.0])  # another one
    out_a = method(outs(a), outs(f64(T)), batch, CTX)
    out_b = method(outs(b), outs(f64(T)), batch, CTX)
    assert out_b.terms["ce"].item() == out_a.terms["ce"].item()
    assert abs(out_b.terms["kd"].item() - out_a.terms["kd"].item()) > 1e-3
    # and the KD term averages over all 4 samples, unlabelled included
    assert out_b.terms["kd"].item() == pytest.approx(0.5 * np_kd(b.numpy(), T, 2.0), rel=1e-12)


def test_kd_gradient_reaches_unlabelled_rows_only_through_the_teacher():
    s = f64(S).requires_grad_(True)
    t = f64(T).requires_grad_(True)
    KD(KDConfig(temperature=2, alpha=0.5))(outs(s), outs(t), make_batch(), CTX).loss.backward()
    assert t.grad is None
    # unlabelled row 1: only the KD gradient α·T·(p_s − p_t)/B
    p_s, p_t = np_softmax(np.asarray(S) / 2), np_softmax(np.asarray(T) / 2)
    expected_row1 = 0.5 * 2 * (p_s[1] - p_t[1]) / 4
    np.testing.assert_allclose(s.grad[1].numpy(), expected_row1, rtol=1e-10)


def test_kd_alpha_one_is_pure_kd_and_alpha_zero_is_pure_ce():
    pure_kd = KD(KDConfig(temperature=3, alpha=1.0))(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    assert pure_kd.terms["ce"].item() == 0.0
    assert pure_kd.loss.item() == pytest.approx(np_kd(S, T, 3.0), rel=1e-12)
    pure_ce = KD(KDConfig(temperature=3, alpha=0.0))(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    assert pure_ce.terms["kd"].item() == 0.0
    assert pure_ce.loss.item() == pytest.approx(np_ce(S, Y), rel=1e-12)


def test_kd_batch_without_labels_is_finite_and_equals_weighted_kd():
    s = f64(S).requires_grad_(True)
    batch = make_batch([IGNORE_INDEX] * 4, [False] * 4)
    out = KD(KDConfig(temperature=2, alpha=0.5))(outs(s), outs(f64(T)), batch, CTX)
    assert out.terms["ce"].item() == 0.0
    assert out.loss.item() == pytest.approx(0.5 * np_kd(S, T, 2.0), rel=1e-12)
    out.loss.backward()
    assert torch.isfinite(s.grad).all()


def test_kd_config_is_strict_and_validated():
    with pytest.raises(pydantic.ValidationError):
        KDConfig(temperature=2, alpha=0.5, temprature=3)  # typo'd key
    with pytest.raises(pydantic.ValidationError):
        KDConfig(alpha=1.5)
    with pytest.raises(pydantic.ValidationError):
        KDConfig(temperature=0)


def test_kd_declares_teacher_and_unlabelled_use():
    assert KD.needs_teacher and KD.uses_unlabeled
    assert LabelFreeKD.needs_teacher and LabelFreeKD.uses_unlabeled


# -------------------------------------------------------------------------------------- label_free_kd


def test_label_free_kd_defaults_to_js_at_t1_and_matches_numpy():
    out = LabelFreeKD()(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    assert set(out.terms) == {"js"}
    assert out.loss.item() == pytest.approx(np_js(S, T, 1.0), rel=1e-12)


def test_label_free_kd_kl_option_is_hinton_kl():
    out = LabelFreeKD(LabelFreeConfig(divergence="kl", temperature=2.0))(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    assert set(out.terms) == {"kl"}
    assert out.loss.item() == pytest.approx(np_kd(S, T, 2.0), rel=1e-12)


@pytest.mark.parametrize("divergence", ["js", "kl"])
def test_label_free_kd_ignores_labels_entirely(divergence):
    method = LabelFreeKD(LabelFreeConfig(divergence=divergence, temperature=2.0))
    base = method(outs(f64(S)), outs(f64(T)), make_batch(), CTX).loss.item()
    variants = [
        make_batch([0, 1, 2, 1], [True] * 4),  # every sample labelled, other labels
        make_batch([1, IGNORE_INDEX, 2, IGNORE_INDEX], LABELED),  # permuted / relabelled
        make_batch([IGNORE_INDEX] * 4, [False] * 4),  # nothing labelled
    ]
    for batch in variants:
        assert method(outs(f64(S)), outs(f64(T)), batch, CTX).loss.item() == base


def test_label_free_kd_teacher_gets_no_gradient():
    s, t = f64(S).requires_grad_(True), f64(T).requires_grad_(True)
    LabelFreeKD()(outs(s), outs(t), make_batch(), CTX).loss.backward()
    assert t.grad is None
    assert s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- fitnet


def test_make_regressor_linear_for_vectors():
    r = make_regressor(torch.zeros(2, 5), torch.zeros(2, 7))
    assert isinstance(r, nn.Linear)
    assert (r.in_features, r.out_features) == (5, 7)


@pytest.mark.parametrize("s_shape,t_shape", [((2, 4, 8, 8), (2, 6, 4, 4)), ((2, 3, 5, 9), (2, 2, 5, 3))])
def test_make_regressor_conv_kernel_is_hs_minus_ht_plus_one(s_shape, t_shape):
    # Romero et al. §2.2: kernel (H_s − H_t + 1, W_s − W_t + 1), no padding, so the output is the hint's shape.
    r = make_regressor(torch.zeros(s_shape), torch.zeros(t_shape))
    assert isinstance(r, nn.Conv2d)
    assert r.kernel_size == (s_shape[2] - t_shape[2] + 1, s_shape[3] - t_shape[3] + 1)
    assert (r.in_channels, r.out_channels) == (s_shape[1], t_shape[1])
    assert r.padding == (0, 0) and r.stride == (1, 1)
    assert tuple(r(torch.zeros(s_shape)).shape) == t_shape


@pytest.mark.parametrize(
    "s_shape,t_shape",
    [
        ((2, 4, 3, 3), (2, 4, 4, 4)),  # student map smaller than the hint map
        ((2, 4, 8, 3), (2, 4, 4, 4)),  # smaller in width only
        ((2, 16), (2, 4, 4, 4)),  # ranks differ
        ((2, 4, 4, 4), (2, 16)),  # ranks differ the other way
    ],
)
def test_make_regressor_rejects_impossible_shapes_naming_both(s_shape, t_shape):
    with pytest.raises(ShapeMismatchError) as err:
        make_regressor(torch.zeros(s_shape), torch.zeros(t_shape))
    assert str(s_shape) in str(err.value) and str(t_shape) in str(err.value)


def make_fitnet(**cfg) -> tuple[FitNet, dict, dict]:
    torch.manual_seed(0)
    method = FitNet(FitNetConfig(student_tap="body.act0", teacher_tap="body.act1", **cfg))
    s_feat = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    t_feat = torch.randn(4, 5, 4, 4, dtype=torch.float64)
    method.setup(outs(f64(S), **{"body.act0": s_feat}), outs(f64(T), **{"body.act1": t_feat}), None)
    method.double()
    return method, s_feat, t_feat


def fitnet_io(s_feat, t_feat):
    s_logits = f64(S).requires_grad_(True)
    s_f = s_feat.clone().requires_grad_(True)
    t_f = t_feat.clone().requires_grad_(True)
    t_logits = f64(T).requires_grad_(True)
    return s_logits, s_f, t_logits, t_f


def test_fitnet_taps_and_regressor_from_setup():
    method, _, _ = make_fitnet()
    assert method.student_taps() == ["body.act0"] and method.teacher_taps() == ["body.act1"]
    assert isinstance(method.regressor, nn.Conv2d) and method.regressor.kernel_size == (3, 3)
    # the regressor is a submodule, so the optimizer and checkpoints see it
    assert any(n.startswith("regressor.") for n, _ in method.named_parameters())


def test_fitnet_hint_stage_trains_only_regressor_and_guided_layer():
    method, s_feat, t_feat = make_fitnet(hint_epochs=2)
    s_logits, s_f, t_logits, t_f = fitnet_io(s_feat, t_feat)
    ctx = StepContext(step=7, epoch=1, total_steps=20, steps_per_epoch=5)
    out = method(outs(s_logits, **{"body.act0": s_f}), outs(t_logits, **{"body.act1": t_f}), make_batch(), ctx)
    assert set(out.terms) == {"hint"}
    with torch.no_grad():
        d = (method.regressor(s_feat) - t_feat).flatten(1).numpy()
    expected = 0.5 * float(np.mean((d**2).sum(1)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    out.loss.backward()
    assert method.regressor.weight.grad is not None and method.regressor.weight.grad.abs().sum() > 0
    assert s_f.grad is not None and s_f.grad.abs().sum() > 0
    assert s_logits.grad is None  # no KD / CE in stage 1
    assert t_f.grad is None and t_logits.grad is None


def test_fitnet_after_hint_stage_is_ce_plus_kd_only():
    method, s_feat, t_feat = make_fitnet(hint_epochs=2, temperature=2.0, alpha=0.5)
    s_logits, s_f, t_logits, t_f = fitnet_io(s_feat, t_feat)
    ctx = StepContext(step=10, epoch=2, total_steps=20, steps_per_epoch=5)
    out = method(outs(s_logits, **{"body.act0": s_f}), outs(t_logits, **{"body.act1": t_f}), make_batch(), ctx)
    assert set(out.terms) == {"ce", "kd"}
    ce, kd = 0.5 * np_ce(S, Y), 0.5 * np_kd(S, T, 2.0)
    assert out.loss.item() == pytest.approx(ce + kd, rel=1e-12)
    out.loss.backward()
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0
    assert method.regressor.weight.grad is None  # the hint is no longer trained
    assert t_logits.grad is None


def test_fitnet_joint_stage_adds_weighted_hint():
    method, s_feat, t_feat = make_fitnet(hint_epochs=0, hint_weight=0.25, temperature=3.0, alpha=0.8)
    s_logits, s_f, t_logits, t_f = fitnet_io(s_feat, t_feat)
    out = method(outs(s_logits, **{"body.act0": s_f}), outs(t_logits, **{"body.act1": t_f}), make_batch(), CTX)
    assert set(out.terms) == {"ce", "kd", "hint"}
    with torch.no_grad():
        d = (method.regressor(s_feat) - t_feat).flatten(1).numpy()
    hint = 0.25 * 0.5 * float(np.mean((d**2).sum(1)))
    ce, kd = 0.2 * np_ce(S, Y), 0.8 * np_kd(S, T, 3.0)
    assert out.terms["hint"].item() == pytest.approx(hint, rel=1e-10)
    assert out.terms["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert out.terms["kd"].item() == pytest.approx(kd, rel=1e-12)
    assert out.loss.item() == pytest.approx(ce + kd + hint, rel=1e-10)
    out.loss.backward()
    assert method.regressor.weight.grad.abs().sum() > 0
    assert s_logits.grad.abs().sum() > 0 and s_f.grad.abs().sum() > 0
    assert t_f.grad is None and t_logits.grad is None


def test_fitnet_joint_stage_with_zero_hint_weight_has_no_hint_term():
    method, s_feat, t_feat = make_fitnet(hint_epochs=0, hint_weight=0.0)
    out = method(outs(f64(S), **{"body.act0": s_feat}), outs(f64(T), **{"body.act1": t_feat}), make_batch(), CTX)
    assert set(out.terms) == {"ce", "kd"}


def test_fitnet_config_requires_taps_and_is_strict():
    with pytest.raises(pydantic.ValidationError):
        FitNetConfig()
    with pytest.raises(pydantic.ValidationError):
        FitNetConfig(student_tap="a", teacher_tap="b", hint_epoch=3)


# -------------------------------------------------------------------------------------------- registry


def test_methods_registered_with_papers():
    names = set(METHODS.names())
    assert {"ce", "kd", "label_free_kd", "fitnet"} <= names
    expected = {"ce": CrossEntropy, "kd": KD, "label_free_kd": LabelFreeKD, "fitnet": FitNet}
    for name, cls in expected.items():
        entry = METHODS.get(name)
        assert entry.obj is cls
        assert entry.config is cls.Config
        assert entry.paper.strip(), name
    assert "baseline" in METHODS.get("ce").paper
    assert "1503.02531" in METHODS.get("kd").paper
    assert "2103.05959" in METHODS.get("label_free_kd").paper
    assert "1412.6550" in METHODS.get("fitnet").paper


def test_registry_rejects_duplicate_names_and_names_unknown_ones():
    reg: Registry = Registry("widget")
    reg.register("a", paper="p")(object)
    with pytest.raises(ValueError, match="'a'"):
        reg.register("a")(int)
    assert reg.get("a").obj is object  # the first registration survives
    with pytest.raises(KeyError, match="known: a"):
        reg.get("b")
