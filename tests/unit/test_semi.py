"""Semi-supervised family: DHO, mean teacher, thresholded pseudo-labels, the GMM loss gate, k-means labels.

Expected values are computed with numpy / math here, never by calling the function under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pydantic
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alambic.data.batch import IGNORE_INDEX, INPUT, Batch
from alambic.data.loader import TensorLoader
from alambic.data.splits import Split
from alambic.errors import AlambicError, ShapeMismatchError
from alambic.export.weights import export_safetensors, load_weights
from alambic.losses import pseudo_label_loss, softmax_mse_loss, split_kd_loss
from alambic.methods import SetupInfo, StepContext
from alambic.methods.dho import DHO, DHOConfig, choose_mix, mix_log_probs
from alambic.methods.kmeans_pseudo import KMeansPseudo, KMeansPseudoConfig, majority_mapping
from alambic.methods.mean_teacher import MeanTeacher, MeanTeacherConfig
from alambic.methods.pseudo_label import (
    LossGate, LossGateConfig, PseudoLabel, PseudoLabelConfig, correct_labels, gmm_loss_threshold,
)
from alambic.models.taps import Taps
from alambic.models.zoo import MLP
from alambic.registry import METHODS
from alambic.teachers import AnalyticTeacher
from alambic.teachers.base import ModelOutput
from tests.reference import np_ce, np_softmax

CTX = StepContext(step=0, epoch=0, total_steps=10, steps_per_epoch=5)

# 4 samples, 3 classes; rows 1 and 3 are unlabelled.
S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.0, 0.0], [0.5, 0.5, -1.0]]
T = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0], [0.0, 5.0, 0.0], [-1.0, 0.0, 4.0]]
Y = [2, IGNORE_INDEX, 0, IGNORE_INDEX]
LABELED = [True, False, True, False]


def np_ce_rows(logits, target) -> np.ndarray:
    p = np_softmax(logits)
    return np.array([-math.log(p[i, y]) for i, y in enumerate(target)])


def np_kl_rows(s, t, temp) -> np.ndarray:
    p_s, p_t = np_softmax(np.asarray(s) / temp), np_softmax(np.asarray(t) / temp)
    return (p_t * np.log(p_t / p_s)).sum(-1)


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def outs(logits: torch.Tensor, **features: torch.Tensor) -> dict[str, ModelOutput]:
    return {INPUT: ModelOutput(logits, dict(features))}


def make_batch(target=Y, labeled=LABELED, n_features=2, index=None) -> Batch:
    n = len(target)
    return Batch(views={INPUT: torch.zeros(n, n_features, dtype=torch.float64)},
                 index=torch.arange(n) if index is None else torch.as_tensor(index),
                 target=torch.tensor(target), labeled=torch.tensor(labeled))


def info_for(student: nn.Module | None = None, num_classes: int = 3, num_samples: int = 4, **kw) -> SetupInfo:
    return SetupInfo(student, num_classes, num_samples, steps_per_epoch=5, epochs=2, **kw)


# ----------------------------------------------------------------------------------------------- losses


def test_softmax_mse_is_the_mean_squared_probability_gap_and_stops_teacher_gradient():
    s, t = f64(S).requires_grad_(True), f64(T).requires_grad_(True)
    loss = softmax_mse_loss(s, t)
    expected = float(((np_softmax(S) - np_softmax(T)) ** 2).mean())  # mean over samples and classes
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert softmax_mse_loss(f64(S), f64(S) + 3.0).item() == pytest.approx(0.0, abs=1e-15)  # shift-invariant


@pytest.mark.parametrize("tau", [0.0, 0.5, 0.9])
def test_pseudo_label_loss_keeps_confident_rows_and_divides_by_all_rows(tau):
    rows = torch.tensor([False, True, True, True])
    loss = pseudo_label_loss(f64(S), f64(T), tau, rows)
    q = np_softmax(T)
    ce = np_ce_rows(S, q.argmax(-1))
    keep = (q.max(-1) >= tau) & rows.numpy()
    assert loss.item() == pytest.approx(float((ce * keep).sum() / 3), rel=1e-12)
    everyone = pseudo_label_loss(f64(S), f64(T), tau)
    assert everyone.item() == pytest.approx(float((ce * (q.max(-1) >= tau)).sum() / 4), rel=1e-12)


def test_pseudo_label_loss_gradient_only_through_kept_student_rows():
    s, t = f64(S).requires_grad_(True), f64(T).requires_grad_(True)
    q = np_softmax(T)
    tau = float(np.sort(q.max(-1))[1]) + 1e-9  # keeps exactly the two most confident rows
    pseudo_label_loss(s, t, tau).backward()
    assert t.grad is None
    kept = q.max(-1) >= tau
    assert kept.sum() == 2
    for i in range(4):
        assert (s.grad[i].abs().sum() > 0) == kept[i]


def test_pseudo_label_loss_with_no_row_is_zero_and_backpropagates():
    s = f64(S).requires_grad_(True)
    loss = pseudo_label_loss(s, f64(T), 0.5, torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    with pytest.raises(ValueError, match="threshold"):
        pseudo_label_loss(f64(S), f64(T), 1.5)


def test_split_kd_loss_adds_the_labelled_and_unlabelled_means():
    temp = 2.0
    lab = torch.tensor([True, False, False, False])
    kl = np_kl_rows(S, T, temp)
    expected = temp**2 * (kl[0] + kl[1:].mean())  # one labelled row, three unlabelled ones
    assert split_kd_loss(f64(S), f64(T), lab, temp).item() == pytest.approx(float(expected), rel=1e-12)
    everyone = split_kd_loss(f64(S), f64(T), torch.ones(4, dtype=torch.bool), temp)
    assert everyone.item() == pytest.approx(float(temp**2 * kl.mean()), rel=1e-12)  # empty half adds 0
    assert split_kd_loss(f64(T), f64(T), lab, temp).item() == pytest.approx(0.0, abs=1e-14)


# -------------------------------------------------------------------------------------------------- dho


def dho_on_mlp(kd_weight: float = 0.5, seed: int = 0):
    """A DHO method set up on a real MLP(4 -> 5 -> 3) student, whose hidden-layer tap stays attached."""
    torch.manual_seed(seed)
    student = MLP(4, [5], 3).double()
    method = DHO(DHOConfig(tap="body.act0", kd_weight=kd_weight, temperature=2.0))
    taps = Taps(student, ["body.act0"]).attach()
    x = torch.randn(4, 4, dtype=torch.float64)
    logits = student(x)
    method.setup(outs(logits, **taps.take()), None, info_for(student))
    method.double()
    return student, method, taps, x


def dho_forward(student, method, taps, x, teacher=T):
    logits = student(x)
    feats = taps.take()
    return method(outs(logits, **feats), outs(f64(teacher)), make_batch(n_features=4), CTX), logits, feats


def test_dho_loss_is_weighted_ce_on_own_head_plus_split_kd_on_the_second_head():
    student, method, taps, x = dho_on_mlp(kd_weight=0.3)
    out, logits, feats = dho_forward(student, method, taps, x)
    h = feats["body.act0"].detach().numpy()
    z_kd = h @ method.kd_head.weight.detach().numpy().T + method.kd_head.bias.detach().numpy()
    kl = np_kl_rows(z_kd, T, 2.0)
    lab = np.array(LABELED)
    kd = 0.3 * 4.0 * (kl[lab].mean() + kl[~lab].mean())
    ce = 0.7 * np_ce(logits.detach().numpy(), Y)
    assert out.terms["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out.terms["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert out.loss.item() == pytest.approx(ce + kd, rel=1e-10)
    assert out.logits is logits  # training-time predictions are the CE head's
    taps.remove()


def test_dho_with_views_learns_on_the_student_view_from_the_teacher_view():
    """Both heads read `student_view` (features and logits), the teacher term `teacher_view`; nothing else."""
    student, method, taps, x = dho_on_mlp(kd_weight=0.3)
    expected, logits, feats = dho_forward(student, method, taps, x)
    method.config = method.config.model_copy(update={"student_view": "strong", "teacher_view": "weak"})
    method.use_views([INPUT, "weak", "strong"])
    assert method.student_views == ("strong",) and method.teacher_views == ("weak",)
    junk = f64(np.zeros_like(T))
    student_out = {INPUT: ModelOutput(junk), "strong": ModelOutput(logits, feats)}
    teacher_out = {INPUT: ModelOutput(junk), "weak": ModelOutput(f64(T))}
    got = method(student_out, teacher_out, make_batch(n_features=4), CTX)
    assert got.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    with pytest.raises(AlambicError, match="add them to the recipe's `views:` section"):
        method.use_views([INPUT])
    taps.remove()


def test_dho_kd_term_gives_zero_gradient_to_ce_head_and_ce_gives_zero_to_kd_head():
    student, method, taps, x = dho_on_mlp(kd_weight=1.0)  # pure KD
    out, _, _ = dho_forward(student, method, taps, x)
    out.loss.backward()
    for p in student.head.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert method.kd_head.weight.grad.abs().sum() > 0
    assert student.body.fc0.weight.grad.abs().sum() > 0  # KD still shapes the shared features

    student, method, taps, x = dho_on_mlp(kd_weight=0.0)  # pure CE
    out, _, _ = dho_forward(student, method, taps, x)
    out.loss.backward()
    for p in method.kd_head.parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0
    assert student.head.weight.grad.abs().sum() > 0
    taps.remove()


def test_dho_at_half_weight_each_head_gets_exactly_its_own_loss_gradient():
    student, method, taps, x = dho_on_mlp(kd_weight=0.5)
    out, _, _ = dho_forward(student, method, taps, x)
    g_head, g_kd = torch.autograd.grad(out.loss, [student.head.weight, method.kd_head.weight])
    # CE alone, by hand: d(0.5·mean CE)/dW = 0.5 · Σ_labelled (p − onehot) hᵀ / n_labelled
    h = student.body(x).detach()
    p = torch.softmax(student.head(h), -1).detach()
    onehot = F.one_hot(torch.tensor([2, 0]), 3).double()
    rows = torch.tensor([0, 2])
    expected_head = 0.5 * (p[rows] - onehot).T @ h[rows] / 2
    torch.testing.assert_close(g_head, expected_head, rtol=1e-10, atol=1e-12)
    # KD alone: d/dz of T²·KL at T = 2 is T·(p_s − p_t); weighted by 0.5 and each half's 1/n
    z_kd = method.kd_head(h).detach()
    diff = torch.softmax(z_kd / 2, -1) - torch.softmax(f64(T) / 2, -1)
    per_row = 0.5 * 2.0 * diff / 2  # both halves have two rows
    torch.testing.assert_close(g_kd, per_row.T @ h, rtol=1e-10, atol=1e-12)
    taps.remove()


def test_mix_log_probs_is_the_log_of_the_mixed_probabilities():
    a, b = f64(S), f64(T)
    np.testing.assert_allclose(mix_log_probs(a, b, 0.0, 2.0).numpy(), np.log(np_softmax(S)), rtol=1e-12)
    np.testing.assert_allclose(mix_log_probs(a, b, 1.0, 2.0).numpy(), np.log(np_softmax(np.asarray(T) / 2)), rtol=1e-12)
    mixed = 0.7 * np_softmax(S) + 0.3 * np_softmax(np.asarray(T) / 0.5)
    np.testing.assert_allclose(mix_log_probs(a, b, 0.3, 0.5).numpy(), np.log(mixed), rtol=1e-12)
    with pytest.raises(ValueError, match="alpha"):
        mix_log_probs(a, b, 1.2, 1.0)
    with pytest.raises(ValueError, match="beta"):
        mix_log_probs(a, b, 0.5, 0.0)


def test_choose_mix_picks_the_only_pair_that_gets_every_sample_right():
    # target 0 everywhere. A: CE right, KD wrong (right while α < 0.8); B: CE wrong, KD right (α > 0.2);
    # C: CE right, KD wrong (α < 0.2857). Only α = 0.25 gets all three.
    p_ce = np.array([[0.9, 0.1], [0.45, 0.55], [0.62, 0.38]])
    p_kd = np.array([[0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    target = torch.tensor([0, 0, 0])
    alpha, beta = choose_mix(f64(np.log(p_ce)), f64(np.log(p_kd)), target, [0.0, 0.25, 0.5, 0.75, 1.0], [1.0])
    assert (alpha, beta) == (0.25, 1.0)


def test_choose_mix_matches_a_brute_force_search_with_first_best_ties():
    rng = np.random.default_rng(3)
    z_ce, z_kd = rng.normal(size=(40, 4)) * 2, rng.normal(size=(40, 4)) * 2
    y = rng.integers(0, 4, size=40)
    alphas, betas = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], [0.5, 1.0, 4.0]
    best, pair = -1, None
    for b in betas:
        for a in alphas:
            acc = int(((((1 - a) * np_softmax(z_ce) + a * np_softmax(z_kd / b)).argmax(-1)) == y).sum())
            if acc > best:
                best, pair = acc, (a, b)
    assert choose_mix(f64(z_ce), f64(z_kd), torch.tensor(y), alphas, betas) == pair
    # identical heads: every pair ties, so the first (smallest β, then smallest α) wins
    assert choose_mix(f64(z_ce), f64(z_ce), torch.tensor(y), alphas, betas) == (0.0, 0.5)
    with pytest.raises(ShapeMismatchError):
        choose_mix(f64(z_ce), f64(z_kd[:, :3]), torch.tensor(y))


def test_dho_deploy_alpha_zero_reproduces_the_ce_head_argmax():
    student, method, taps, x = dho_on_mlp()
    taps.remove()
    method.alpha, method.beta = 0.0, 1.0
    wrapper = method.deploy(student)
    xs = torch.randn(64, 4, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(wrapper(xs).argmax(-1), student(xs).argmax(-1))
        torch.testing.assert_close(wrapper(xs), student(xs).log_softmax(-1))
    assert sum(len(m._forward_hooks) for m in student.modules()) == 0  # the wrapper leaves no hook behind


def test_dho_deploys_defaults_until_select_mix_then_the_chosen_pair():
    student, method, taps, x = dho_on_mlp()
    taps.remove()
    assert method.deploy(student).alpha == 0.5 and method.deploy(student).beta == 1.0
    val_x = torch.randn(30, 4, dtype=torch.float64)
    val_y = torch.randint(0, 3, (30,))
    with torch.no_grad():
        h = student.body(val_x)
        expected = choose_mix(student.head(h), method.kd_head(h), val_y, method.config.alphas, method.config.betas)
    assert method.select_mix(val_x, val_y) == expected
    wrapper = method.deploy(student)
    assert (wrapper.alpha, wrapper.beta) == expected
    meta = method.deploy_meta()
    assert (meta["alpha"], meta["beta"], meta["tap"]) == (*expected, "body.act0")
    assert meta["selected_on_val"] is True


def test_dho_rebuilt_wrapper_loads_the_saved_weights_and_gives_identical_outputs(tmp_path):
    student, method, taps, x = dho_on_mlp()
    taps.remove()
    student.float(), method.float()
    method.alpha, method.beta = 0.35, 1.5
    wrapper = method.deploy(student)
    assert set(wrapper.state_dict()) == {f"student.{k}" for k in student.state_dict()} | {"kd_head.weight", "kd_head.bias"}
    path = export_safetensors(wrapper, tmp_path / "student.safetensors")
    meta = json.loads(json.dumps(method.deploy_meta()))  # what student.json stores
    torch.manual_seed(123)
    rebuilt = load_weights(DHO.rebuild(MLP(4, [5], 3), meta), path)
    xs = torch.randn(16, 4)
    with torch.no_grad():
        assert torch.equal(rebuilt(xs), wrapper(xs))
    assert (rebuilt.alpha, rebuilt.beta, rebuilt.tap) == (0.35, 1.5, "body.act0")


def test_dho_rejects_map_features_and_needs_a_tap():
    with pytest.raises(ShapeMismatchError, match="features.block0"):
        DHO(DHOConfig(tap="features.block0")).setup(
            outs(torch.zeros(2, 3), **{"features.block0": torch.zeros(2, 4, 3, 3)}), None, None)
    with pytest.raises(pydantic.ValidationError):
        DHOConfig()
    with pytest.raises(pydantic.ValidationError):
        DHOConfig(tap="pool", betas=[1.0, 0.0])
    with pytest.raises(AlambicError, match="setup"):
        DHO(DHOConfig(tap="pool")).deploy(nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------- mean teacher


def test_mean_teacher_is_labelled_ce_plus_weighted_consistency_on_every_sample():
    method = MeanTeacher(MeanTeacherConfig())
    s, t = f64(S).requires_grad_(True), f64(T).requires_grad_(True)
    ctx = StepContext(step=3, epoch=0, total_steps=10, steps_per_epoch=5, values={"consistency_weight": 7.0})
    out = method(outs(s), outs(t), make_batch(), ctx)
    cons = 7.0 * float(((np_softmax(S) - np_softmax(T)) ** 2).mean())
    assert out.terms["ce"].item() == pytest.approx(np_ce(S, Y), rel=1e-12)
    assert out.terms["consistency"].item() == pytest.approx(cons, rel=1e-12)
    assert out.loss.item() == pytest.approx(np_ce(S, Y) + cons, rel=1e-12)
    out.loss.backward()
    assert t.grad is None
    assert s.grad[1].abs().sum() > 0 and s.grad[3].abs().sum() > 0  # unlabelled rows learn from the teacher


def test_mean_teacher_with_two_views_trains_the_student_view_towards_the_teacher_view():
    """The paper's independent perturbations: the student's CE and consistency read `student_view`, the
    teacher is asked for `teacher_view` only; other views are not read."""
    method = MeanTeacher(MeanTeacherConfig(student_view="strong", teacher_view="weak"))
    method.use_views([INPUT, "weak", "strong"])
    assert method.student_views == ("strong",) and method.teacher_views == ("weak",)
    junk = f64(np.zeros_like(S))
    ctx = StepContext(step=3, epoch=0, total_steps=10, steps_per_epoch=5, values={"consistency_weight": 7.0})
    student = {INPUT: ModelOutput(junk), "weak": ModelOutput(junk), "strong": ModelOutput(f64(S))}
    teacher = {INPUT: ModelOutput(junk), "weak": ModelOutput(f64(T)), "strong": ModelOutput(junk)}
    got = method(student, teacher, make_batch(), ctx)
    expected = MeanTeacher(MeanTeacherConfig())(outs(f64(S)), outs(f64(T)), make_batch(), ctx)
    assert got.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    with pytest.raises(AlambicError, match="add them to the recipe's `views:` section"):
        method.use_views([INPUT])


def test_mean_teacher_schedule_is_the_sigmoid_rampup():
    method = MeanTeacher(MeanTeacherConfig(consistency_weight=100.0, rampup_epochs=2))
    info = SetupInfo(None, 3, 4, steps_per_epoch=5, epochs=3)
    w = method.schedules(info)["consistency_weight"]
    steps = np.arange(15)
    expected = 100.0 * np.exp(-5.0 * (1.0 - np.minimum(steps / 10.0, 1.0)) ** 2)
    np.testing.assert_allclose(w, expected, rtol=1e-12)
    assert w[0] == pytest.approx(100 * math.exp(-5)) and w[10] == 100.0 and w[14] == 100.0
    flat = MeanTeacher(MeanTeacherConfig(consistency_weight=3.0, rampup_epochs=0)).schedules(info)
    assert np.all(flat["consistency_weight"] == 3.0)
    # without the loop's schedules the same value comes from the step
    out = method(outs(f64(S)), outs(f64(T)), make_batch(), StepContext(step=4, epoch=0, total_steps=15, steps_per_epoch=5))
    cons = 100.0 * math.exp(-5 * 0.6**2) * float(((np_softmax(S) - np_softmax(T)) ** 2).mean())
    assert out.terms["consistency"].item() == pytest.approx(cons, rel=1e-12)


def test_mean_teacher_input_noise_reruns_the_student_on_a_noisy_input():
    torch.manual_seed(0)
    student = MLP(2, [4], 3).double()
    method = MeanTeacher(MeanTeacherConfig(input_noise=0.5))
    method.setup(None, None, info_for(student))
    batch = make_batch()
    clean = student(batch.input)
    ctx = StepContext(0, 0, 10, 5, {"consistency_weight": 1.0})
    noisy = method(outs(clean), outs(f64(T)), batch, ctx)
    assert not torch.allclose(noisy.logits, clean)
    noisy.loss.backward()
    assert student.body.fc0.weight.grad.abs().sum() > 0
    method.eval()  # no noise outside training
    assert method(outs(clean), outs(f64(T)), batch, ctx).logits is clean
    with pytest.raises(AlambicError, match="setup"):
        MeanTeacher(MeanTeacherConfig(input_noise=0.1))(outs(clean), outs(f64(T)), batch, ctx)


# ------------------------------------------------------------------------------------------ pseudo_label


def test_pseudo_label_method_is_ce_plus_lambda_confident_unlabelled_term():
    method = PseudoLabel(PseudoLabelConfig(threshold=0.9, weight=2.0))
    out = method(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    q = np_softmax(T)
    ce_rows = np_ce_rows(S, q.argmax(-1))
    keep = (q.max(-1) >= 0.9) & ~np.array(LABELED)
    assert keep.tolist() == [False, False, False, True]  # row 2 is confident but labelled
    pl = 2.0 * float((ce_rows * keep).sum() / 2)
    assert out.terms["pseudo"].item() == pytest.approx(pl, rel=1e-12)
    assert out.loss.item() == pytest.approx(np_ce(S, Y) + pl, rel=1e-12)
    both = PseudoLabel(PseudoLabelConfig(threshold=0.9, unlabeled_only=False))(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    assert both.terms["pseudo"].item() == pytest.approx(float(ce_rows[2] + ce_rows[3]) / 4, rel=1e-12)


def test_pseudo_label_with_weak_strong_views_labels_the_weak_view_and_trains_the_strong_one():
    """FixMatch's pair: the teacher's pseudo-labels come from `teacher_view`, the student learns on
    `student_view`; the input view and the other side's view are not read."""
    method = PseudoLabel(PseudoLabelConfig(threshold=0.9, teacher_view="weak", student_view="strong"))
    method.use_views([INPUT, "weak", "strong"])
    assert method.student_views == ("strong",) and method.teacher_views == ("weak",)
    junk = f64(np.zeros_like(S))
    student = {INPUT: ModelOutput(junk), "weak": ModelOutput(junk), "strong": ModelOutput(f64(S))}
    teacher = {INPUT: ModelOutput(junk), "weak": ModelOutput(f64(T)), "strong": ModelOutput(junk)}
    got = method(student, teacher, make_batch(), CTX)
    expected = PseudoLabel(PseudoLabelConfig(threshold=0.9))(outs(f64(S)), outs(f64(T)), make_batch(), CTX)
    assert got.loss.item() == pytest.approx(expected.loss.item(), rel=1e-12)
    with pytest.raises(AlambicError, match="add them to the recipe's `views:` section"):
        method.use_views([INPUT])


