"""Feature and relation KD: AT, SP, RKD, PKT, spatial affinity, token relations, MLKD.

Each loss is checked against its paper's equation recomputed here with numpy (never by calling the loss
under test), plus the invariances the papers name, the stop-gradient on the teacher, and the errors on
incompatible shapes. The methods are checked to add exactly ``ce + kd + weight · Σ pairs``.
"""

from __future__ import annotations

import math

import numpy as np
import pydantic
import pytest
import torch

from alambic.data.batch import IGNORE_INDEX, INPUT, Batch
from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses import (
    at_loss, nearest_layers_loss, pkt_loss, rkd_angle_loss, rkd_distance_loss, rkd_loss, sp_loss,
    spatial_affinity, spatial_affinity_loss, token_relation, token_relation_loss,
)
from alambic.methods import StepContext
from alambic.methods.attention_transfer import AT, ATConfig
from alambic.methods.mlkd import MLKD, MLKDConfig
from alambic.methods.relation import PKT, RKD, SP, PKTConfig, RKDConfig, SPConfig
from alambic.methods.spatial_affinity import SpatialAffinity, SpatialAffinityConfig
from alambic.methods.token_relation import TokenRelation, TokenRelationConfig
from alambic.registry import METHODS
from alambic.teachers.base import ModelOutput
from tests.reference import np_ce, np_kd

CTX = StepContext(step=0, epoch=0, total_steps=10, steps_per_epoch=5)
RNG = np.random.default_rng(0)


def f64(x) -> torch.Tensor:
    return torch.tensor(np.asarray(x), dtype=torch.float64)


def rand(*shape) -> np.ndarray:
    return RNG.standard_normal(shape)


