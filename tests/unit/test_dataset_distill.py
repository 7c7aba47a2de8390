"""KRR-ST's outer loss (Lee et al. 2024, arXiv:2310.06511): closed form, detached ridge, gradients.

Expected values are computed with NumPy from the equation, never by calling the function under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alambic.errors import ShapeMismatchError
from alambic.losses import krr_predict, krr_st_loss


def close(actual, expected, rtol=1e-9, atol=1e-10) -> None:
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


def f64(x, grad: bool = False) -> torch.Tensor:
    return torch.tensor(np.asarray(x, dtype=np.float64), requires_grad=grad)


def np_krr(x_s, y_s, x_r, c=1e-6, bias=True):
    """K_rs (K_ss + λI)⁻¹ Y_s with K = f fᵀ, f = [x, 1] when bias, λ = c · tr(K_ss)."""
    if bias:
        x_s = np.hstack([x_s, np.ones((len(x_s), 1))])
        x_r = np.hstack([x_r, np.ones((len(x_r), 1))])
    k_ss, k_rs = x_s @ x_s.T, x_r @ x_s.T
    lam = c * np.trace(k_ss)
    return k_rs @ np.linalg.inv(k_ss + lam * np.eye(len(x_s))) @ y_s


def _data(seed=0, m=3, d=4, n=5, k=2):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(m, d)), rng.normal(size=(m, k)), rng.normal(size=(n, d)), rng.normal(size=(n, k))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("c", [1e-6, 0.3])
def test_krr_st_loss_equals_the_closed_form_mse(bias, c):
    x_s, y_s, x_r, y_r = _data()
    pred = np_krr(x_s, y_s, x_r, c, bias)
    close(krr_predict(f64(x_s), f64(y_s), f64(x_r), c, bias).numpy(), pred, rtol=1e-8)
    loss = krr_st_loss(f64(x_s), f64(y_s), f64(x_r), f64(y_r), c, bias)
    close(loss.item(), np.mean((pred - y_r) ** 2), rtol=1e-8)


def test_krr_interpolates_the_synthetic_targets_when_real_equals_synthetic_and_lambda_vanishes():
    x_s, y_s, _, _ = _data(m=3, d=4)  # m <= d + 1: K_ss has full rank
    pred = krr_predict(f64(x_s), f64(y_s), f64(x_s), ridge_scale=0.0)
    close(pred.numpy(), y_s, rtol=1e-7, atol=1e-8)
    loss = krr_st_loss(f64(x_s), f64(y_s), f64(x_s), f64(y_s), ridge_scale=1e-12)
    assert loss.item() < 1e-12


def test_ridge_is_detached_no_gradient_flows_through_lambda():
    x_s, y_s, x_r, y_r = _data(seed=1)
    c = 0.5  # large, so that a gradient through λ = c·tr(K_ss) would be visible
    xs = f64(x_s, grad=True)
    krr_st_loss(xs, f64(y_s), f64(x_r), f64(y_r), ridge_scale=c).backward()

    def manual(lam_detached: bool) -> torch.Tensor:
        x = f64(x_s, grad=True)
        f_s = torch.cat([x, torch.ones(3, 1, dtype=torch.float64)], 1)
        f_r = torch.cat([f64(x_r), torch.ones(5, 1, dtype=torch.float64)], 1)
        k_ss = f_s @ f_s.T
        lam = c * torch.trace(k_ss.detach() if lam_detached else k_ss)
        pred = f_r @ f_s.T @ torch.linalg.inv(k_ss + lam * torch.eye(3, dtype=torch.float64)) @ f64(y_s)
        ((pred - f64(y_r)) ** 2).mean().backward()
        return x.grad

    close(xs.grad.numpy(), manual(True).numpy(), rtol=1e-7)
    assert not torch.allclose(xs.grad, manual(False), rtol=1e-3)


def test_gradient_reaches_synthetic_features_and_targets_not_real_features_or_targets():
    x_s, y_s, x_r, y_r = _data(seed=2)
    xs, ys, xr, yr = (f64(a, grad=True) for a in (x_s, y_s, x_r, y_r))
    krr_st_loss(xs, ys, xr, yr).backward()
    assert xs.grad.abs().sum() > 0 and ys.grad.abs().sum() > 0
    assert xr.grad is None and yr.grad is None


def test_gradient_reaches_synthetic_images_through_a_feature_extractor():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 6), torch.nn.Tanh()).double()
    images_syn = torch.randn(4, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    targets_syn = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    real = torch.randn(8, 1, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        feats_real = net(real)
    loss = krr_st_loss(net(images_syn), targets_syn, feats_real, torch.randn(8, 3, dtype=torch.float64))
    loss.backward()
    assert images_syn.grad.abs().sum() > 0 and targets_syn.grad.abs().sum() > 0


def test_shapes_are_checked():
    x_s, y_s, x_r, y_r = _data()
    with pytest.raises(ShapeMismatchError):
        krr_st_loss(f64(x_s), f64(y_s), f64(x_r[:, :3]), f64(y_r))
    with pytest.raises(ShapeMismatchError):
        krr_st_loss(f64(x_s), f64(y_s), f64(x_r), f64(y_r[:, :1]))