# ------------------------------------------------------------------------------------------- loss gate


def bimodal(seed=0, n_low=300, n_high=100):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.2, 0.05, n_low), rng.normal(2.0, 0.3, n_high)])


def test_gmm_threshold_lies_between_the_modes_where_the_posteriors_cross():
    from sklearn.mixture import GaussianMixture

    losses = bimodal()
    thr = gmm_loss_threshold(losses, seed=0)
    assert 0.35 < thr < 1.1  # above the low mode's bulk, below the high mode's
    assert (losses[:300] < thr).mean() == 1.0 and (losses[300:] >= thr).mean() == 1.0
    gmm = GaussianMixture(2, random_state=0, reg_covar=1e-6).fit(losses[:, None])
    low = int(np.argmin(gmm.means_[:, 0]))
    post = gmm.predict_proba(np.array([[thr - 1e-6], [thr + 1e-6]]))[:, low]
    assert post[0] >= 0.5 >= post[1]
    assert gmm_loss_threshold(losses, seed=0) == thr  # deterministic


def test_gmm_threshold_degenerate_inputs():
    assert gmm_loss_threshold(np.full(10, 0.3)) == math.inf  # nothing to separate: keep every label
    with pytest.raises(ValueError, match="NaN"):
        gmm_loss_threshold(np.array([0.1, np.nan, 2.0]))