def orthogonal(d: int) -> np.ndarray:
    q, r = np.linalg.qr(RNG.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


# --------------------------------------------------------------------------- numpy references (paper equations)


def np_at(s, t, p=2.0) -> float:
    def q(a):
        m = (np.abs(a) ** p).sum(1).reshape(len(a), -1)
        return m / np.linalg.norm(m, axis=1, keepdims=True)
    return float(((q(s) - q(t)) ** 2).mean())


def np_sp(s, t) -> float:
    def g(a):
        a = a.reshape(len(a), -1)
        m = a @ a.T
        return m / np.linalg.norm(m, axis=1, keepdims=True)
    return float(((g(s) - g(t)) ** 2).sum() / len(s) ** 2)


def huber(x):
    ax = np.abs(x)
    return np.where(ax < 1, 0.5 * x**2, ax - 0.5)


def np_rkd_terms(s, t) -> tuple[float, float]:
    def dist(e):
        d = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
        return d / d[d > 0].mean()

    def angle(e):  # a[j, i, k] = <e_ij, e_kj>, e_ij = (x_i - x_j)/|x_i - x_j|, 0 where i = j or k = j
        n = len(e)
        a = np.zeros((n, n, n))
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    if i == j or k == j:
                        continue
                    u, v = e[i] - e[j], e[k] - e[j]
                    a[j, i, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        return a

    return float(huber(dist(s) - dist(t)).mean()), float(huber(angle(s) - angle(t)).mean())


def np_pkt(s, t, eps=1e-7) -> float:
    def p(e):
        u = e / (np.linalg.norm(e, axis=1, keepdims=True) + eps)
        k = (u @ u.T + 1) / 2
        return k / k.sum(1, keepdims=True)
    ps, pt = p(s), p(t)
    return float((pt * np.log((pt + eps) / (ps + eps))).mean())


def np_affinity(f, eps=1e-7):
    f = f.reshape(f.shape[0], f.shape[1], -1)
    f = f / (np.linalg.norm(f, axis=1, keepdims=True) + eps)
    return np.einsum("bci,bcj->bij", f, f)


def np_spatial_affinity(s, t) -> float:
    return float(np.abs(np_affinity(s) - np_affinity(t)).mean())


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_relations(q, k, heads):
    b, n, c = q.shape
    d = c // heads
    qh = q.reshape(b, n, heads, d).transpose(0, 2, 1, 3)
    kh = k.reshape(b, n, heads, d).transpose(0, 2, 1, 3)
    return np_log_softmax(qh @ kh.transpose(0, 1, 3, 2) / math.sqrt(d))


def np_token_relation(sq, sk, tq, tk, heads) -> float:
    ls, lt = np_relations(sq, sk, heads), np_relations(tq, tk, heads)
    return float((np.exp(lt) * (lt - ls)).sum(-1).mean())


# ------------------------------------------------------------------------------------------------------ AT


@pytest.mark.parametrize("p", [2.0, 1.0, 3.0])
def test_at_loss_is_mean_squared_difference_of_normalised_attention_maps(p):
    s, t = rand(3, 4, 2, 3), rand(3, 6, 2, 3)  # channels differ, positions match
    assert at_loss(f64(s), f64(t), p=p).item() == pytest.approx(np_at(s, t, p), rel=1e-10)


def test_at_loss_hand_computed_single_position_pair():
    # one sample, one channel, two positions: Q_S ∝ (1², 0²) = (1, 0); Q_T ∝ (3², 4²) = (9, 16) / √337
    s = f64([[[[1.0, 0.0]]]])
    t = f64([[[[3.0, 4.0]]]])
    n = math.sqrt(81 + 256)
    expected = ((1 - 9 / n) ** 2 + (0 - 16 / n) ** 2) / 2
    assert at_loss(s, t).item() == pytest.approx(expected, rel=1e-12)


def test_at_loss_ignores_channel_order_and_feature_scale():
    s, t = rand(2, 5, 3, 3), rand(2, 4, 3, 3)
    base = at_loss(f64(s), f64(t)).item()
    assert at_loss(f64(s[:, ::-1].copy() * 7.0), f64(t)).item() == pytest.approx(base, rel=1e-10)
    assert at_loss(f64(t * 3.0), f64(t)).item() == pytest.approx(0.0, abs=1e-14)


@pytest.mark.parametrize("s_shape,t_shape", [((2, 4, 3, 3), (2, 4, 2, 2)), ((2, 4, 3, 3), (3, 4, 3, 3)),
                                             ((2, 16), (2, 16))])
def test_at_loss_rejects_unmatched_maps_naming_both_shapes(s_shape, t_shape):
    with pytest.raises(ShapeMismatchError) as err:
        at_loss(torch.zeros(s_shape), torch.zeros(t_shape))
    assert str(s_shape) in str(err.value) and str(t_shape) in str(err.value)


def test_at_loss_teacher_gets_no_gradient():
    s, t = f64(rand(2, 3, 2, 2)).requires_grad_(True), f64(rand(2, 5, 2, 2)).requires_grad_(True)
    at_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------------ SP


def test_sp_loss_matches_squared_frobenius_over_b_squared():
    s, t = rand(4, 3, 2, 2), rand(4, 7)
    assert sp_loss(f64(s), f64(t)).item() == pytest.approx(np_sp(s, t), rel=1e-10)


def test_sp_loss_is_invariant_to_channel_permutation_and_feature_width():
    s, t = rand(5, 6), rand(5, 9)
    base = sp_loss(f64(s), f64(t)).item()
    perm = RNG.permutation(6)
    assert sp_loss(f64(s[:, perm]), f64(t)).item() == pytest.approx(base, rel=1e-10)
    # the teacher's features repeated side by side (twice as wide) give the same B×B relation
    assert sp_loss(f64(s), f64(np.concatenate([t, t], 1))).item() == pytest.approx(base, rel=1e-10)
    assert sp_loss(f64(3.0 * s), f64(s)).item() == pytest.approx(0.0, abs=1e-14)  # a rescaled copy matches


def test_sp_loss_needs_the_same_batch_and_stops_the_teacher_gradient():
    with pytest.raises(ShapeMismatchError, match=r"\(4, 3\).*\(5, 3\)"):
        sp_loss(torch.zeros(4, 3), torch.zeros(5, 3))
    s, t = f64(rand(4, 3)).requires_grad_(True), f64(rand(4, 5)).requires_grad_(True)
    sp_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------- RKD


def test_rkd_terms_match_the_paper_equations():
    s, t = rand(5, 3), rand(5, 4)
    d_ref, a_ref = np_rkd_terms(s, t)
    assert rkd_distance_loss(f64(s), f64(t)).item() == pytest.approx(d_ref, rel=1e-9)
    assert rkd_angle_loss(f64(s), f64(t)).item() == pytest.approx(a_ref, rel=1e-9)
    assert rkd_loss(f64(s), f64(t), 25.0, 50.0).item() == pytest.approx(25 * d_ref + 50 * a_ref, rel=1e-9)
    assert rkd_loss(f64(s), f64(t), 0.0, 2.0).item() == pytest.approx(2 * a_ref, rel=1e-9)


def test_rkd_is_invariant_to_rotation_translation_and_uniform_scale_of_either_space():
    s, t = rand(6, 4), rand(6, 5)
    base = rkd_loss(f64(s), f64(t), 25.0, 50.0).item()
    s2 = 3.5 * s @ orthogonal(4) + rand(1, 4)
    t2 = 0.2 * t @ orthogonal(5) - 2.0
    assert rkd_loss(f64(s2), f64(t), 25.0, 50.0).item() == pytest.approx(base, rel=1e-9)
    assert rkd_loss(f64(s), f64(t2), 25.0, 50.0).item() == pytest.approx(base, rel=1e-9)
    # a rotated, scaled copy of the teacher (same width) has nothing left to learn
    assert rkd_loss(f64(2 * t @ orthogonal(5)), f64(t), 25.0, 50.0).item() == pytest.approx(0.0, abs=1e-12)
    # ...while a non-uniform stretch does
    assert rkd_loss(f64(t * np.array([1, 1, 1, 1, 5.0])), f64(t), 25.0, 50.0).item() > 1e-3


def test_rkd_gradients_are_finite_with_duplicate_rows_and_tiny_batches():
    s = f64(np.repeat(rand(2, 3), 2, axis=0)).requires_grad_(True)  # rows 0,1 and 2,3 coincide
    rkd_loss(s, f64(rand(4, 5)), 25.0, 50.0).backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    one = f64(rand(1, 3)).requires_grad_(True)
    loss = rkd_loss(one, f64(rand(1, 2)), 25.0, 50.0)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(one.grad).all()


def test_rkd_rejects_negative_weights_and_other_batches():
    with pytest.raises(ValueError, match="weights"):
        rkd_loss(torch.zeros(3, 2), torch.zeros(3, 2), -1.0, 1.0)
    with pytest.raises(ShapeMismatchError, match=r"\(3, 2\).*\(4, 2\)"):
        rkd_loss(torch.zeros(3, 2), torch.zeros(4, 2), 1.0, 1.0)


# ----------------------------------------------------------------------------------------------------- PKT


def test_pkt_loss_is_kl_teacher_to_student_of_cosine_kernel_conditionals():
    s, t = rand(5, 3), rand(5, 8)
    assert pkt_loss(f64(s), f64(t)).item() == pytest.approx(np_pkt(s, t), rel=1e-9)
    # KL is asymmetric: swapping the roles gives the other direction, not the same number
    assert pkt_loss(f64(t), f64(s)).item() == pytest.approx(np_pkt(t, s), rel=1e-9)
    assert abs(np_pkt(s, t) - np_pkt(t, s)) > 1e-6


def test_pkt_loss_vanishes_for_any_per_sample_rescaling_of_the_teacher():
    t = rand(6, 4)
    scaled = t * np.exp(rand(6, 1))  # cosines unchanged
    assert pkt_loss(f64(scaled), f64(t)).item() == pytest.approx(0.0, abs=1e-12)
    s = f64(rand(6, 4)).requires_grad_(True)
    tt = f64(t).requires_grad_(True)
    pkt_loss(s, tt).backward()
    assert tt.grad is None and s.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ spatial affinity


def test_spatial_affinity_loss_matches_fakd_l1_of_cosine_affinities():
    s, t = rand(2, 3, 2, 3), rand(2, 5, 2, 3)
    assert spatial_affinity_loss(f64(s), f64(t)).item() == pytest.approx(np_spatial_affinity(s, t), rel=1e-10)


def test_spatial_affinity_is_symmetric_with_unit_diagonal():
    a = spatial_affinity(f64(rand(2, 4, 3, 3)))
    assert a.shape == (2, 9, 9)
    assert torch.allclose(a, a.transpose(1, 2), atol=1e-14)
    assert torch.allclose(torch.diagonal(a, dim1=1, dim2=2), torch.ones(2, 9, dtype=torch.float64), atol=1e-6)


def test_spatial_affinity_loss_is_invariant_to_positive_per_position_scaling():
    s, t = rand(2, 3, 3, 3), rand(2, 6, 3, 3)
    w = np.exp(rand(2, 1, 3, 3))  # one positive factor per sample and position
    base = spatial_affinity_loss(f64(s), f64(t)).item()
    assert spatial_affinity_loss(f64(s * w), f64(t)).item() == pytest.approx(base, abs=1e-6)
    assert spatial_affinity_loss(f64(t * w), f64(t)).item() == pytest.approx(0.0, abs=1e-6)


def test_spatial_affinity_loss_needs_matching_positions_and_stops_teacher_gradient():
    with pytest.raises(ShapeMismatchError) as err:
        spatial_affinity_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2))
    assert "(2, 3, 4, 4)" in str(err.value) and "(2, 3, 2, 2)" in str(err.value)
    s, t = f64(rand(2, 3, 2, 2)).requires_grad_(True), f64(rand(2, 3, 2, 2)).requires_grad_(True)
    spatial_affinity_loss(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- token relation


@pytest.mark.parametrize("heads", [1, 2])
def test_token_relation_loss_is_kl_of_qk_softmax_per_head(heads):
    sq, sk = rand(2, 5, 4), rand(2, 5, 4)  # student width 4
    tq, tk = rand(2, 5, 6), rand(2, 5, 6)  # teacher width 6
    got = token_relation_loss(f64(sq), f64(sk), f64(tq), f64(tk), num_heads=heads).item()
    assert got == pytest.approx(np_token_relation(sq, sk, tq, tk, heads), rel=1e-10)


def test_token_relations_are_row_stochastic():
    r = token_relation(f64(rand(3, 4, 6)), f64(rand(3, 4, 6)), num_heads=3).exp()
    assert r.shape == (3, 3, 4, 4)
    assert torch.allclose(r.sum(-1), torch.ones(3, 3, 4, dtype=torch.float64), atol=1e-12)


def test_token_relation_loss_vanishes_when_q_k_match_up_to_an_orthogonal_map():
    tq, tk = rand(2, 5, 4), rand(2, 5, 4)
    r = orthogonal(4)
    assert token_relation_loss(f64(tq @ r), f64(tk @ r), f64(tq), f64(tk)).item() == pytest.approx(0.0, abs=1e-12)
    assert token_relation_loss(f64(tq @ r), f64(tk), f64(tq), f64(tk)).item() > 1e-3


def test_token_relation_loss_checks_tokens_and_heads_and_stops_teacher_gradient():
    with pytest.raises(ShapeMismatchError) as err:
        token_relation_loss(torch.zeros(2, 5, 4), torch.zeros(2, 5, 4), torch.zeros(2, 17, 4), torch.zeros(2, 17, 4))
    assert "(2, 5, 4)" in str(err.value) and "(2, 17, 4)" in str(err.value)
    with pytest.raises(ShapeMismatchError, match="num_heads=3"):
        token_relation_loss(torch.zeros(2, 5, 4), torch.zeros(2, 5, 4), torch.zeros(2, 5, 6), torch.zeros(2, 5, 6), 3)
    sq, sk = f64(rand(2, 3, 4)).requires_grad_(True), f64(rand(2, 3, 4)).requires_grad_(True)
    tq, tk = f64(rand(2, 3, 4)).requires_grad_(True), f64(rand(2, 3, 4)).requires_grad_(True)
    token_relation_loss(sq, sk, tq, tk, 2).backward()
    assert tq.grad is None and tk.grad is None
    assert sq.grad.abs().sum() > 0 and sk.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- MLKD layer term


def np_nearest(s, ts, beta, k):
    d = np.stack([np.sqrt(((s - t) ** 2).sum(-1)) for t in ts], -1)
    d = np.sort(d, -1)[..., :k]
    return float((d * np.asarray(beta)).sum(-1).mean() / k)


def test_nearest_layers_loss_weights_the_k_nearest_teacher_layers_per_position():
    s = rand(4, 3)
    ts = [s + 0.1 * rand(4, 3), rand(4, 3), s + rand(4, 3)]  # nearest layer differs by sample
    got = nearest_layers_loss(f64(s), [f64(t) for t in ts], weights=[1.0, 0.5], top_k=2).item()
    assert got == pytest.approx(np_nearest(s, ts, [1.0, 0.5], 2), rel=1e-10)
    # tokens: [B, T, D] ranks per (sample, token)
    s3, ts3 = rand(2, 3, 4), [rand(2, 3, 4) for _ in range(3)]
    got3 = nearest_layers_loss(f64(s3), [f64(t) for t in ts3], top_k=1).item()
    assert got3 == pytest.approx(np_nearest(s3, ts3, [1.0], 1), rel=1e-10)
    # per-layer student features (maps on the student side)
    ss = [rand(4, 3) for _ in range(3)]
    d = np.stack([np.sqrt(((a - b) ** 2).sum(-1)) for a, b in zip(ss, ts)], -1)
    got_s = nearest_layers_loss([f64(a) for a in ss], [f64(t) for t in ts]).item()
    assert got_s == pytest.approx(float(d.mean()), rel=1e-10)


def test_nearest_layers_loss_rejects_bad_k_weights_and_shapes():
    s, ts = torch.zeros(2, 3), [torch.zeros(2, 3), torch.zeros(2, 3)]
    with pytest.raises(ValueError, match="top_k"):
        nearest_layers_loss(s, ts, top_k=3)
    with pytest.raises(ValueError, match="weights"):
        nearest_layers_loss(s, ts, weights=[1.0], top_k=2)
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3\).*\(2, 4\)"):
        nearest_layers_loss(s, [torch.zeros(2, 4)])


