"""Differentiable random translations: DSA's "crop" in its Siamese form for DM, and a per-image shift of
KRR-ST's real batch.

Zhao & Bilen, "Dataset Condensation with Differentiable Siamese Augmentation" (DSA), ICML 2021,
arXiv:2102.08259, §3: the real and the synthetic batch of a class receive the *same* sampled
transformation, and the transformation is differentiable in the synthetic images. A translation by whole
pixels with zero padding is both (the gradient moves with the pixels). DSA's crop translates by up to
1/8 of the side.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["max_pixels", "random_shifts", "shift"]


def max_pixels(fraction: float, side: int) -> int:
    """The largest shift in pixels for a ``fraction`` of the side (at least 1 when fraction > 0)."""
    return 0 if fraction <= 0 else max(1, round(fraction * side))


def shift(x: Tensor, dx: int, dy: int) -> Tensor:
    """[B, C, H, W] translated by ``dx`` columns and ``dy`` rows (positive: right, down), zero filled."""
    if dx == 0 and dy == 0:
        return x
    h, w = x.shape[-2:]
    p = max(abs(dx), abs(dy))
    padded = F.pad(x, (p, p, p, p))
    return padded[..., p - dy: p - dy + h, p - dx: p - dx + w]


def random_shifts(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each image translated by its own (dx, dy) drawn uniformly from ``[-max_shift, max_shift]``."""
    if max_shift <= 0:
        return x
    d = torch.randint(-max_shift, max_shift + 1, (x.shape[0], 2), generator=generator)
    out = torch.empty_like(x)
    for dx, dy in torch.unique(d, dim=0).tolist():
        rows = ((d[:, 0] == dx) & (d[:, 1] == dy)).nonzero().flatten()
        out[rows] = shift(x[rows], dx, dy)
    return out