def test_label_correction_changes_only_gated_out_samples():
    rng = np.random.default_rng(1)
    pseudo = torch.from_numpy(rng.integers(0, 5, 50))
    keep = torch.from_numpy(rng.random(50) < 0.6)
    logits = torch.from_numpy(rng.normal(size=(50, 5)))
    out = correct_labels(pseudo, keep, logits)
    assert torch.equal(out[keep], pseudo[keep])
    assert torch.equal(out[~keep], torch.from_numpy(logits.numpy().argmax(-1))[~keep])
    changed = out != pseudo
    assert not (changed & keep).any() and changed.any()


def test_loss_gate_records_losses_then_gates_and_corrects_at_the_next_epoch():
    n = 40
    rng = np.random.default_rng(0)
    t = np.full((n, 3), -4.0)
    t[:, 0] = 4.0  # the teacher says class 0 for everyone
    s = rng.normal(0, 0.1, (n, 3))
    s[:20, 0] += 5.0  # the student agrees on the first half (low loss) ...
    s[20:, 1] += 3.0 + rng.random(20)  # ... and prefers class 1 on the second half (high loss)
    batch = make_batch([IGNORE_INDEX] * n, [False] * n, index=torch.arange(n) + 10)
    method = LossGate(LossGateConfig())
    method.setup(None, None, info_for(num_samples=60))
    out0 = method(outs(f64(s)), outs(f64(t)), batch, StepContext(0, 0, 4, 2))
    ce0 = np_ce_rows(s, [0] * n)
    assert out0.terms["pseudo"].item() == pytest.approx(float(ce0.mean()), rel=1e-12)  # no gate in epoch 0
    np.testing.assert_allclose(method.sample_loss[10:50].numpy(), ce0, rtol=1e-6)
    assert method.sample_seen.sum() == n and not method.sample_seen[:10].any()

    out1 = method(outs(f64(s)), outs(f64(t)), batch, StepContext(2, 1, 4, 2))
    gate = gmm_loss_threshold(ce0.astype(np.float32), 0)  # the store holds float32
    assert float(method.gate) == pytest.approx(gate)
    assert int(method.gate_epoch) == 1 and method.sample_seen.sum() == n  # cleared, then refilled by this step
    keep = ce0 < gate
    assert keep[:20].all() and not keep[20:].any()
    target = np.where(keep, 0, s.argmax(-1))
    assert out1.terms["pseudo"].item() == pytest.approx(float(np_ce_rows(s, target).mean()), rel=1e-12)
    dropped = LossGate(LossGateConfig(label_correction=False))
    dropped.setup(None, None, info_for(num_samples=60))
    dropped(outs(f64(s)), outs(f64(t)), batch, StepContext(0, 0, 4, 2))
    out_d = dropped(outs(f64(s)), outs(f64(t)), batch, StepContext(2, 1, 4, 2))
    assert out_d.terms["pseudo"].item() == pytest.approx(float((ce0 * keep).sum() / n), rel=1e-12)