# ---------------------------------------------------------------------------------------------- methods

S_LOGITS = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.0, 0.0], [0.5, 0.5, -1.0]]
T_LOGITS = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0], [0.0, 3.0, 0.0], [-1.0, 0.0, 1.0]]
Y = [2, IGNORE_INDEX, 0, IGNORE_INDEX]


def make_batch() -> Batch:
    return Batch(views={INPUT: torch.zeros(4, 2)}, index=torch.arange(4), target=torch.tensor(Y),
                 labeled=torch.tensor([y != IGNORE_INDEX for y in Y]))


def outs(logits, **features) -> dict[str, ModelOutput]:
    return {INPUT: ModelOutput(logits, dict(features))}


MAPS = {"s0": rand(4, 3, 4, 4), "s1": rand(4, 5, 2, 2), "t0": rand(4, 6, 4, 4), "t1": rand(4, 2, 2, 2)}
VECS = {"s0": rand(4, 3), "t0": rand(4, 7)}
PAIRED = [  # (method class, config kwargs, features, numpy pair loss, weight key default)
    (AT, {}, MAPS, np_at, 1000.0),
    (SpatialAffinity, {}, MAPS, np_spatial_affinity, 1.0),
    (SP, {}, MAPS, np_sp, 3000.0),
    (RKD, {"distance_weight": 2.0, "angle_weight": 3.0}, VECS, lambda s, t: 2 * np_rkd_terms(s, t)[0] + 3 * np_rkd_terms(s, t)[1], 1.0),
    (PKT, {}, VECS, np_pkt, 30000.0),
]
IDS = [c[0].__name__ for c in PAIRED]


