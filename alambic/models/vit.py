"""A tiny Vision Transformer for small images, registered as ``student.arch: vit``.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", 2021,
arXiv:2010.11929: the image is cut into non-overlapping ``patch_size`` patches, each linearly embedded
(a strided convolution), a learned class token and learned position embeddings are added, and ``depth``
pre-norm blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` follow; a final LayerNorm, a pooling (the class
token, or the mean of the patch tokens) and a linear head give the logits.

It exists so token-relation distillation (Hybrid Distill, G2SD; :mod:`alambic.methods.token_relation`)
has queries and keys to tap: the attention module computes q, k and v with separate ``nn.Linear``
layers, so a tap on ``blocks.{i}.attn.q`` / ``blocks.{i}.attn.k`` captures them as [B, N, dim] tensors
(N = number of patches, +1 with the class token). Taps:

- ``patch_embed`` [B, dim, H/p, W/p] (the patch grid, before flattening);
- ``blocks.{i}`` [B, N, dim] (output of block i);
- ``blocks.{i}.attn.q`` / ``.k`` / ``.v`` [B, N, dim] (before the split into heads);
- ``blocks.{i}.attn.softmax`` [B, heads, N, N] (the attention probabilities);
- ``norm`` [B, N, dim]; ``pool`` [B, dim] (the pooled embedding); ``head`` [B, classes].
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from alambic.errors import AlambicError
from alambic.registry import MODELS


class ViTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    patch_size: int = Field(4, ge=1, description="side of the square patches; must divide the image's height and width")
    dim: int = Field(32, ge=1, description="token width")
    depth: int = Field(2, ge=1, description="number of transformer blocks")
    heads: int = Field(2, ge=1, description="attention heads; must divide dim")
    mlp_ratio: float = Field(2.0, gt=0, description="hidden width of each block's MLP, as a multiple of dim")
    pool: Literal["cls", "mean"] = Field("cls", description="class token (ViT) or mean of the patch tokens")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after attention and in the MLP")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "ViTConfig":
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        return self


class Attention(nn.Module):
    """Multi-head self-attention ``softmax(q kᵀ/√d_h) v`` with q, k, v as separate, tappable linears."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise AlambicError(f"vit: dim ({dim}) must be divisible by heads ({heads})")
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.softmax = nn.Softmax(dim=-1)
        self.proj = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def _split(self, x: Tensor) -> Tensor:  # [B, N, dim] -> [B, heads, N, head_dim]
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        attn = self.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim))
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)
        return self.drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float = 0.0):
        super().__init__()
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout) if dropout else nn.Identity(),
                                 nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Pool(nn.Module):
    """[B, N, dim] tokens -> [B, dim]: the class token (position 0), or the mean of the patch tokens."""

    def __init__(self, mode: str, has_cls: bool):
        super().__init__()
        self.mode, self.has_cls = mode, has_cls

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "cls":
            return x[:, 0]
        return x[:, 1:].mean(1) if self.has_cls else x.mean(1)


class ViT(nn.Module):
    """Patch embedding, class token + position embeddings, pre-norm blocks, LayerNorm, pooling, head."""

    checkpoint_blocks = False  # train.gradient_checkpointing: see gradient_checkpointing_enable

    def __init__(self, in_channels: int, hw: tuple[int, int], num_classes: int, patch_size: int = 4, dim: int = 32,
                 depth: int = 2, heads: int = 2, mlp_ratio: float = 2.0, pool: str = "cls", dropout: float = 0.0):
        super().__init__()
        h, w = hw
        if h % patch_size or w % patch_size:
            raise AlambicError(f"vit: patch_size {patch_size} does not divide the image size {h}x{w}")
        num_patches = (h // patch_size) * (w // patch_size)
        self.use_cls = pool == "cls"
        self.num_tokens = num_patches + int(self.use_cls)
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if self.use_cls else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pool = Pool(pool, self.use_cls)
        self.head = nn.Linear(dim, num_classes)

    def gradient_checkpointing_enable(self) -> None:
        """Keep only each block's input while training and recompute the block in the backward pass
        (``torch.utils.checkpoint``, non-reentrant: taps inside a block still carry gradients, and dropout
        draws are replayed). Same gradients, less activation memory, about one more forward of compute."""
        self.checkpoint_blocks = True

    def tokens(self, x: Tensor) -> Tensor:
        """[B, C, H, W] images -> [B, N, dim] tokens after the final LayerNorm."""
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # [B, patches, dim]
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.pos_embed
        recompute = self.checkpoint_blocks and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            t = checkpoint(block, t, use_reentrant=False) if recompute else block(t)
        return self.norm(t)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.tokens(x)))


@MODELS.register("vit", config=ViTConfig, description="tiny Vision Transformer for small [C, H, W] images")
def build_vit(cfg: ViTConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise AlambicError(f"model 'vit' needs image inputs [C, H, W], the data gives samples of shape {list(input_shape)}")
    return ViT(input_shape[0], tuple(input_shape[1:]), num_classes, cfg.patch_size, cfg.dim, cfg.depth, cfg.heads,
               cfg.mlp_ratio, cfg.pool, cfg.dropout)