def test_loss_gate_buffers_are_state():
    method = LossGate(LossGateConfig())
    method.setup(None, None, info_for(num_samples=7))
    assert {"gate", "gate_epoch", "sample_loss", "sample_seen"} <= set(method.state_dict())
    assert method.sample_loss.shape == (7,)


# ------------------------------------------------------------------------------------------ k-means


def test_majority_mapping_is_the_vote_of_labelled_members():
    clusters = np.array([0, 0, 0, 1, 1, 2, 2, 3, 3])
    labels = np.array([3, 3, 1, IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, 5, 4])
    # cluster 0: 3,3,1 -> 3; cluster 1: only 2 votes -> 2; cluster 2: nobody labelled; cluster 3: tie -> 4
    assert majority_mapping(clusters, labels, 4).tolist() == [3, 2, IGNORE_INDEX, 4]


def kmeans_setup(seed: int, x: torch.Tensor, y: torch.Tensor, labeled: torch.Tensor, **cfg) -> KMeansPseudo:
    index = torch.arange(len(x)) * 2  # stable ids need not be contiguous
    split = Split(x, torch.where(labeled, y, torch.full_like(y, IGNORE_INDEX)), index, labeled)
    loader = TensorLoader(split, batch_size=7, shuffle=True, seed=seed)
    teacher = AnalyticTeacher(lambda v: v * 1.0)  # the "logits" are the inputs themselves
    method = KMeansPseudo(KMeansPseudoConfig(seed=seed, n_init=3, **cfg))
    method.setup(None, None, info_for(num_classes=3, num_samples=int(index.max()) + 1, loader=loader, teacher=teacher))
    return method


