"""What ``region_contrast`` and ``lifting`` share: the student is mapped into the frozen teacher's feature space.

In SLidR and PPKT (:mod:`alambic.methods._crossmodal`) both sides learn: a trainable 1x1-conv decoder sits on the
frozen image encoder and the contrast is taken in a space both move. In CALICO's region-aware distillation
(Sun et al., ICLR 2024, arXiv:2306.00349) and in 3D-OVS's feature distillation (Liu et al., NeurIPS 2023,
arXiv:2305.14093) the teacher's features are the *target*, a constant: the student (here through a trainable
linear projector, owned by the method and dropped after training) must land on them. So:

- :class:`Projector`: ``[N, D] -> [N, C]``, the student's per-point features to the teacher's width C (a plain
  ``nn.Linear``: 3D-OVS's feature field ends in a linear layer of the teacher's width);
- :func:`teacher_pixels`: the frozen teacher's feature map ``[B, C, h, w]`` bilinearly resized to the image's
  ``[H, W]`` (``align_corners=True``, as SLidR's decoder upsamples), with no parameter and no gradient.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from alambic.methods._crossmodal import PairedConfig


class TeacherSpaceConfig(PairedConfig):
    normalize_points: bool = Field(False, description="L2-normalise each point's feature before the projector")


class Projector(nn.Module):
    """The student's per-point features in the teacher's feature width: ``[N, D] -> [N, C]`` (trainable)."""

    def __init__(self, dim: int, teacher_dim: int):
        super().__init__()
        self.fc = nn.Linear(dim, teacher_dim)

    def forward(self, points: Tensor) -> Tensor:
        return self.fc(points)


def teacher_pixels(fmap: Tensor, size: tuple[int, int]) -> Tensor:
    """``[B, C, h, w] -> [B, C, H, W]``: the frozen teacher's features at every pixel (bilinear), a constant."""
    return F.interpolate(fmap.detach(), size=size, mode="bilinear", align_corners=True)


def projected_points(points: Tensor, projector: Projector, normalize: bool) -> Tensor:
    """``[B, P, D] -> [B · P, C]``: every point of the batch through the projector (optionally normalised first)."""
    b, p, d = points.shape
    flat = points.reshape(b * p, d)
    return projector(F.normalize(flat, p=2, dim=1) if normalize else flat)