def paired_setup(cls, cfg, feats, **extra):
    taps = sorted(k for k in feats if k.startswith("s")), sorted(k for k in feats if k.startswith("t"))
    method = cls(cls.Config(student_taps=taps[0], teacher_taps=taps[1], **cfg, **extra))
    s_feats = {k: f64(v).requires_grad_(True) for k, v in feats.items() if k.startswith("s")}
    t_feats = {k: f64(v).requires_grad_(True) for k, v in feats.items() if k.startswith("t")}
    s_logits, t_logits = f64(S_LOGITS).requires_grad_(True), f64(T_LOGITS).requires_grad_(True)
    s_out, t_out = outs(s_logits, **s_feats), outs(t_logits, **t_feats)
    method.setup(s_out, t_out, None)
    return method, s_out, t_out, taps


@pytest.mark.parametrize("cls,cfg,feats,ref,default_weight", PAIRED, ids=IDS)
def test_paired_method_defaults_are_ce_plus_weighted_sum_over_pairs(cls, cfg, feats, ref, default_weight):
    method, s_out, t_out, (s_taps, t_taps) = paired_setup(cls, cfg, feats)
    assert method.config.feature_weight == default_weight and method.config.ce_weight == 1.0
    out = method(s_out, t_out, make_batch(), CTX)
    feature = default_weight * sum(ref(feats[s], feats[t]) for s, t in zip(s_taps, t_taps))
    assert set(out.terms) == {"ce", method.term}
    assert out.terms["ce"].item() == pytest.approx(np_ce(S_LOGITS, Y), rel=1e-12)
    assert out.terms[method.term].item() == pytest.approx(feature, rel=1e-8)
    assert out.loss.item() == pytest.approx(np_ce(S_LOGITS, Y) + feature, rel=1e-8)
    out.loss.backward()
    for tap in s_taps:
        assert s_out[INPUT].features[tap].grad.abs().sum() > 0
    assert all(t_out[INPUT].features[t].grad is None for t in t_taps) and t_out[INPUT].logits.grad is None


