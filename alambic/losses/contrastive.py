"""Contrastive losses between an anchor embedding and a positive plus negatives drawn from a memory bank.

Pure tensor functions: the candidates (rows of a memory bank: the positive first, then the negatives) are
constants (detached); only the anchor carries gradient. Tian, Krishnan, Isola, "Contrastive
Representation Distillation" (CRD), ICLR 2020, arXiv:1910.10699, §3.2-3.4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.errors import ShapeMismatchError


__all__ = ["crd_infonce_loss", "crd_nce_loss", "nce_log_normalizer"]


def _scores(anchor: Tensor, candidates: Tensor, temperature: float, what: str) -> Tensor:
    """[B, 1+K] ``⟨c_ik, a_i⟩ / τ`` with the candidates detached, after checking the shapes."""
    if anchor.dim() != 2 or candidates.dim() != 3 or candidates.shape[0] != anchor.shape[0] \
            or candidates.shape[2] != anchor.shape[1]:
        raise ShapeMismatchError(
            f"{what}: anchor {tuple(anchor.shape)} and candidates {tuple(candidates.shape)} do not fit "
            "(want anchor [B, D] and candidates [B, 1+K, D])"
        )
    if candidates.shape[1] < 2:
        raise ValueError(f"{what}: needs a positive and at least one negative, got {candidates.shape[1]} candidates")
    if temperature <= 0:
        raise ValueError(f"{what}: temperature must be > 0, got {temperature}")
    return torch.einsum("bkd,bd->bk", candidates.detach(), anchor) / temperature


@torch.no_grad()
def nce_log_normalizer(anchor: Tensor, candidates: Tensor, temperature: float, num_data: int) -> Tensor:
    """``log Z`` with ``Z = N · mean_{i,k} exp(⟨c_ik, a_i⟩/τ)``: the Monte-Carlo partition function.

    The official CRD code (RepDistiller ``crd/memory.py``) estimates Z once, on the first batch, and keeps
    it fixed for the rest of training, so that ``exp(s/τ)/Z`` approximates the probability of a candidate
    among all ``N`` samples of the dataset. Computed in log space (no overflow at τ = 0.07). Returns a 0-d
    tensor without gradient.
    """
    s = _scores(anchor, candidates, temperature, "nce_log_normalizer")
    return torch.logsumexp(s.reshape(-1), 0) - math.log(s.numel()) + math.log(num_data)


def crd_nce_loss(anchor: Tensor, candidates: Tensor, temperature: float, num_data: int,
                 log_normalizer: Tensor | float = 0.0) -> Tensor:
    """CRD's NCE critic loss (paper Eq. 18-19; RepDistiller ``ContrastLoss``).

    With ``P_ik = exp(⟨c_ik, a_i⟩/τ) / Z`` (candidate 0 the positive, 1..K the negatives drawn uniformly
    from N data points, so the noise probability of each is ``1/N``), the critic is
    ``h = P / (P + K/N)`` and

        L = −(1/B) Σ_i [ log h(P_i0) + Σ_{k=1..K} log(1 − h(P_ik)) ].

    With ``log_normalizer = 0`` this is the paper's ``h = e^{s/τ} / (e^{s/τ} + K/N)`` as printed; the official
    code divides by the first batch's Z (see :func:`nce_log_normalizer`). Evaluated in log space:
    ``log h = log P − log(P + K/N)``, ``log(1 − h) = log(K/N) − log(P + K/N)``.

    Args:
        anchor: [B, D] embeddings (L2-normalised in CRD), with gradient.
        candidates: [B, 1+K] × D bank rows, the positive first; treated as constants.
        temperature: τ > 0 (0.07 in CRD).
        num_data: N, the number of samples the negatives are drawn from.
        log_normalizer: log Z (0-d tensor or float).
    Returns: scalar.
    """
    s = _scores(anchor, candidates, temperature, "crd_nce_loss")
    if num_data < 1:
        raise ValueError(f"crd_nce_loss: num_data must be >= 1, got {num_data}")
    log_p = s - log_normalizer
    k = s.shape[1] - 1
    log_noise = torch.full_like(log_p, math.log(k / num_data))
    log_denom = torch.logaddexp(log_p, log_noise)
    log_h_pos = log_p[:, 0] - log_denom[:, 0]
    log_1mh_neg = log_noise[:, 1:] - log_denom[:, 1:]
    return -(log_h_pos.sum() + log_1mh_neg.sum()) / s.shape[0]


def crd_infonce_loss(anchor: Tensor, candidates: Tensor, temperature: float) -> Tensor:
    """The softmax (InfoNCE) variant: ``−(1/B) Σ_i log softmax_k(⟨c_ik, a_i⟩/τ)[0]``.

    Cross-entropy of picking the positive (candidate 0) among the 1+K candidates (van den Oord, Li,
    Vinyals, "Representation Learning with Contrastive Predictive Coding", 2018, arXiv:1807.03748): a
    simpler stand-in for CRD's NCE critic that needs no normaliser Z. Args as :func:`crd_nce_loss`.
    """
    s = _scores(anchor, candidates, temperature, "crd_infonce_loss")
    return F.cross_entropy(s, torch.zeros(s.shape[0], dtype=torch.long, device=s.device))
