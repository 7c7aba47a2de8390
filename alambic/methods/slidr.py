"""``slidr``: superpixel-pooled point-to-pixel InfoNCE (SLidR), through the paired data."""

from __future__ import annotations

import torch

from alambic.data.batch import INPUT
from alambic.data.paired import read_regions
from alambic.losses import offset_ids, slidr_loss
from alambic.methods._crossmodal import PairedConfig, PairedMethod
from alambic.methods.base import MethodOutput
from alambic.registry import METHODS


class SLidRConfig(PairedConfig):
    pass


@METHODS.register("slidr")
class SLidR(PairedMethod):
    """A point network learns from a frozen image network, region by region: superpoints match superpixels.

    Sautier et al., CVPR 2022, arXiv:2203.16258, §3: the image's superpixels (the batch's ``regions:<image>``,
    SLIC) group pixels into regions; the 3D features of the paired points whose pixel lies in superpixel ``s``
    are averaged into ``k_s``, the decoded 2D features of *all* its pixels into ``q_s``; superpixel ids are made
    unique across the batch, superpixels without a paired point are dropped, the pooled vectors are not
    re-normalised, and ``L = −(1/S) Σ_s log softmax_{s'}(k_s·q_{s'}/τ)[s]`` with τ = 0.07
    (:func:`~alambic.losses.slidr_loss`). Every region weighs the same whatever its number of points, and
    pixels of one superpixel are never each other's negatives.
    """

    paper = ('Sautier et al., "Image-to-Lidar Self-Supervised Distillation for Autonomous Driving Data" (SLidR), '
             "CVPR 2022, arXiv:2203.16258")

    Config = SLidRConfig

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        points, pixels, pairing_points, pairing_images = self.paired_features(student, teacher, batch)
        regions = read_regions(batch, cfg.image_view)
        per_image = int(regions.max()) + 1  # any bound on the ids works: it only offsets them per image
        loss = slidr_loss(points, pixels, regions, pairing_points, pairing_images, per_image, cfg.temperature)
        b, r, c = pairing_images.unbind(1)
        ids = offset_ids(regions, per_image)[b, r, c]
        kept = torch.unique(ids[ids >= 0]).numel()  # the superpixels the loss contrasts
        return MethodOutput(loss, {"nce": loss.detach()}, student[INPUT].logits,
                            monitors={"superpixels": loss.new_tensor(float(kept))})
