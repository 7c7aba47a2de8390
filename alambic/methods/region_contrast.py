"""``region_contrast``: region-pooled cross-modal InfoNCE towards a frozen teacher (CALICO's idea, generic)."""

from __future__ import annotations

import torch

from alambic.data.batch import INPUT
from alambic.data.paired import flatten_pairs, read_pairs, read_regions
from alambic.errors import AlambicError
from alambic.losses import offset_ids, region_contrast_loss
from alambic.methods._crossmodal import PairedMethod
from alambic.methods._teacher_space import (
    Projector,
    TeacherSpaceConfig,
    projected_points,
    teacher_pixels,
)
from alambic.methods.base import MethodOutput
from alambic.registry import METHODS


class RegionContrastConfig(TeacherSpaceConfig):
    pass


@METHODS.register("region_contrast")
class RegionContrast(PairedMethod):
    """A point network learns, region by region, to land on a frozen image network's own features.

    The region-aware contrastive distillation of CALICO (Sun et al., "CALICO: Self-Supervised Camera-LiDAR
    Contrastive Pre-training for BEV Perception", ICLR 2024, arXiv:2306.00349, RAD) in its generic form, since
    no official code exists: each modality's members are scatter-meaned per region (here the paired data's
    regions, e.g. SLIC superpixels of ``glyph_outlines``; ids made unique across the batch), a region's
    student vector must pick the teacher's vector of the *same* region among all regions of the batch present
    in both modalities (:func:`~alambic.losses.region_contrast_loss`, InfoNCE, τ = 0.07). The student's
    members are its paired points (projected to the teacher's width by a trainable linear layer), unpaired
    points take no part; the teacher's members are all pixels of the region.

    How it differs from SLidR (:mod:`alambic.methods.slidr`), which pools the same way:

    - the teacher side is a **constant**: the frozen network's own feature map, bilinearly resized, with no
      trainable decoder; the trainable map sits on the student's side. SLidR trains a 1x1-conv decoder on the
      teacher, so its 2D target space moves with the 3D side; here the target space is fixed;
    - the pooled region vectors are **L2-normalised** before the dot products (SLidR's are not, so its logits
      also weigh how concentrated a region's features are);
    - the regions are whatever the data supplies (CALICO: clusters of the point cloud; here SLIC superpixels
      of the image, the same ones SLidR uses, so the comparison isolates the two points above).
    """

    paper = ('Sun et al., "CALICO: Self-Supervised Camera-LiDAR Contrastive Pre-training for BEV Perception", '
             "ICLR 2024, arXiv:2306.00349 (region-aware distillation; generic form, no official code)")

    Config = RegionContrastConfig

    def setup(self, student, teacher, info) -> None:
        points, fmap = self._tapped(student, teacher)
        self.projector = Projector(points.shape[2], fmap.shape[1])

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        points, fmap = self._tapped(student, teacher)
        b, p, _ = points.shape
        regions = read_regions(batch, cfg.image_view)  # [B, H, W]
        pixels = teacher_pixels(fmap, tuple(regions.shape[-2:]))  # [B, C, H, W], constant
        flat = projected_points(points, self.projector, cfg.normalize_points)  # [B·P, C]
        pairing_points, pairing_images = flatten_pairs(read_pairs(batch, INPUT, cfg.image_view), p)
        if len(pairing_points) == 0:
            raise AlambicError("no point of this batch is paired with a pixel")
        per_image = int(regions.max()) + 1  # any bound on the ids works: it only offsets them per image
        ids = offset_ids(regions, per_image)  # [B, H, W], unique across the batch
        bi, r, c = pairing_images.unbind(1)
        point_ids = ids[bi, r, c]  # the region of each paired point's pixel
        loss = region_contrast_loss(flat[pairing_points], pixels.permute(0, 2, 3, 1).reshape(-1, pixels.shape[1]),
                                    point_ids, ids.reshape(-1), b * per_image, cfg.temperature, normalize=True)
        kept = torch.unique(point_ids[point_ids >= 0]).numel()  # every region with a point also has pixels
        return MethodOutput(loss, {"nce": loss.detach()}, student[INPUT].logits,
                            monitors={"regions": loss.new_tensor(float(kept))})
