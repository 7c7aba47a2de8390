"""CRD: the NCE critic and InfoNCE against numpy, negatives, memory banks, gradients and exact resume.

Expected values are computed with numpy / math here, never by calling the loss under test.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pydantic
import pytest
import torch

from alambic.data.batch import IGNORE_INDEX, INPUT, Batch
from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses import crd_infonce_loss, crd_nce_loss, nce_log_normalizer
from alambic.methods import SetupInfo, StepContext
from alambic.methods.crd import CRD, CRDConfig, Embed, draw_negatives, momentum_update_rows
from alambic.registry import METHODS
from alambic.teachers.base import ModelOutput
from tests.reference import np_softmax

TAU = 0.5


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# anchor [B=2, D=3]; candidates [B, 1+K=3, D], the positive first
A = unit([[1.0, 0.0, 0.5], [0.2, -1.0, 0.3]])
C = unit([[[0.9, 0.1, 0.4], [0.0, 1.0, 0.0], [-1.0, 0.2, 0.1]],
          [[0.1, -0.8, 0.5], [1.0, 1.0, 1.0], [0.3, 0.3, -0.9]]])


def np_scores(a, c, tau):
    return np.einsum("bkd,bd->bk", c, a) / tau


def np_nce(a, c, tau, n, log_z):
    p = np.exp(np_scores(a, c, tau) - log_z)
    k = c.shape[1] - 1
    noise = k / n
    pos = np.log(p[:, 0] / (p[:, 0] + noise))
    neg = np.log(noise / (p[:, 1:] + noise))
    return float(-(pos.sum() + neg.sum()) / a.shape[0])


def f64(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64)


# ------------------------------------------------------------------------------------------------ losses


@pytest.mark.parametrize("log_z", [0.0, 1.7, -0.4])
def test_crd_nce_loss_matches_eq18_in_numpy(log_z):
    got = crd_nce_loss(f64(A), f64(C), TAU, num_data=10, log_normalizer=log_z)
    assert got.item() == pytest.approx(np_nce(A, C, TAU, 10, log_z), rel=1e-12)


def test_crd_nce_loss_without_normaliser_is_the_papers_h():
    # h = e^{s/τ} / (e^{s/τ} + K/N) as printed in the paper (K = 2 negatives, N = 7 samples)
    s = np_scores(A, C, TAU)
    h = np.exp(s) / (np.exp(s) + 2 / 7)
    expected = -(np.log(h[:, 0]).sum() + np.log(1 - h[:, 1:]).sum()) / 2
    assert crd_nce_loss(f64(A), f64(C), TAU, num_data=7).item() == pytest.approx(expected, rel=1e-12)


def test_crd_nce_loss_stable_at_crd_temperature_with_aligned_vectors():
    a = f64(unit([[1.0, 0.0, 0.0]]))
    c = f64(unit([[[1.0, 0.0, 0.0], [1.0, 1e-3, 0.0]]]))  # a negative almost equal to the positive
    loss = crd_nce_loss(a, c, 0.01, num_data=2, log_normalizer=0.0)  # exp(100): overflows outside log space
    assert torch.isfinite(loss)
    # -log h(pos) ≈ 0 and -log(1 - h(neg)) ≈ s_neg/τ − log(K/N)
    s_neg = float(c[0, 1] @ a[0]) / 0.01
    assert loss.item() == pytest.approx(s_neg - math.log(0.5), rel=1e-9)


def test_nce_log_normalizer_is_log_of_n_times_mean_exp():
    expected = math.log(10 * np.exp(np_scores(A, C, TAU)).mean())
    got = nce_log_normalizer(f64(A).requires_grad_(True), f64(C), TAU, 10)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert not got.requires_grad


def test_crd_infonce_loss_is_cross_entropy_on_the_positive():
    s = np_scores(A, C, TAU)
    expected = float(np.mean([-(s[i, 0] - np.log(np.exp(s[i]).sum())) for i in range(2)]))
    assert crd_infonce_loss(f64(A), f64(C), TAU).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("fn", [lambda a, c: crd_nce_loss(a, c, TAU, 10, 0.3), lambda a, c: crd_infonce_loss(a, c, TAU)])
def test_contrastive_losses_send_no_gradient_to_the_bank(fn):
    a, c = f64(A).requires_grad_(True), f64(C).requires_grad_(True)
    fn(a, c).backward()
    assert c.grad is None
    assert a.grad is not None and a.grad.abs().sum() > 0


def test_contrastive_losses_reject_mismatched_shapes_naming_both():
    with pytest.raises(ShapeMismatchError) as err:
        crd_nce_loss(torch.zeros(2, 3), torch.zeros(2, 4, 5), TAU, 10)
    assert "(2, 3)" in str(err.value) and "(2, 4, 5)" in str(err.value)
    with pytest.raises(ShapeMismatchError):
        crd_infonce_loss(torch.zeros(2, 3), torch.zeros(3, 4, 3), TAU)
    with pytest.raises(ValueError, match="at least one negative"):
        crd_nce_loss(torch.zeros(2, 3), torch.zeros(2, 1, 3), TAU, 10)


# ------------------------------------------------------------------------------------- bank mechanics


def test_draw_negatives_excludes_the_anchor_and_stays_in_the_training_ids():
    ids = torch.tensor([0, 2, 3, 7, 9, 12])  # gaps: val/test rows of the raw data are not training samples
    index = torch.tensor([3, 12, 0])
    neg = draw_negatives(ids, index, 500, torch.Generator().manual_seed(1))
    assert neg.shape == (3, 500)
    for row, own in zip(neg.tolist(), index.tolist()):
        assert own not in row
        assert set(row) == set(ids.tolist()) - {own}  # every other training sample can be drawn


def test_draw_negatives_is_a_pure_function_of_the_generator_seed():
    ids, index = torch.arange(50), torch.tensor([4, 9])
    a = draw_negatives(ids, index, 20, torch.Generator().manual_seed(5))
    b = draw_negatives(ids, index, 20, torch.Generator().manual_seed(5))
    c = draw_negatives(ids, index, 20, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_draw_negatives_rejects_a_sample_outside_the_bank():
    with pytest.raises(AlambicError, match=r"\[5\]"):
        draw_negatives(torch.tensor([0, 2, 3]), torch.tensor([2, 5]), 2, torch.Generator().manual_seed(0))


def test_momentum_update_touches_only_the_given_rows():
    torch.manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(6, 3, dtype=torch.float64), dim=1)
    before = bank.clone()
    v = f64(unit([[1.0, 2.0, 3.0], [0.0, -1.0, 1.0]])).requires_grad_(True)
    momentum_update_rows(bank, torch.tensor([4, 1]), v, 0.5)
    expected = unit(0.5 * before.numpy()[[4, 1]] + 0.5 * v.detach().numpy())
    np.testing.assert_allclose(bank.numpy()[[4, 1]], expected, rtol=1e-12)
    untouched = [0, 2, 3, 5]
    assert torch.equal(bank[untouched], before[untouched])
    assert not bank.requires_grad


# --------------------------------------------------------------------------------------------- method

N_SAMPLES = 12
TRAIN_IDS = torch.tensor([0, 1, 2, 4, 5, 7, 8, 10, 11])  # 9 training samples among 12 raw rows
S_TAP, T_TAP = "body.act0", "body.act1"


def make_crd(**cfg) -> CRD:
    torch.manual_seed(0)
    method = CRD(CRDConfig(student_tap=S_TAP, teacher_tap=T_TAP, embed_dim=4, nce_temperature=TAU, **cfg))
    loader = SimpleNamespace(split=SimpleNamespace(index=TRAIN_IDS))
    info = SetupInfo(student=None, num_classes=3, num_samples=N_SAMPLES, steps_per_epoch=3, epochs=2, loader=loader)
    probe_s = {INPUT: ModelOutput(torch.zeros(2, 3), {S_TAP: torch.zeros(2, 5)})}
    probe_t = {INPUT: ModelOutput(torch.zeros(2, 3), {T_TAP: torch.zeros(2, 2, 3)})}  # a map: flattened to 6
    method.setup(probe_s, probe_t, info)
    return method.double()


def io(seed=1, index=(1, 7, 10)):
    g = torch.Generator().manual_seed(seed)
    b = len(index)
    s_feat = torch.randn(b, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    t_feat = torch.randn(b, 2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    s_logits = torch.randn(b, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    t_logits = torch.randn(b, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    target = torch.tensor([2, IGNORE_INDEX, 0][:b])
    batch = Batch(views={INPUT: torch.zeros(b, 1)}, index=torch.tensor(index), target=target,
                  labeled=target != IGNORE_INDEX)
    student = {INPUT: ModelOutput(s_logits, {S_TAP: s_feat})}
    teacher = {INPUT: ModelOutput(t_logits, {T_TAP: t_feat})}
    return student, teacher, batch


def ctx(step: int) -> StepContext:
    return StepContext(step=step, epoch=0, total_steps=6, steps_per_epoch=3)


def np_embed(head: Embed, x: torch.Tensor) -> np.ndarray:
    w, b = head.linear.weight.detach().numpy(), head.linear.bias.detach().numpy()
    return unit(x.detach().numpy().reshape(len(x), -1) @ w.T + b)


def test_setup_sizes_heads_banks_and_caps_negatives():
    m = make_crd()
    assert (m.embed_s.linear.in_features, m.embed_s.linear.out_features) == (5, 4)
    assert (m.embed_t.linear.in_features, m.embed_t.linear.out_features) == (6, 4)
    assert m.memory_s.shape == m.memory_t.shape == (N_SAMPLES, 4)
    np.testing.assert_allclose(m.memory_s.norm(dim=1).numpy(), 1.0, rtol=1e-6)  # random unit vectors
    np.testing.assert_allclose(m.memory_t.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    assert m.num_negatives == len(TRAIN_IDS) - 1  # 4096 capped at training samples − 1
    state = m.state_dict()
    assert {"memory_s", "memory_t", "log_z", "neg_seed", "bank_ids"} <= set(state)  # checkpointed
    assert any(k.startswith("embed_t.") for k, _ in m.named_parameters())  # both heads are trained


def test_forward_loss_equals_ce_plus_weighted_two_sided_nce():
    m = make_crd(num_negatives=3, ce_weight=0.7, crd_weight=0.8, kd_weight=0.0)
    student, teacher, batch = io()
    mem_s, mem_t = m.memory_s.clone().numpy(), m.memory_t.clone().numpy()
    out = m(student, teacher, batch, ctx(4))
    rows = np.concatenate([batch.index.numpy()[:, None],
                           draw_negatives(m.bank_ids, batch.index, 3, m._generator(4)).numpy()], axis=1)
    v_s = np_embed(m.embed_s, student[INPUT].features[S_TAP])
    v_t = np_embed(m.embed_t, teacher[INPUT].features[T_TAP])
    n = len(TRAIN_IDS)
    # the normaliser is fixed from this first batch: log(N · mean exp(s/τ)), one per direction
    log_z_s = math.log(n * np.exp(np_scores(v_s, mem_t[rows], TAU)).mean())
    log_z_t = math.log(n * np.exp(np_scores(v_t, mem_s[rows], TAU)).mean())
    np.testing.assert_allclose(m.log_z.numpy(), [log_z_s, log_z_t], rtol=1e-12)
    crd = 0.8 * (np_nce(v_s, mem_t[rows], TAU, n, log_z_s) + np_nce(v_t, mem_s[rows], TAU, n, log_z_t))
    logits = student[INPUT].logits.detach().numpy()
    ce = 0.7 * np.mean([-math.log(np_softmax(logits[0])[2]), -math.log(np_softmax(logits[2])[0])])  # rows 0, 2 labelled
    assert out.terms["crd"].item() == pytest.approx(crd, rel=1e-10)
    assert out.terms["ce"].item() == pytest.approx(ce, rel=1e-12)
    assert out.loss.item() == pytest.approx(crd + ce, rel=1e-10)
    assert set(out.terms) == {"crd", "ce"}


def test_kd_term_is_added_with_its_weight():
    m = make_crd(kd_weight=1.0, temperature=2.0, ce_weight=0.0)
    student, teacher, batch = io()
    out = m(student, teacher, batch, ctx(0))
    p_s = np_softmax(student[INPUT].logits.detach().numpy() / 2)
    p_t = np_softmax(teacher[INPUT].logits.detach().numpy() / 2)
    kd = 4 * float((p_t * np.log(p_t / p_s)).sum(-1).mean())
    assert set(out.terms) == {"crd", "kd"}
    assert out.terms["kd"].item() == pytest.approx(kd, rel=1e-12)
    assert out.loss.item() == pytest.approx(out.terms["crd"].item() + kd, rel=1e-12)


def test_bank_update_touches_only_the_batch_rows_after_the_loss():
    m = make_crd(momentum=0.5)
    student, teacher, batch = io(index=(1, 7, 10))
    mem_s, mem_t = m.memory_s.clone(), m.memory_t.clone()
    m(student, teacher, batch, ctx(0))
    v_s = np_embed(m.embed_s, student[INPUT].features[S_TAP])
    v_t = np_embed(m.embed_t, teacher[INPUT].features[T_TAP])
    rows = [1, 7, 10]
    np.testing.assert_allclose(m.memory_s[rows].numpy(), unit(0.5 * mem_s[rows].numpy() + 0.5 * v_s), rtol=1e-12)
    np.testing.assert_allclose(m.memory_t[rows].numpy(), unit(0.5 * mem_t[rows].numpy() + 0.5 * v_t), rtol=1e-12)
    others = [i for i in range(N_SAMPLES) if i not in rows]
    assert torch.equal(m.memory_s[others], mem_s[others]) and torch.equal(m.memory_t[others], mem_t[others])


def test_eval_mode_leaves_the_banks_alone():
    m = make_crd().eval()
    mem_s, mem_t = m.memory_s.clone(), m.memory_t.clone()
    m(*io(), ctx(0))
    assert torch.equal(m.memory_s, mem_s) and torch.equal(m.memory_t, mem_t)


def test_gradients_reach_student_and_heads_but_never_teacher_or_banks():
    m = make_crd(kd_weight=1.0)
    student, teacher, batch = io()
    m(student, teacher, batch, ctx(0)).loss.backward()
    assert student[INPUT].features[S_TAP].grad.abs().sum() > 0
    assert student[INPUT].logits.grad.abs().sum() > 0
    assert m.embed_s.linear.weight.grad.abs().sum() > 0
    assert m.embed_t.linear.weight.grad.abs().sum() > 0  # the teacher's head learns from the contrast
    assert teacher[INPUT].features[T_TAP].grad is None
    assert teacher[INPUT].logits.grad is None
    assert not m.memory_s.requires_grad and not m.memory_t.requires_grad


def test_normaliser_is_set_once_then_kept():
    m = make_crd()
    assert torch.isnan(m.log_z).all()
    m(*io(seed=1), ctx(0))
    first = m.log_z.clone()
    m(*io(seed=2, index=(0, 2, 4)), ctx(1))
    assert torch.equal(m.log_z, first)


def test_resume_replays_the_same_negatives_and_loss():
    a = make_crd(num_negatives=4)
    a(*io(seed=1), ctx(0))  # the first step sets Z and moves some rows
    b = make_crd(num_negatives=4)
    torch.manual_seed(123)  # a resumed process has another global RNG state: it must not matter
    b.load_state_dict(a.state_dict())
    out_a = a(*io(seed=2, index=(0, 5, 11)), ctx(1))
    out_b = b(*io(seed=2, index=(0, 5, 11)), ctx(1))
    assert out_a.loss.item() == out_b.loss.item()
    assert torch.equal(a.memory_s, b.memory_s) and torch.equal(a.memory_t, b.memory_t)
    # and the draw does depend on the step
    g1, g2 = a._generator(1), a._generator(2)
    ids, idx = a.bank_ids, torch.tensor([0, 5])
    assert not torch.equal(draw_negatives(ids, idx, 4, g1), draw_negatives(ids, idx, 4, g2))


def test_infonce_objective_needs_no_normaliser():
    m = make_crd(objective="infonce", num_negatives=3, ce_weight=0.0, crd_weight=1.0)
    student, teacher, batch = io()
    mem_s, mem_t = m.memory_s.clone().numpy(), m.memory_t.clone().numpy()
    out = m(student, teacher, batch, ctx(2))
    rows = np.concatenate([batch.index.numpy()[:, None],
                           draw_negatives(m.bank_ids, batch.index, 3, m._generator(2)).numpy()], axis=1)
    v_s = np_embed(m.embed_s, student[INPUT].features[S_TAP])
    v_t = np_embed(m.embed_t, teacher[INPUT].features[T_TAP])

    def infonce(a, c):
        s = np_scores(a, c, TAU)
        return float(np.mean(np.log(np.exp(s).sum(1)) - s[:, 0]))

    assert out.loss.item() == pytest.approx(infonce(v_s, mem_t[rows]) + infonce(v_t, mem_s[rows]), rel=1e-10)
    assert torch.isnan(m.log_z).all()


def test_setup_without_teacher_is_a_clear_error():
    m = CRD(CRDConfig(student_tap=S_TAP, teacher_tap=T_TAP))
    info = SetupInfo(student=None, num_classes=3, num_samples=4, steps_per_epoch=1, epochs=1)
    with pytest.raises(AlambicError, match="needs a teacher"):
        m.setup({INPUT: ModelOutput(torch.zeros(2, 3), {S_TAP: torch.zeros(2, 5)})}, None, info)


def test_config_defaults_follow_repdistiller_and_are_strict():
    cfg = CRDConfig(student_tap="a", teacher_tap="b")
    assert (cfg.embed_dim, cfg.num_negatives, cfg.nce_temperature, cfg.momentum) == (128, 4096, 0.07, 0.5)
    assert (cfg.ce_weight, cfg.kd_weight, cfg.crd_weight, cfg.temperature) == (1.0, 0.0, 0.8, 4.0)
    assert cfg.objective == "nce"
    with pytest.raises(pydantic.ValidationError):
        CRDConfig(student_tap="a", teacher_tap="b", nce_temp=0.1)
    with pytest.raises(pydantic.ValidationError):
        CRDConfig(student_tap="a", teacher_tap="b", momentum=1.0)
    with pytest.raises(pydantic.ValidationError):
        CRDConfig()


def test_crd_is_registered_with_its_paper():
    entry = METHODS.get("crd")
    assert entry.obj is CRD and entry.config is CRDConfig
    assert "1910.10699" in entry.paper
    assert CRD.needs_teacher and CRD.uses_unlabeled
