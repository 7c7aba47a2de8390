"""``lifting``: 2D-to-3D feature lifting (3D-OVS, GaussianCross): one student feature per point, every view agrees."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from alambic.data.batch import INPUT
from alambic.data.paired import flatten_pairs, read_pairs
from alambic.errors import AlambicError
from alambic.losses import feature_correlation_loss, feature_lifting_loss, scatter_mean
from alambic.methods._crossmodal import PairedMethod
from alambic.methods._teacher_space import (
    Projector,
    TeacherSpaceConfig,
    projected_points,
    teacher_pixels,
)
from alambic.methods.base import MethodOutput
from alambic.registry import METHODS


class LiftingConfig(TeacherSpaceConfig):
    views: int = Field(3, ge=0, le=16, description="extra views <image_view>_1..: the data's (glyph_outlines: "
                                                   "data.views) besides the canonical image; 0: the image alone")
    correlation_weight: float = Field(1.0, ge=0, description="weight of 3D-OVS's correlation term (0: cosine only)")
    shift: float = Field(0.7, description="b of the correlation term: pairs with teacher cosine above it are pulled "
                                          "together, below pushed apart (3D-OVS dino_shift 0.7)")
    pos_weight: float = Field(200.0, ge=0, description="w+ of the correlation term (3D-OVS dino_pos_weight 2e2)")
    neg_weight: float = Field(0.22, ge=0, description="w- of the correlation term (3D-OVS dino_neg_weight 0.22)")
    prototypes: int = Field(16, ge=2, description="fixed anchors in the teacher's space the student's per-point "
                                                  "distributions are taken over (3D-OVS: the class-name text "
                                                  "embeddings): k-means of the teacher's features at setup")
    prototype_temperature: float = Field(0.2, gt=0, description="temperature of those distributions (cosine / τ)")
    divergence: Literal["js", "kl"] = Field("js", description="js (the paper) or kl (the official code's effect)")


def _kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """``[k, C]`` L2-normalised centres of spherical k-means (cosine Lloyd) on the rows of ``x`` [N, C]."""
    x = F.normalize(x, dim=1)
    g = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = (x @ centres.t()).argmax(1)
        sums = torch.zeros_like(centres).index_add(0, assign, x)
        centres = torch.where(sums.norm(dim=1, keepdim=True) > 0, F.normalize(sums, dim=1), centres)
    return centres


@METHODS.register("lifting")
class Lifting(PairedMethod):
    """A point network whose per-point features, projected into several views, match a frozen image network's.

    The feature distillation of 3D-OVS (Liu et al., "Weakly Supervised 3D Open-vocabulary Segmentation",
    NeurIPS 2023, arXiv:2305.14093; checked against Kunhao-Liu/3D-OVS ``train_seg.py``) and of GaussianCross
    (rendered semantic features against 2D targets), with a point network in place of the radiance field:

    - the student sees the canonical points once and gives one feature per point; a trainable linear
      projector maps it to the teacher's width C;
    - in each view ``v`` (the image ``image_view`` and ``views`` more, ``<image_view>_1 ..``: the same sample
      seen through another pose; the data's ``pair:input-><view>`` says where each point lands) the
      projected features are *rendered*: each covered pixel gets the mean of the points that land on it
      (:func:`~alambic.losses.scatter_mean`: a splat one pixel wide, in place of volume rendering);
    - the frozen teacher sees each view; its feature map, bilinearly resized to the image, is the target at
      those pixels, and ``L_feat = mean_v [1 − mean cos(rendered_v, teacher_v)]``
      (:func:`~alambic.losses.feature_lifting_loss`; 3D-OVS's ``−cos``, shifted by 1);
    - the correlation term (3D-OVS's feature-distribution alignment, :func:`~alambic.losses.feature_correlation_loss`):
      the student's per-point distribution ``p_i = softmax(cos(z_i, a_k) / τ)`` over fixed anchors ``a_k``
      must be alike for the points whose teacher features are alike in a view (``cos − shift > 0``) and apart
      otherwise; the views of a sample are the patches. 3D-OVS's anchors are CLIP text embeddings of the
      class names; with no text here, they are the k-means centres of the teacher's features at the paired
      pixels of the first batch (fixed, checkpointed). Taken per point, not per rendered pixel (the same
      where no two points share a pixel), over the sample-views in which every point lands in the image.

    ``loss = L_feat + correlation_weight · L_corr``, as the official code adds them (weights w+ and w− inside).
    The teacher gets no gradient; the projector and the anchors are dropped after training.

    On ``glyph_outlines`` (``data.views: K``) the views are the glyph image turned, scaled and shifted in the
    image plane, the pairs moved alike: 2D -> 2D, not new viewpoints of a 3D object, and the student's
    input is a 2D outline. What carries over from 3D is the constraint: one feature per element, consistent
    with the teacher in every view.
    """

    paper = ('Liu et al., "Weakly Supervised 3D Open-vocabulary Segmentation" (3D-OVS), NeurIPS 2023, '
             "arXiv:2305.14093; GaussianCross (rendered features vs 2D targets)")

    Config = LiftingConfig

    def __init__(self, config: LiftingConfig | None = None):
        super().__init__(config)
        v = self.config.image_view
        self.teacher_views = (v, *(f"{v}_{k}" for k in range(1, self.config.views + 1)))

    def use_views(self, names: Sequence[str]) -> None:
        missing = [v for v in (*self.student_views, *self.teacher_views) if v not in names]
        if missing:
            have = [n for n in names if n.startswith(self.config.image_view)]
            raise AlambicError(f"method lifting reads views {missing}, the paired data gives {have}: set the data's "
                               f"views (glyph_outlines: data.views: {self.config.views}) or method.views to match")

    def setup(self, student, teacher, info) -> None:
        points, fmap = self._tapped(student, teacher)
        self.projector = Projector(points.shape[2], fmap.shape[1])
        cfg = self.config
        if cfg.correlation_weight > 0:  # the anchors: k-means of the teacher's feature-map cells of the first batch
            cells = fmap.detach().permute(0, 2, 3, 1).reshape(-1, fmap.shape[1]).float()
            cells = cells[cells.norm(dim=1) > 0]
            if len(cells) < cfg.prototypes:
                raise AlambicError(f"lifting: prototypes {cfg.prototypes} > the {len(cells)} non-zero teacher feature "
                                   "cells of the first batch; lower method.prototypes")
            self.register_buffer("anchors", _kmeans(cells, cfg.prototypes))

    def _view(self, student, teacher, batch, view: str, flat, b: int, p: int):
        """(lifting loss of ``view``, teacher features at every point [B, P, C], mask of paired points [B, P])."""
        fmap = teacher[view].features[self.config.teacher_tap]
        size = tuple(batch.views[view].shape[-2:])
        pixels = teacher_pixels(fmap, size).permute(0, 2, 3, 1)  # [B, H, W, C], constant
        pairing_points, at = flatten_pairs(read_pairs(batch, INPUT, view), p)
        if len(pairing_points) == 0:
            raise AlambicError(f"no point of this batch is paired with a pixel of view {view!r}")
        pixel = (at[:, 0] * size[0] + at[:, 1]) * size[1] + at[:, 2]
        covered, slot = torch.unique(pixel, return_inverse=True)  # the pixels some point lands on
        rendered = scatter_mean(flat[pairing_points], slot, len(covered))  # each covered pixel: mean of its points
        target = pixels.reshape(-1, pixels.shape[-1])[covered]
        loss = feature_lifting_loss(rendered, target)
        at_points = pixels.new_zeros(b * p, pixels.shape[-1])
        at_points[pairing_points] = pixels[at[:, 0], at[:, 1], at[:, 2]]
        paired = torch.zeros(b * p, dtype=torch.bool, device=flat.device)
        paired[pairing_points] = True
        return loss, at_points.reshape(b, p, -1), paired.reshape(b, p)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        points, _ = self._tapped(student, teacher)
        b, p, _ = points.shape
        flat = projected_points(points, self.projector, cfg.normalize_points)  # [B·P, C]: one feature per point
        per_view = [self._view(student, teacher, batch, v, flat, b, p) for v in self.teacher_views]
        feat = torch.stack([v[0] for v in per_view]).mean()
        loss, terms = feat, {"feature": feat.detach()}
        monitors = {f"cos_{v}": 1 - lv[0].detach() for v, lv in zip(self.teacher_views, per_view)}
        if cfg.correlation_weight > 0:
            log_p = F.log_softmax(F.normalize(flat, dim=1) @ self.anchors.t() / cfg.prototype_temperature, dim=1)
            log_p = log_p.reshape(b, p, -1)
            whole = [v[2].all(1) for v in per_view]  # the sample-views in which every point lands in the image
            teacher_feats = torch.cat([v[1][w] for v, w in zip(per_view, whole)])
            student_log_p = torch.cat([log_p[w] for w in whole])
            if len(teacher_feats):
                corr = cfg.correlation_weight * feature_correlation_loss(
                    student_log_p, teacher_feats, cfg.shift, cfg.pos_weight, cfg.neg_weight, cfg.divergence)
                loss, terms["correlation"] = loss + corr, corr.detach()
            monitors["correlation_patches"] = loss.new_tensor(float(len(teacher_feats)))
        return MethodOutput(loss, terms, student[INPUT].logits, monitors=monitors)
