"""``ppkt``: point-to-pixel InfoNCE through the paired data, the point-level baseline of SLidR."""

from __future__ import annotations

import torch
from pydantic import Field

from alambic.data.batch import INPUT
from alambic.losses import ppkt_loss
from alambic.methods._crossmodal import PairedConfig, PairedMethod
from alambic.methods.base import MethodOutput
from alambic.registry import METHODS


class PPKTConfig(PairedConfig):
    num_matches: int = Field(4096, ge=1, description="point-pixel pairs drawn per step (SLidR's PPKT config: 4096)")


@METHODS.register("ppkt")
class PPKT(PairedMethod):
    """A point network learns from a frozen image network: each point must pick its own pixel's feature.

    Every step draws ``num_matches`` of the batch's point-pixel pairs; point ``i``'s normalised feature must
    match the decoded feature of its pixel against the other drawn pixels (:func:`~alambic.losses.ppkt_loss`:
    InfoNCE, τ = 0.07). Pixels of the same glyph stroke are negatives too, which SLidR's superpixel pooling
    avoids. The draw is keyed by the step, so a resumed run draws the same pairs.
    """

    paper = ('Liu et al., "Learning from 2D: Contrastive Pixel-to-Point Knowledge Transfer for 3D Pretraining" '
             "(PPKT), 2021, arXiv:2104.04687; as the baseline of Sautier et al., SLidR, CVPR 2022, arXiv:2203.16258")

    Config = PPKTConfig

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        points, pixels, pairing_points, pairing_images = self.paired_features(student, teacher, batch)
        draw = torch.Generator().manual_seed(ctx.step)
        loss = ppkt_loss(points, pixels, pairing_points, pairing_images, cfg.num_matches, cfg.temperature, draw)
        matches = loss.new_tensor(float(min(cfg.num_matches, len(pairing_points))))
        return MethodOutput(loss, {"nce": loss.detach()}, student[INPUT].logits, monitors={"matches": matches})
