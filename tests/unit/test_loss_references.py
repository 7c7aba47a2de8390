"""Losses checked against their papers' equations where an implementation detail could drift from them.

Each expected value is written here from the paper's equation (NumPy or plain float64 torch ops), never
by calling the function under test. The cases are the ones where an innocent-looking numerical guard or
normalisation changes the result: near-uniform DIST outputs, SwAV's first Sinkhorn normalisation, SP's
row normalisation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alambic.losses import dist_loss, dist_relations, sinkhorn, sp_loss


# --- DIST: Huang et al., NeurIPS 2022, arXiv:2205.10536 -------------------------------------------------


def paper_pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """DIST Eq. (3): ρ_p(u, v) = Cov(u, v) / (Std(u)·Std(v)), row by row, no numerical guard."""
    da, db = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    cov = (da * db).mean(-1)
    return cov / (da.pow(2).mean(-1).sqrt() * db.pow(2).mean(-1).sqrt())


def paper_dist(z_s: torch.Tensor, z_t: torch.Tensor, temperature: float, beta: float = 1.0,
               gamma: float = 1.0) -> torch.Tensor:
    """DIST Eqs. (4)-(6), each term times T² as in the authors' code: Y = softmax(Z/T) row-wise,
    L_inter = 1 − mean_i ρ(Y_i,:), L_intra = 1 − mean_j ρ(Y_:,j)."""
    y_s, y_t = torch.softmax(z_s / temperature, -1), torch.softmax(z_t / temperature, -1)
    inter = 1 - paper_pearson(y_s, y_t).mean()
    intra = 1 - paper_pearson(y_s.T, y_t.T).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def test_dist_on_near_uniform_outputs_equals_the_papers_pearson_value_and_gradient():
    # logits × 1e-3 at T = 8: every centred row/column has norm ~1e-5, so a guard of 1e-8 added to the
    # product of the two norms (~1e-9) would bias ρ towards 0 and shrink the gradient several times over
    g = torch.Generator().manual_seed(0)
    z_s = torch.randn(16, 10, generator=g, dtype=torch.float64) * 1e-3
    z_t = torch.randn(16, 10, generator=g, dtype=torch.float64) * 1e-3
    s1, s2 = z_s.clone().requires_grad_(True), z_s.clone().requires_grad_(True)
    got = dist_loss(s1, z_t, beta=1.0, gamma=2.0, temperature=8.0)
    want = paper_dist(s2, z_t, 8.0, beta=1.0, gamma=2.0)
    (g_got,), (g_want,) = torch.autograd.grad(got, s1), torch.autograd.grad(want, s2)
    assert got.item() == pytest.approx(want.item(), rel=1e-9)
    torch.testing.assert_close(g_got, g_want, rtol=1e-7, atol=1e-6 * g_want.abs().max().item())


def test_dist_matches_the_paper_on_ordinary_logits_in_float32():
    g = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(32, 100, generator=g) * 3, torch.randn(32, 100, generator=g) * 3
    inter, intra = dist_relations(z_s, z_t, temperature=4.0)
    y_s, y_t = torch.softmax(z_s.double() / 4, -1), torch.softmax(z_t.double() / 4, -1)
    assert inter.item() == pytest.approx(16 * (1 - paper_pearson(y_s, y_t).mean()).item(), rel=1e-4)
    assert intra.item() == pytest.approx(16 * (1 - paper_pearson(y_s.T, y_t.T).mean()).item(), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dist_constant_rows_have_zero_correlation_not_nan(dtype):
    # equal logits in a row give a constant probability row (zero variance): ρ := 0, finite gradient;
    # in float32 the centred row is rounding noise of norm ~1e-8 (10 classes), which must not count
    z_s = torch.full((8, 10), 0.37, dtype=dtype, requires_grad=True)
    z_t = torch.randn(8, 10, generator=torch.Generator().manual_seed(2), dtype=dtype)
    inter, intra = dist_relations(z_s, z_t)
    assert inter.item() == pytest.approx(1.0, abs=1e-5) and intra.item() == pytest.approx(1.0, abs=1e-5)
    (inter + intra).backward()
    assert torch.isfinite(z_s.grad).all()


# --- SwAV Sinkhorn-Knopp: Caron et al., 2020, arXiv:2006.09882 -----------------------------------------


def textbook_sinkhorn(scores: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """SwAV's Sinkhorn-Knopp as in the paper's appendix (Alg. 1 pseudo-code), float64, no stabilisation:
    Q = exp(Cᵀ Z/ε) (K×B), Q /= sum(Q); repeat {rows (prototypes) to 1/K; columns (samples) to 1/B};
    Q *= B; returned as B×K."""
    q = np.exp(np.asarray(scores, dtype=np.float64) / epsilon).T  # [K, B]
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_sinkhorn_equals_the_unstabilised_swav_algorithm(iterations):
    g = torch.Generator().manual_seed(3)
    # cosine-like scores with a per-sample offset: the rows' maxima differ, which is where subtracting
    # each row's maximum before SwAV's first (whole-matrix, then per-prototype) normalisation goes wrong
    scores = torch.rand(24, 6, generator=g, dtype=torch.float64) * 0.8 - 0.4
    scores += torch.linspace(-0.5, 0.5, 24, dtype=torch.float64)[:, None]
    want = textbook_sinkhorn(scores.numpy(), 0.05, iterations)
    got = sinkhorn(scores, epsilon=0.05, iterations=iterations)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)
    got32 = sinkhorn(scores.float(), epsilon=0.05, iterations=iterations)
    np.testing.assert_allclose(got32.double().numpy(), want, rtol=1e-4, atol=1e-5)


def test_sinkhorn_is_invariant_to_a_per_prototype_shift_like_the_textbook():
    # SwAV's first per-prototype normalisation absorbs any per-prototype factor exp(c_k/ε), so shifting a
    # prototype's scores changes nothing; a per-sample shift does change the codes (the first
    # normalisation is over the whole matrix, not per sample)
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(16, 4, generator=g, dtype=torch.float64) * 0.3
    column_shift = torch.randn(1, 4, generator=g, dtype=torch.float64)
    np.testing.assert_allclose(sinkhorn(scores + column_shift).numpy(), sinkhorn(scores).numpy(), atol=1e-12)
    row_shift = torch.linspace(-0.2, 0.2, 16, dtype=torch.float64)[:, None]
    want = textbook_sinkhorn((scores + row_shift).numpy(), 0.05, 3)
    np.testing.assert_allclose(sinkhorn(scores + row_shift).numpy(), want, rtol=1e-10, atol=1e-12)
    assert np.abs(want - textbook_sinkhorn(scores.numpy(), 0.05, 3)).max() > 1e-2


def test_sinkhorn_is_finite_and_normalised_where_the_naive_algorithm_overflows():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(16, 4, generator=g) * 50  # exp(scores/0.05) reaches exp(2000): inf in float32/64
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(textbook_sinkhorn(scores.numpy(), 0.05, 3)).all()
    for s in (scores, scores.double(), scores - 1000):
        codes = sinkhorn(s)
        assert torch.isfinite(codes).all() and (codes >= 0).all()
        np.testing.assert_allclose(codes.sum(1).double().numpy(), np.ones(16), atol=1e-5)


# --- SP: Tung & Mori, ICCV 2019, arXiv:1907.09682 ------------------------------------------------------


def paper_sp(s: np.ndarray, t: np.ndarray) -> float:
    """SP Eqs. (1)-(4): G̃ = Q·Qᵀ with Q the activations reshaped to [b, c·h·w]; G_[i,:] = G̃_[i,:] /
    ‖G̃_[i,:]‖₂ (Eq. 2, a row-wise *L2* normalisation); L = ‖G_T − G_S‖_F² / b²."""
    def g(a):
        q = a.reshape(len(a), -1)
        gram = q @ q.T
        return gram / np.sqrt((gram**2).sum(axis=1, keepdims=True))
    return float(((g(t) - g(s)) ** 2).sum() / len(s) ** 2)


def test_sp_normalises_each_gram_row_to_unit_l2_norm_as_in_eq_2():
    rng = np.random.default_rng(6)
    s, t = rng.normal(size=(6, 3, 2, 2)), rng.normal(size=(6, 5))
    got = sp_loss(torch.as_tensor(s), torch.as_tensor(t)).item()
    assert got == pytest.approx(paper_sp(s, t), rel=1e-10)

    def l1(a):  # the L1 row normalisation some reimplementations use instead: a different loss
        q = a.reshape(len(a), -1)
        gram = q @ q.T
        return gram / np.abs(gram).sum(axis=1, keepdims=True)
    l1_loss = float(((l1(t) - l1(s)) ** 2).sum() / len(s) ** 2)
    assert abs(got - l1_loss) > 0.1 * got
