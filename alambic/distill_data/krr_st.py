"""``krr_st``: Kernel Ridge Regression on Self-supervised Target, a small set of learnable images *and*
learnable target representations that pre-trains a network as the full data would.

Lee et al., "Self-Supervised Dataset Distillation for Transfer Learning" (KRR-ST), ICLR 2024,
arXiv:2310.06511, §3 and Algorithm 1, checked against the official code (db-Lee/selfsup_dd,
``train.py``, ``algorithms/distill.py``, ``model_pool.py``):

1. ``X_s`` starts as real training images and ``Y_s`` as a frozen self-supervised teacher's
   representations of them (here: class-balanced, ``images_per_class`` per class; the official code takes
   the first images of a shuffled loader).
2. Every outer step: draw a model from the pool (:class:`~alambic.distill_data.pool.ModelPool`), a batch of
   real images (optionally translated; the teacher and the model see the same augmented batch), the
   teacher's targets ``Y_r`` of it; with the model's features (eval mode, a column of ones appended),
   ``loss = MSE(K_rs (K_ss + λI)⁻¹ Y_s, Y_r)``, ``λ = 1e-6 · tr(K_ss)`` detached
   (:func:`~alambic.losses.krr_st_loss`); Adam on ``(X_s, Y_s)`` (official: AdamW, weight decay 0, lr 1e-3
   decayed linearly to 1e-3 × lr); then the drawn model takes one SGD step on ``MSE(model(X_s), Y_s)``
   (reset when it reaches its age limit, which the official code gets wrong: see the pool's docstring).
3. A fresh network is pre-trained on ``(X_s, Y_s)`` (alambic's ``regress`` method on the saved set) and
   evaluated by a linear probe or fine-tuning on the real labelled data.

Deviation: the kernel solve runs in float64 (the digits networks have fewer feature dimensions than the
set has images at 10 per class, so ``K_ss`` is rank-deficient and only λ keeps it invertible; float32
loses the solution there).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from alambic.distill_data.augment import max_pixels, random_shifts
from alambic.distill_data.context import Context, Distiller
from alambic.distill_data.networks import embed, generator
from alambic.distill_data.pool import ModelPool
from alambic.distill_data.random_subset import class_balanced_subset
from alambic.distill_data.recipe import DATA_DISTILLERS
from alambic.losses import krr_st_loss


class KRRSTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    steps: int = Field(2000, ge=1, description="outer steps (paper: 160,000 on CIFAR-100)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate of X_s and Y_s (paper: 1e-3)")
    lr_end_factor: float = Field(1e-3, gt=0, le=1, description="linear decay to lr x this at the last step (paper)")
    real_batch: int = Field(256, ge=1, description="real images per outer step (paper: 1,024)")
    ridge_scale: float = Field(1e-6, ge=0, description="c in λ = c · tr(K_ss), detached (paper: 1e-6)")
    bias: bool = Field(True, description="append a column of ones to the features (official code)")
    num_models: int = Field(10, ge=1, description="models in the pool (paper: 10)")
    max_age: int = Field(100, ge=1, description="online SGD steps before a pool model is reset (paper: 1,000)")
    online_lr: float = Field(0.1, gt=0, description="pool SGD learning rate (paper: 0.1)")
    online_momentum: float = Field(0.9, ge=0, lt=1, description="pool SGD momentum (paper: 0.9)")
    online_weight_decay: float = Field(1e-3, ge=0, description="pool SGD weight decay (paper: 1e-3)")
    shift: float = Field(0.0, ge=0, lt=0.5, description="random translation of each real image, as a fraction "
                                                       "of the side; 0 = none")
    clip_grad_norm: float = Field(0.0, ge=0, description="clip each of X_s and Y_s's gradients to this norm; "
                                                         "0 = off (official default)")
    feature: str | None = Field(None, description="tap of the pool models' features; None: the network's "
                                                  "representation (cnn: pool)")


class KRRST(Distiller):
    def __init__(self, ctx: Context, cfg: KRRSTConfig):
        if ctx.teacher is None:
            raise ValueError("krr_st needs a teacher")
        self.ctx, self.cfg, self.feature = ctx, cfg, cfg.feature or ctx.feature
        self.total_steps = cfg.steps
        rows = class_balanced_subset(ctx.y, ctx.per_class, ctx.seed, ctx.num_classes)
        self.init_ids, self.init_labels = ctx.ids[rows].tolist(), ctx.y[rows].tolist()
        self.real_targets = None if cfg.shift > 0 else ctx.teacher(ctx.x).to(ctx.device)  # constant: computed once
        x0 = ctx.x[rows].to(ctx.device)
        y0 = ctx.teacher(x0) if self.real_targets is None else self.real_targets[rows]
        self.x_syn = x0.clone().requires_grad_(True)
        self.y_syn = y0.clone().float().requires_grad_(True)
        self.opt = torch.optim.Adam([self.x_syn, self.y_syn], lr=cfg.lr)
        k = self.y_syn.shape[1]
        self.pool = ModelPool(lambda: ctx.network(k), cfg.num_models, cfg.max_age, ctx.seed, lr=cfg.online_lr,
                              momentum=cfg.online_momentum, weight_decay=cfg.online_weight_decay, device=ctx.device)
        self.warmed = False  # the pool's staggered warm-up runs before the first step (a resume loads it instead)

    def lr_at(self, step: int) -> float:
        """Linear decay from lr at step 0 to lr x lr_end_factor at the last step (torch's LinearLR)."""
        cfg = self.cfg
        return cfg.lr * (1.0 + (cfg.lr_end_factor - 1.0) * step / max(1, cfg.steps))

    def step(self, step: int) -> dict[str, float]:
        ctx, cfg = self.ctx, self.cfg
        if not self.warmed:
            self.pool.warm_up(self.x_syn.detach(), self.y_syn.detach(), generator(ctx.seed, "pool"))
            self.warmed = True
        g = generator(ctx.seed, "step", step)
        slot = int(torch.randint(cfg.num_models, (1,), generator=g))
        rows = torch.randperm(len(ctx.x), generator=g)[: cfg.real_batch]
        x_real = ctx.x[rows].to(ctx.device)
        if cfg.shift > 0:
            x_real = random_shifts(x_real, max_pixels(cfg.shift, min(x_real.shape[-2:])), g)
            y_real = ctx.teacher(x_real)
        else:
            y_real = self.real_targets[rows.to(self.real_targets.device)]
        model = self.pool.models[slot]
        model.eval()
        with torch.no_grad():
            f_real = embed(model, x_real, self.feature)
        f_syn = embed(model, self.x_syn, self.feature)
        loss = krr_st_loss(f_syn.double(), self.y_syn.double(), f_real.double(), y_real.double(),
                           cfg.ridge_scale, cfg.bias)
        gx, gy = torch.autograd.grad(loss, [self.x_syn, self.y_syn])  # the pool model's weights get none
        self.x_syn.grad, self.y_syn.grad = gx, gy.to(self.y_syn.dtype)
        if cfg.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([self.x_syn], cfg.clip_grad_norm)
            torch.nn.utils.clip_grad_norm_([self.y_syn], cfg.clip_grad_norm)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(step)
        self.opt.step()
        pool_loss = self.pool.update(slot, self.x_syn.detach(), self.y_syn.detach())
        return {"loss": float(loss.detach()), "pool_mse": pool_loss}

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        from alambic.train.state import optimizer_state, prefixed

        t, m = optimizer_state(self.opt)
        pool_t, pool_m = self.pool.state()
        return ({"x_syn": self.x_syn.detach(), "y_syn": self.y_syn.detach(), **prefixed("opt", t), **pool_t},
                {"opt": m, "pool": pool_m})

    def load_state(self, tensors, meta) -> None:
        from alambic.train.state import load_optimizer_state, unprefixed

        with torch.no_grad():
            self.x_syn.copy_(tensors["x_syn"])
            self.y_syn.copy_(tensors["y_syn"])
        load_optimizer_state(self.opt, unprefixed("opt", tensors), meta["opt"])
        self.pool.load_state(tensors, meta["pool"])
        self.warmed = True

    def result(self):
        return (self.x_syn.detach().cpu().clone(), None, self.y_syn.detach().cpu().clone(),
                {"init_sample_ids": self.init_ids, "init_labels": self.init_labels,
                 "pool_resets": list(self.pool.resets)})


@DATA_DISTILLERS.register("krr_st", config=KRRSTConfig, needs_teacher=True,
                          paper='Lee et al., "Self-Supervised Dataset Distillation for Transfer Learning", ICLR '
                                '2024, arXiv:2310.06511',
                          description="learnable images and target representations fitted by kernel ridge "
                                      "regression to a frozen self-supervised teacher (KRR-ST)")
def make_krr_st(ctx: Context, options: KRRSTConfig) -> KRRST:
    return KRRST(ctx, options)