def blobs(seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    y = torch.arange(3).repeat_interleave(12)
    x = centers[y] + torch.randn(36, 3, generator=g)
    x = torch.cat([x, x[:6]])  # six duplicated samples
    y = torch.cat([y, y[:6]])
    labeled = torch.zeros(42, dtype=torch.bool)
    labeled[::4] = True
    return x, y, labeled


def test_kmeans_pseudo_labels_are_deterministic_and_equal_for_duplicates():
    x, y, labeled = blobs()
    a = kmeans_setup(0, x, y, labeled)
    b = kmeans_setup(0, x, y, labeled)
    assert torch.equal(a.pseudo, b.pseudo) and torch.equal(a.cluster, b.cluster)
    rows = torch.arange(42) * 2
    assert torch.equal(a.pseudo[rows[:6]], a.pseudo[rows[36:]])  # duplicates share their label
    assert torch.equal(a.pseudo[rows], a.cluster_class[a.cluster[rows]])
    assert torch.equal(a.pseudo[rows], y)  # well-separated blobs: every cluster named right
    assert (a.pseudo[1::2] == IGNORE_INDEX).all()  # ids the training split does not hold


def test_kmeans_pseudo_trains_ce_on_stored_labels_and_ignores_unmapped_clusters():
    x, y, labeled = blobs()
    method = kmeans_setup(0, x, y, labeled, n_clusters=4)
    assert method.cluster_class.shape == (4,)
    batch = Batch(views={INPUT: x[:5]}, index=torch.tensor([0, 2, 4, 6, 8]), target=torch.full((5,), IGNORE_INDEX))
    s = f64(np.random.default_rng(0).normal(size=(5, 3)))
    method.pseudo[2] = IGNORE_INDEX  # as if sample 2's cluster had no labelled member
    target = method.pseudo[batch.index].numpy()
    assert target[1] == IGNORE_INDEX and (target[[0, 2, 3, 4]] != IGNORE_INDEX).all()
    out = method(outs(s), None, batch, CTX)
    assert out.loss.item() == pytest.approx(np_ce(s.numpy(), target), rel=1e-12)


def test_kmeans_pseudo_needs_labels_and_the_teacher():
    x, y, _ = blobs()
    with pytest.raises(AlambicError, match="no labelled sample"):
        kmeans_setup(0, x, y, torch.zeros(42, dtype=torch.bool))
    with pytest.raises(AlambicError, match="loader and the teacher"):
        KMeansPseudo().setup(None, None, info_for())


def test_semi_methods_registered_with_papers():
    expected = {"dho": "2505.07675", "mean_teacher": "1703.01780", "pseudo_label": "2001.07685",
                "loss_gate": "2208.01928", "kmeans_pseudo": "2303.05668"}
    for name, arxiv in expected.items():
        entry = METHODS.get(name)
        assert arxiv in entry.paper
        assert entry.obj.needs_teacher and entry.obj.uses_unlabeled
