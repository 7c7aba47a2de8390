"""``pointnet``: a small PointNet for point clouds ``[B, P, d]``, with per-point features for pairing losses.

Qi, Su, Mo, Guibas, "PointNet: Deep Learning on Point Sets for 3D Classification and Segmentation", CVPR
2017, arXiv:1612.00593: a shared per-point MLP (the same weights for every point, §4.2), a symmetric function
(max-pool over the points, Eq. 1) giving a global feature invariant to the order of the points, and a
linear classifier on it. For per-point outputs the paper's segmentation network (Fig. 2) concatenates each
point's early feature with the global feature and runs a second shared MLP: those per-point features know
the whole shape, which cross-modal pairing losses (PPKT, SLidR) need: a feature of a point's coordinates
alone cannot tell which glyph the point belongs to. The input and feature transforms (T-Nets) are left
out (the small version; glyph outlines come in one frame).

Taps: ``mlp.layer{i}`` (per-point ``[B, P, C_i]``), ``pool`` (global ``[B, C]``: the representation),
``head`` (logits), ``point_head`` (per-point ``[B, P, point_dim]``). The per-point head runs on every forward
(a tap reads it; the logits do not depend on it), which about doubles the compute of a classification pass.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from alambic.errors import AlambicError
from alambic.registry import MODELS


class PointNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    widths: list[int] = Field(default_factory=lambda: [64, 128, 256], min_length=1,
                              description="output widths of the shared per-point MLP; the last is the global feature's")
    local_layer: int = Field(0, ge=0, description="the layer whose per-point output joins the global feature in point_head")
    point_hidden: int = Field(128, ge=1, description="hidden width of the per-point head")
    point_dim: int = Field(64, ge=1, description="width of the per-point features (point_head)")
    batchnorm: bool = True
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the global feature before the classifier")


class PointBlock(nn.Module):
    """Linear + BatchNorm (over batch and points together) + ReLU, applied to every point of ``[B, P, C]``."""

    def __init__(self, c_in: int, c_out: int, batchnorm: bool = True):
        super().__init__()
        self.fc = nn.Linear(c_in, c_out, bias=not batchnorm)
        self.bn = nn.BatchNorm1d(c_out) if batchnorm else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        b, p, _ = x.shape
        return self.act(self.bn(self.fc(x).reshape(b * p, -1)).reshape(b, p, -1))


class MaxPool(nn.Module):
    """Max over the points, ``[B, P, C] -> [B, C]``: PointNet's symmetric function (Eq. 1)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(dim=1)


class PointNet(nn.Module):
    """Shared per-point MLP, max-pool, linear classifier; and a per-point head on [early point feature, global]."""

    def __init__(self, in_dim: int, num_classes: int, widths: list[int], local_layer: int = 0, point_hidden: int = 128,
                 point_dim: int = 64, batchnorm: bool = True, dropout: float = 0.0):
        super().__init__()
        if local_layer >= len(widths):
            raise AlambicError(f"pointnet: local_layer {local_layer} must name one of the {len(widths)} layers")
        self.local_layer = local_layer
        self.mlp = nn.Sequential()
        width = in_dim
        for i, w in enumerate(widths):
            self.mlp.add_module(f"layer{i}", PointBlock(width, w, batchnorm))
            width = w
        self.pool = MaxPool()
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(width, num_classes)
        self.point_head = nn.Sequential(PointBlock(widths[local_layer] + width, point_hidden, batchnorm),
                                        nn.Linear(point_hidden, point_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3:
            raise AlambicError(f"pointnet: wants point clouds [B, P, d], got {list(x.shape)}")
        local = h = x
        for i, block in enumerate(self.mlp):
            h = block(h)
            if i == self.local_layer:
                local = h
        g = self.pool(h)
        # the per-point features (read through the point_head tap): each point's early feature with the shape's
        self.point_head(torch.cat([local, g[:, None, :].expand(-1, x.shape[1], -1)], dim=2))
        return self.head(self.drop(g))


@MODELS.register("pointnet", config=PointNetConfig, description="small PointNet for point clouds [P, d] (per-point features at point_head)")
def build_pointnet(cfg: PointNetConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 2:
        raise AlambicError(f"model 'pointnet' needs point clouds [P, d], the data gives samples of shape {list(input_shape)}")
    return PointNet(input_shape[1], num_classes, cfg.widths, cfg.local_layer, cfg.point_hidden, cfg.point_dim,
                    cfg.batchnorm, cfg.dropout)
