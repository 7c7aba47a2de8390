"""What the point-to-pixel methods (``ppkt``, ``slidr``) share: the views, the trainable pixel decoder on the
frozen image teacher, and the paired features a loss of :mod:`alambic.losses.crossmodal` takes.

SLidR (Sautier et al., "Image-to-Lidar Self-Supervised Distillation for Autonomous Driving Data", CVPR 2022,
arXiv:2203.16258, §3 and §4.1; details checked against valeoai/SLidR ``model/image_model.py`` and
``pretrain/lightning_trainer.py``) and its PPKT baseline share one set-up:

- the 2D side is a frozen, pretrained image encoder followed by a **trainable** decoder: a 1x1 convolution
  to the 3D features' width D, bilinear upsampling to the image's resolution (``align_corners=True``) and an
  L2 normalisation of every pixel's feature; during training the encoder stays in eval mode and only the
  decoder learns (``model_images.eval(); model_images.decoder.train()``);
- the 3D side is the point network's per-point output, L2-normalised (``normalize_features``);
- the two are compared through the pairing of each point with the pixel it projects to.

Here the encoder is the frozen teacher (its feature map read by a tap, under ``no_grad``), the decoder lives
in the method (so it is trained, checkpointed and dropped after training), the pairing is read from the
batch (:mod:`alambic.data.paired`), and the student's per-point features by a tap (``point_head`` of the zoo's
``pointnet``).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from alambic.data.batch import INPUT, Batch
from alambic.data.paired import flatten_pairs, read_pairs
from alambic.errors import AlambicError, ShapeMismatchError
from alambic.methods.base import Method, MethodConfig


class PairedConfig(MethodConfig):
    image_view: str = Field("image", description="the paired image view the teacher sees")
    student_tap: str = Field("point_head", description="the student's per-point features [B, P, D]")
    teacher_tap: str = Field("features.block1", description="the frozen teacher's feature map [B, C, h, w]")
    temperature: float = Field(0.07, gt=0, description="InfoNCE temperature τ (SLidR and PPKT: 0.07)")
    normalize_points: bool = Field(True, description="L2-normalise each point's feature (SLidR's 3D network does)")


class PixelDecoder(nn.Module):
    """SLidR's trainable head on the frozen encoder: 1x1 conv to ``dim``, bilinear upsampling to the image's
    ``[H, W]`` (``align_corners=True``), per-pixel L2 normalisation. ``[B, C, h, w] -> [B, dim, H, W]``."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, dim, kernel_size=1)

    def forward(self, features: Tensor, size: tuple[int, int]) -> Tensor:
        x = F.interpolate(self.conv(features), size=size, mode="bilinear", align_corners=True)
        return F.normalize(x, p=2, dim=1)


class PairedMethod(Method):
    """Base of the point-to-pixel methods: the student sees the points (``input``), the teacher the image."""

    Config = PairedConfig
    needs_teacher = True
    uses_unlabeled = True
    self_supervised = True  # trained without labels; judged by probes of the student's representation
    paired = True
    student_views: ClassVar[tuple[str, ...]] = (INPUT,)

    def __init__(self, config: PairedConfig | None = None):
        super().__init__(config)
        self.teacher_views = (self.config.image_view,)
        self.decoder: PixelDecoder | None = None

    def student_taps(self) -> list[str]:
        return [self.config.student_tap]

    def teacher_taps(self) -> list[str]:
        return [self.config.teacher_tap]

    def _tapped(self, student, teacher) -> tuple[Tensor, Tensor]:
        cfg = self.config
        if teacher is None:
            raise AlambicError(f"method {type(self).__name__.lower()} needs a teacher (an image network)")
        points = student[INPUT].features[cfg.student_tap]
        fmap = teacher[cfg.image_view].features[cfg.teacher_tap]
        if points.dim() != 3:
            raise ShapeMismatchError(f"student_tap {cfg.student_tap!r} must give per-point features [B, P, D], got "
                                     f"{list(points.shape)} (pointnet: point_head)")
        if fmap.dim() != 4:
            raise ShapeMismatchError(f"teacher_tap {cfg.teacher_tap!r} must give a feature map [B, C, h, w], got "
                                     f"{list(fmap.shape)} (cnn: features.block<i>)")
        return points, fmap

    def setup(self, student, teacher, info) -> None:
        points, fmap = self._tapped(student, teacher)
        self.decoder = PixelDecoder(fmap.shape[1], points.shape[2])

    def paired_features(self, student, teacher, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(point features [B·P, D], pixel features [B, D, H, W], pairing_points [M], pairing_images [M, 3])``:
        the normalised student points, the decoded teacher pixels, and the batch's pairs flattened."""
        cfg = self.config
        points, fmap = self._tapped(student, teacher)
        b, p, d = points.shape
        image = batch.views[cfg.image_view]
        pixels = self.decoder(fmap.detach(), tuple(image.shape[-2:]))  # the encoder is frozen: only the decoder learns
        flat = points.reshape(b * p, d)
        if cfg.normalize_points:
            flat = F.normalize(flat, p=2, dim=1)
        pairing_points, pairing_images = flatten_pairs(read_pairs(batch, INPUT, cfg.image_view), p)
        if len(pairing_points) == 0:
            raise AlambicError("no point of this batch is paired with a pixel")
        return flat, pixels, pairing_points, pairing_images
