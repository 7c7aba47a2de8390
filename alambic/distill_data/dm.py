"""``dm``: Distribution Matching, synthetic images whose per-class mean embedding matches the real images'
under randomly initialised networks.

Zhao & Bilen, "Dataset Condensation with Distribution Matching" (DM), WACV 2023, arXiv:2110.04181,
Algorithm 1: initialise the synthetic images of each class from random real images; every iteration
draw a fresh network ψ_θ (never trained), a batch of real images of each class, one Siamese augmentation
per class (the same for its real and synthetic images, DSA), and take an SGD step (lr 1, momentum 0.5) on
:func:`~alambic.losses.distribution_matching_loss`. The embedding is the network's representation before
its classifier (the official ConvNet's ``embed``). Differences from the official code: the embedding
network runs in eval mode (its BatchNorm at initialisation is the identity; the official ConvNet uses
instance norm instead), and the augmentation is DSA's translation only (not colour, scale, rotation or
cutout).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from alambic.distill_data.augment import max_pixels, shift
from alambic.distill_data.context import Context, Distiller
from alambic.distill_data.networks import derived_seed, embed, fresh, generator
from alambic.distill_data.random_subset import class_balanced_subset
from alambic.distill_data.recipe import DATA_DISTILLERS
from alambic.losses import distribution_matching_loss


class DMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(1000, ge=1, description="outer iterations (paper: 20,000)")
    lr: float = Field(1.0, gt=0, description="SGD learning rate of the images (paper: 1)")
    momentum: float = Field(0.5, ge=0, lt=1, description="SGD momentum of the images (paper: 0.5)")
    real_batch: int = Field(256, ge=1, description="real images per class per iteration (paper: 256)")
    shift: float = Field(0.125, ge=0, lt=0.5, description="Siamese random translation, as a fraction of the side "
                                                         "(DSA crop: 1/8); 0 = none")
    feature: str | None = Field(None, description="tap of the embedding; None: the network's representation "
                                                  "(cnn: pool)")
    init: str = Field("real", pattern="^(real|noise)$", description="real: class-balanced random real images")


class DM(Distiller):
    def __init__(self, ctx: Context, cfg: DMConfig):
        self.ctx, self.cfg, self.feature = ctx, cfg, cfg.feature or ctx.feature
        self.total_steps = cfg.steps
        rows = class_balanced_subset(ctx.y, ctx.per_class, ctx.seed, ctx.num_classes)
        self.labels = ctx.y[rows].clone()
        if cfg.init == "real":
            images = ctx.x[rows].clone()
        else:
            images = torch.rand(ctx.x[rows].shape, generator=generator(ctx.seed, "init"))
        self.images = images.to(ctx.device).requires_grad_(True)
        self.opt = torch.optim.SGD([self.images], lr=cfg.lr, momentum=cfg.momentum)
        self.by_class = [torch.nonzero(ctx.y == c).flatten() for c in range(ctx.num_classes)]
        self.init_ids = ctx.ids[rows].tolist() if cfg.init == "real" else None

    def step(self, step: int) -> dict[str, float]:
        ctx, cfg = self.ctx, self.cfg
        g = generator(ctx.seed, "step", step)
        net = fresh(lambda: ctx.network(ctx.num_classes), derived_seed(ctx.seed, "network", step)).to(ctx.device)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        most = max_pixels(cfg.shift, min(self.images.shape[-2:]))
        real_parts, syn_parts, real_y, syn_y = [], [], [], []
        for c, rows in enumerate(self.by_class):
            pick = rows[torch.randperm(len(rows), generator=g)[: cfg.real_batch]]
            dx, dy = (torch.randint(-most, most + 1, (2,), generator=g).tolist() if most else (0, 0))
            real_parts.append(shift(ctx.x[pick].to(ctx.device), dx, dy))
            mine = self.labels == c
            syn_parts.append(shift(self.images[mine], dx, dy))
            real_y.append(torch.full((len(pick),), c, dtype=torch.int64))
            syn_y.append(self.labels[mine])
        with torch.no_grad():
            emb_real = embed(net, torch.cat(real_parts), self.feature)
        emb_syn = embed(net, torch.cat(syn_parts), self.feature)
        loss = distribution_matching_loss(emb_real, torch.cat(real_y).to(ctx.device), emb_syn,
                                          torch.cat(syn_y).to(ctx.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": float(loss.detach())}

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from alambic.train.state import optimizer_state, prefixed

        t, m = optimizer_state(self.opt)
        return {"images": self.images.detach(), **prefixed("opt", t)}, {"opt": m}

    def load_state(self, tensors, meta) -> None:
        from alambic.train.state import load_optimizer_state, unprefixed

        with torch.no_grad():
            self.images.copy_(tensors["images"])
        load_optimizer_state(self.opt, unprefixed("opt", tensors), meta["opt"])

    def result(self):
        return self.images.detach().cpu().clone(), self.labels.clone(), None, {"init_sample_ids": self.init_ids}


@DATA_DISTILLERS.register("dm", config=DMConfig, paper='Zhao & Bilen, "Dataset Condensation with Distribution '
                          'Matching", WACV 2023, arXiv:2110.04181',
                          description="synthetic images matching the real class means of random networks' "
                                      "embeddings (DM)")
def make_dm(ctx: Context, options: DMConfig) -> DM:
    return DM(ctx, options)
