"""Distillation through data: losses that optimise a small synthetic set to carry a teacher's knowledge.

Pure tensor functions. KRR-ST (Lee et al. 2024) fits a linear head by kernel ridge regression from the
synthetic set's features to its learnable target representations and asks that head to predict the
teacher's representations of real data; the gradient of that error moves the synthetic images (through
their features) and the synthetic targets. The real side (features of real images, teacher targets) is a
constant. DM (Zhao & Bilen 2023) matches, class by class, the mean embedding of real and synthetic images
under randomly drawn networks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.errors import AlambicError, ShapeMismatchError

__all__ = ["distribution_matching_loss", "krr_predict", "krr_st_loss"]


def _with_bias(features: Tensor) -> Tensor:
    return torch.cat([features, features.new_ones(features.shape[0], 1)], dim=1)


def krr_predict(features_syn: Tensor, targets_syn: Tensor, features_query: Tensor, ridge_scale: float = 1e-6,
                bias: bool = True) -> Tensor:
    """Kernel ridge regression with a linear kernel: ``K_qs (K_ss + λ I)⁻¹ Y_s``, ``λ = ridge_scale · tr(K_ss)``.

    Lee et al., "Self-Supervised Dataset Distillation for Transfer Learning" (KRR-ST), ICLR 2024,
    arXiv:2310.06511, the closed-form linear head of the outer objective (§3, the outer objective with
    ``W* = X_sᵀ (X_s X_sᵀ + λI)⁻¹ Y_s``); details checked against db-Lee/selfsup_dd
    ``algorithms/distill.py``: ``K = f fᵀ`` on features with a column of ones appended (``bias=True``:
    the head has an intercept), ``λ = 1e-6 · tr(K_ss)`` computed from a **detached** ``K_ss`` (a scale for
    conditioning, not something to optimise), and a linear solve rather than an explicit inverse. The
    query features are constants (the official code computes them under ``no_grad``); gradient reaches
    ``features_syn`` (hence the synthetic images) and ``targets_syn``.

    Args:
        features_syn: X_s [m, d] features of the synthetic set, with gradient.
        targets_syn: Y_s [m, k] learnable target representations, with gradient.
        features_query: X_q [n, d] features of the query (real) examples; constants.
        ridge_scale: c in λ = c · tr(K_ss) (1e-6).
        bias: append a column of ones to both feature matrices (as the official code does).
    Returns: [n, k] predictions.
    """
    what = "krr_predict"
    if features_syn.dim() != 2 or targets_syn.dim() != 2 or features_query.dim() != 2 \
            or targets_syn.shape[0] != features_syn.shape[0] or features_query.shape[1] != features_syn.shape[1]:
        raise ShapeMismatchError(
            f"{what}: want features_syn [m, d], targets_syn [m, k], features_query [n, d]; got "
            f"{tuple(features_syn.shape)}, {tuple(targets_syn.shape)}, {tuple(features_query.shape)}"
        )
    if ridge_scale < 0:
        raise AlambicError(f"{what}: ridge_scale must be >= 0, got {ridge_scale}")
    x_s, x_q = features_syn, features_query.detach()
    if bias:
        x_s, x_q = _with_bias(x_s), _with_bias(x_q)
    k_ss = x_s @ x_s.t()  # [m, m]
    k_qs = x_q @ x_s.t()  # [n, m]
    lam = ridge_scale * torch.trace(k_ss.detach())
    eye = torch.eye(k_ss.shape[0], dtype=k_ss.dtype, device=k_ss.device)
    return k_qs @ torch.linalg.solve(k_ss + lam * eye, targets_syn)


def krr_st_loss(features_syn: Tensor, targets_syn: Tensor, features_real: Tensor, targets_real: Tensor,
                ridge_scale: float = 1e-6, bias: bool = True) -> Tensor:
    """KRR-ST's outer loss: ``mean (K_rs (K_ss + λI)⁻¹ Y_s − Y_r)²`` over every element.

    Lee et al., "Self-Supervised Dataset Distillation for Transfer Learning" (KRR-ST), ICLR 2024,
    arXiv:2310.06511, the outer objective (§3): the MSE between the KRR head's predictions on real
    examples (:func:`krr_predict`, fitted on the synthetic set's features X_s of a model drawn from the
    pool and its targets Y_s) and the frozen self-supervised teacher's representations ``Y_r`` of those
    real examples (official ``F.mse_loss``: mean over the n·k elements). ``Y_r`` and the real features are
    constants; λ = ``ridge_scale · tr(K_ss)`` is detached.

    Args:
        features_syn: X_s [m, d]; targets_syn: Y_s [m, k] (both with gradient).
        features_real: X_r [n, d]; targets_real: Y_r [n, k] (constants).
        ridge_scale, bias: as :func:`krr_predict`.
    Returns: scalar.
    """
    pred = krr_predict(features_syn, targets_syn, features_real, ridge_scale, bias)
    if targets_real.shape != pred.shape:
        raise ShapeMismatchError(
            f"krr_st_loss: targets_real must be [n, k] = {tuple(pred.shape)}, got {tuple(targets_real.shape)}"
        )
    return F.mse_loss(pred, targets_real.detach().to(pred.dtype))


def distribution_matching_loss(emb_real: Tensor, labels_real: Tensor, emb_syn: Tensor, labels_syn: Tensor) -> Tensor:
    """DM's loss: ``Σ_c ‖ mean_{i: y_i = c} ψ(x_i) − mean_{j: y'_j = c} ψ(s_j) ‖²`` over the classes present on
    both sides.

    Zhao & Bilen, "Dataset Condensation with Distribution Matching" (DM), WACV 2023, arXiv:2110.04181, §3.2
    and Algorithm 1: the maximum mean discrepancy with a linear kernel between the real and the synthetic
    images of each class, in the embedding ψ_θ of a randomly initialised network (θ drawn anew every
    iteration), summed over classes (the official code adds ``sum((mean(out_real, 0) − mean(out_syn, 0))²)``
    class by class). The real embeddings are constants (computed without gradient by the caller, or
    detached here); the gradient reaches the synthetic embeddings.

    Args:
        emb_real: ψ(x) [n, d] of real images; labels_real: [n] int64 classes.
        emb_syn: ψ(s) [m, d] of synthetic images, with gradient; labels_syn: [m] int64 classes.
    Returns: scalar.
    """
    if emb_real.dim() != 2 or emb_syn.dim() != 2 or emb_real.shape[1] != emb_syn.shape[1] \
            or labels_real.shape != (emb_real.shape[0],) or labels_syn.shape != (emb_syn.shape[0],):
        raise ShapeMismatchError(
            f"distribution_matching_loss: want emb_real [n, d], labels_real [n], emb_syn [m, d], labels_syn [m]; "
            f"got {tuple(emb_real.shape)}, {tuple(labels_real.shape)}, {tuple(emb_syn.shape)}, "
            f"{tuple(labels_syn.shape)}"
        )
    loss = emb_syn.new_zeros(())
    real = emb_real.detach()
    for c in torch.unique(labels_syn).tolist():
        in_real = labels_real == c
        if not bool(in_real.any()):
            continue
        diff = real[in_real].mean(0) - emb_syn[labels_syn == c].mean(0)
        loss = loss + (diff * diff).sum()
    return loss