@pytest.mark.parametrize("cls,cfg,feats,ref,default_weight", PAIRED, ids=IDS)
def test_paired_method_weights_and_optional_kd(cls, cfg, feats, ref, default_weight):
    method, s_out, t_out, (s_taps, t_taps) = paired_setup(
        cls, cfg, feats, ce_weight=0.3, kd_weight=0.7, temperature=2.0, feature_weight=0.5)
    out = method(s_out, t_out, make_batch(), CTX)
    ce, kd = 0.3 * np_ce(S_LOGITS, Y), 0.7 * np_kd(S_LOGITS, T_LOGITS, 2.0)
    feature = 0.5 * sum(ref(feats[s], feats[t]) for s, t in zip(s_taps, t_taps))
    assert set(out.terms) == {"ce", "kd", method.term}
    assert out.terms["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert out.loss.item() == pytest.approx(ce + kd + feature, rel=1e-8)
    zero = paired_setup(cls, cfg, feats, feature_weight=0.0)[0]
    assert set(zero(s_out, t_out, make_batch(), CTX).terms) == {"ce"}


def test_relation_terms_teach_on_unlabelled_rows_too():
    method, s_out, t_out, _ = paired_setup(SP, {}, VECS)
    base = method(s_out, t_out, make_batch(), CTX)
    changed = dict(s_out[INPUT].features)
    changed["s0"] = changed["s0"].detach().clone()
    changed["s0"][1] = f64([5.0, -1.0, 2.0])  # row 1 has no label
    out = method(outs(s_out[INPUT].logits, **changed), t_out, make_batch(), CTX)
    assert out.terms["ce"].item() == base.terms["ce"].item()
    assert abs(out.terms["sp"].item() - base.terms["sp"].item()) > 1e-3
    assert all(c.uses_unlabeled and c.needs_teacher for c in (AT, SP, RKD, PKT, SpatialAffinity, TokenRelation, MLKD))


def test_paired_setup_names_both_taps_and_shapes_on_mismatch():
    s = {"features.block0": torch.zeros(4, 3, 4, 4)}
    t = {"features.block1": torch.zeros(4, 6, 2, 2)}
    method = AT(ATConfig(student_taps="features.block0", teacher_taps="features.block1"))
    with pytest.raises(ShapeMismatchError) as err:
        method.setup(outs(torch.zeros(4, 3), **s), outs(torch.zeros(4, 3), **t), None)
    msg = str(err.value)
    assert "features.block0" in msg and "features.block1" in msg
    assert "(4, 3, 4, 4)" in msg and "(4, 6, 2, 2)" in msg and "\n" not in msg
    with pytest.raises(AlambicError, match="no tap 'nope'"):
        SP(SPConfig(student_taps="nope", teacher_taps="t0")).setup(outs(torch.zeros(4, 3)), outs(torch.zeros(4, 3), t0=torch.zeros(4, 2)), None)


def test_feature_configs_pair_taps_and_are_strict():
    assert SPConfig(student_taps="a", teacher_taps="b").student_taps == ["a"]
    assert AT(ATConfig(student_taps=["a", "b"], teacher_taps=["c", "d"])).teacher_taps() == ["c", "d"]
    with pytest.raises(pydantic.ValidationError, match="pair up"):
        ATConfig(student_taps=["a", "b"], teacher_taps=["c"])
    with pytest.raises(pydantic.ValidationError):
        RKDConfig(student_taps="a", teacher_taps="b", distance_wieght=1.0)
    with pytest.raises(pydantic.ValidationError):
        PKTConfig(student_taps="a")  # teacher_taps is required
    with pytest.raises(pydantic.ValidationError):
        SpatialAffinityConfig(student_taps="a", teacher_taps="b", feature_weight=-1)
    assert RKDConfig(student_taps="a", teacher_taps="b").distance_weight == 25.0
    assert RKDConfig(student_taps="a", teacher_taps="b").angle_weight == 50.0


# ------------------------------------------------------------------------------------------ token_relation


def test_token_relation_taps_q_and_k_of_each_attention_module_and_sums_pairs():
    cfg = TokenRelationConfig(student_taps=["b.0.attn", "b.1.attn"], teacher_taps=["c.0.attn", "c.1.attn"],
                              num_heads=2, feature_weight=0.5, ce_weight=0.0)
    method = TokenRelation(cfg)
    assert method.student_taps() == ["b.0.attn.q", "b.0.attn.k", "b.1.attn.q", "b.1.attn.k"]
    assert method.teacher_taps() == ["c.0.attn.q", "c.0.attn.k", "c.1.attn.q", "c.1.attn.k"]
    s = {tap: rand(4, 5, 4) for tap in method.student_taps()}
    t = {tap: rand(4, 5, 6) for tap in method.teacher_taps()}
    s_out = outs(f64(S_LOGITS), **{k: f64(v).requires_grad_(True) for k, v in s.items()})
    t_out = outs(f64(T_LOGITS), **{k: f64(v).requires_grad_(True) for k, v in t.items()})
    method.setup(s_out, t_out, None)
    out = method(s_out, t_out, make_batch(), CTX)
    expected = 0.5 * sum(np_token_relation(s[f"b.{i}.attn.q"], s[f"b.{i}.attn.k"], t[f"c.{i}.attn.q"],
                                           t[f"c.{i}.attn.k"], 2) for i in (0, 1))
    assert set(out.terms) == {"relation"}
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    out.loss.backward()
    assert all(v.grad is None for v in t_out[INPUT].features.values())
    assert all(v.grad.abs().sum() > 0 for v in s_out[INPUT].features.values())


def test_token_relation_setup_rejects_different_token_counts_naming_the_layers():
    from alambic.models.vit import ViT
    from alambic.models import Taps

    torch.manual_seed(0)
    student, teacher = ViT(1, (8, 8), 10, patch_size=4, dim=8, heads=2), ViT(1, (8, 8), 10, patch_size=2, dim=8, heads=2)
    method = TokenRelation(TokenRelationConfig(student_taps="blocks.0.attn", teacher_taps="blocks.1.attn", num_heads=2))
    x = torch.randn(3, 1, 8, 8)
    with Taps(student, method.student_taps()) as st, Taps(teacher, method.teacher_taps()) as tt:
        s_out, t_out = outs(student(x), **st.outputs), outs(teacher(x), **tt.outputs)
    with pytest.raises(ShapeMismatchError) as err:
        method.setup(s_out, t_out, None)
    msg = str(err.value)
    assert "blocks.0.attn" in msg and "blocks.1.attn" in msg and "(3, 5, 8)" in msg and "(3, 17, 8)" in msg


# ---------------------------------------------------------------------------------------------------- MLKD


def make_mlkd(**cfg):
    torch.manual_seed(0)
    feats = {"s0": rand(4, 3), "s1": rand(4, 2), "t0": rand(4, 5), "t1": rand(4, 6), "t2": rand(4, 3)}
    method = MLKD(MLKDConfig(student_taps=["s0", "s1"], teacher_taps=["t0", "t1", "t2"], **cfg))
    s_out = outs(f64(S_LOGITS).requires_grad_(True), **{k: f64(v).requires_grad_(True) for k, v in feats.items() if k[0] == "s"})
    t_out = outs(f64(T_LOGITS).requires_grad_(True), **{k: f64(v).requires_grad_(True) for k, v in feats.items() if k[0] == "t"})
    method.setup(s_out, t_out, None)
    method.double()
    return method, feats, s_out, t_out


def linear(module, x):
    return x @ module.weight.detach().numpy().T + module.bias.detach().numpy()


def test_mlkd_is_lambda_kd_plus_one_minus_lambda_nearest_teacher_layers():
    method, feats, s_out, t_out = make_mlkd(pred_weight=0.6, temperature=2.0, top_k=2, layer_weights=[1.0, 0.25])
    assert [[tuple(m.weight.shape) for m in row] for row in method.maps] == [[(3, 5), (3, 6), (3, 3)], [(2, 5), (2, 6), (2, 3)]]
    out = method(s_out, t_out, make_batch(), CTX)
    layers = sum(np_nearest(feats[s], [linear(method.maps[l][j], feats[t]) for j, t in enumerate(["t0", "t1", "t2"])],
                            [1.0, 0.25], 2) for l, s in enumerate(["s0", "s1"]))
    kd = 0.6 * np_kd(S_LOGITS, T_LOGITS, 2.0)
    assert set(out.terms) == {"kd", "layers"}  # no labels by default, as in the paper
    assert out.terms["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert out.terms["layers"].item() == pytest.approx(0.4 * layers, rel=1e-10)
    out.loss.backward()
    assert method.maps[0][0].weight.grad is not None
    assert s_out[INPUT].features["s0"].grad.abs().sum() > 0 and s_out[INPUT].logits.grad.abs().sum() > 0
    assert all(v.grad is None for v in t_out[INPUT].features.values()) and t_out[INPUT].logits.grad is None


def test_mlkd_student_side_maps_project_the_student_into_each_teacher_layer():
    method, feats, s_out, t_out = make_mlkd(map_side="student", pred_weight=0.5, ce_weight=1.0)
    assert [tuple(m.weight.shape) for m in method.maps[0]] == [(5, 3), (6, 3), (3, 3)]
    out = method(s_out, t_out, make_batch(), CTX)
    layers = 0.0
    for l, s in enumerate(["s0", "s1"]):
        d = np.stack([np.sqrt(((linear(method.maps[l][j], feats[s]) - feats[t]) ** 2).sum(-1))
                      for j, t in enumerate(["t0", "t1", "t2"])], -1)
        layers += float(d.mean())
    assert set(out.terms) == {"ce", "kd", "layers"}
    assert out.terms["layers"].item() == pytest.approx(0.5 * layers, rel=1e-10)
    assert out.terms["ce"].item() == pytest.approx(np_ce(S_LOGITS, Y), rel=1e-12)


def test_mlkd_config_checks_k_and_weights():
    with pytest.raises(pydantic.ValidationError, match="top_k"):
        MLKDConfig(student_taps="a", teacher_taps=["b", "c"], top_k=3)
    with pytest.raises(pydantic.ValidationError, match="layer_weights"):
        MLKDConfig(student_taps="a", teacher_taps=["b", "c"], layer_weights=[1.0])
    with pytest.raises(pydantic.ValidationError):
        MLKDConfig(student_taps="a", teacher_taps="b", pred_weight=1.5)
    with pytest.raises(pydantic.ValidationError):
        MLKDConfig(student_taps="a", teacher_taps="b", map_side="both")
    assert MLKDConfig(student_taps="a", teacher_taps="b").ce_weight == 0.0


def test_mlkd_setup_rejects_token_count_mismatch():
    method = MLKD(MLKDConfig(student_taps="s", teacher_taps="t"))
    with pytest.raises(ShapeMismatchError, match=r"'s' \(2, 5, 4\).*'t' \(2, 3, 4\)"):
        method.setup(outs(torch.zeros(2, 3), s=torch.zeros(2, 5, 4)), outs(torch.zeros(2, 3), t=torch.zeros(2, 3, 4)), None)


# ------------------------------------------------------------------------------------------------ registry


def test_family_is_registered_with_papers():
    expected = {"at": (AT, "1612.03928"), "sp": (SP, "1907.09682"), "rkd": (RKD, "1904.05068"),
                "pkt": (PKT, "1803.10837"), "spatial_affinity": (SpatialAffinity, "2504.11271"),
                "mlkd": (MLKD, "2211.11300"), "token_relation": (TokenRelation, "2306.15876")}
    for name, (cls, arxiv) in expected.items():
        entry = METHODS.get(name)
        assert entry.obj is cls and entry.config is cls.Config
        assert arxiv in entry.paper, name
