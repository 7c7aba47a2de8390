"""Small reference networks and user factories, registered under ``student.arch`` / ``teacher.model.arch``.

Every builder takes its validated Config plus the data's ``input_shape`` and ``num_classes`` and returns
an ``nn.Module`` mapping a batch of inputs to logits. Submodules have stable names so a tap can address
them by dotted path (``body.act1``, ``features.block1``).
"""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from alambic.errors import AlambicError
from alambic.registry import MODELS


class MLPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    hidden: list[int] = Field(default_factory=lambda: [128], description="width of each hidden layer")
    dropout: float = Field(0.0, ge=0, lt=1)
    batchnorm: bool = False


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` blocks of Linear (+BatchNorm) + ReLU (+dropout), then a linear head.

    Taps: ``body.fc{i}``, ``body.act{i}`` (the i-th hidden activation), ``head``.
    """

    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0, batchnorm: bool = False):
        super().__init__()
        self.flatten = nn.Flatten()
        body = nn.Sequential()
        width = in_features
        for i, h in enumerate(hidden):
            body.add_module(f"fc{i}", nn.Linear(width, h))
            if batchnorm:
                body.add_module(f"bn{i}", nn.BatchNorm1d(h))
            body.add_module(f"act{i}", nn.ReLU())
            if dropout:
                body.add_module(f"drop{i}", nn.Dropout(dropout))
            width = h
        self.body = body
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.body(self.flatten(x)))


class CNNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    channels: list[int] = Field(default_factory=lambda: [16, 32], description="output channels of each conv block")
    kernel_size: int = Field(3, ge=1)
    batchnorm: bool = True
    pool: bool = Field(True, description="2x2 max-pool after each block while the map is at least 4x4")
    dropout: float = Field(0.0, ge=0, lt=1)


class SmallCNN(nn.Module):
    """Conv blocks (conv, BatchNorm, ReLU, max-pool), global average pooling and a linear head.

    Taps: ``features.block{i}`` (output of block i, [B, C_i, H_i, W_i]), ``pool`` ([B, C_last]), ``head``.
    """

    def __init__(self, in_channels: int, hw: tuple[int, int], channels: list[int], num_classes: int,
                 kernel_size: int = 3, batchnorm: bool = True, pool: bool = True, dropout: float = 0.0):
        super().__init__()
        feats = nn.Sequential()
        c, size = in_channels, min(hw)
        for i, out in enumerate(channels):
            block = nn.Sequential(nn.Conv2d(c, out, kernel_size, padding=kernel_size // 2, bias=not batchnorm))
            if batchnorm:
                block.append(nn.BatchNorm2d(out))
            block.append(nn.ReLU())
            if pool and size >= 4:
                block.append(nn.MaxPool2d(2))
                size //= 2
            feats.add_module(f"block{i}", block)
            c = out
        self.features = feats
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(self.drop(self.pool(self.features(x))))


class ModuleConfig(BaseModel):
    """``arch: module``: your own factory. Naming one is code execution: building the model imports
    ``package.module`` and calls ``factory`` with ``kwargs``, so a recipe's ``module:`` runs whatever that code
    does. A finished run directory records the factory in ``student.json``, and loading such a run
    (``alambic export``, ``teacher: {run: DIR}``, ``transfer``, :func:`alambic.load_student`) refuses it unless
    told to trust it (``--trust-code``, ``trust_code: true``, ``trust_code=True``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    module: str = Field(description="'package.module:factory' returning an nn.Module; this imports and runs "
                                    "that code, so name only code you trust")
    kwargs: dict[str, Any] = Field(default_factory=dict)


@MODELS.register("mlp", config=MLPConfig, description="multi-layer perceptron on flattened inputs")
def build_mlp(cfg: MLPConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(math.prod(input_shape), cfg.hidden, num_classes, cfg.dropout, cfg.batchnorm)


@MODELS.register("cnn", config=CNNConfig, description="small convolutional network for [C, H, W] images")
def build_cnn(cfg: CNNConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if len(input_shape) != 3:
        raise AlambicError(f"model 'cnn' needs image inputs [C, H, W], the data gives samples of shape {list(input_shape)}")
    return SmallCNN(input_shape[0], input_shape[1:], cfg.channels, num_classes, cfg.kernel_size,
                    cfg.batchnorm, cfg.pool, cfg.dropout)


@MODELS.register("module", config=ModuleConfig, description="your own factory: module: 'pkg.mod:factory'")
def build_module(cfg: ModuleConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    factory = import_object(cfg.module)
    params = inspect.signature(factory).parameters
    extra = {k: v for k, v in (("num_classes", num_classes), ("input_shape", tuple(input_shape))) if k in params}
    model = factory(**extra, **cfg.kwargs)
    if not isinstance(model, nn.Module):
        raise AlambicError(f"module '{cfg.module}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def import_object(spec: str) -> Callable[..., Any]:
    """The object named by ``'package.module:attr'`` (a clear error if the module or attribute is missing)."""
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise AlambicError(f"'{spec}': expected 'package.module:name'")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise AlambicError(f"'{spec}': cannot import module '{mod_name}' ({exc})") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AlambicError(f"'{spec}': module '{mod_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


def build_model(spec, input_shape: tuple[int, ...], num_classes: int, *, what: str = "model") -> nn.Module:
    """The network a validated :class:`~alambic.recipe.ModelSpec` describes.

    ``what`` names it in errors (``student``, ``teacher.model``): a model too large for memory ends in one
    line with its parameter count and size (counted on the meta device, without memory) and what to lower,
    not in the allocator's traceback."""
    build = MODELS.get(spec.arch).obj
    try:
        return build(spec.options, tuple(input_shape), num_classes)
    except Exception as exc:  # MemoryError is not a RuntimeError
        if not is_out_of_memory(exc):
            raise
    # outside the except block: the failed attempt's frames (and what they hold) are released first
    size = ""
    if spec.arch != "module":  # a user factory is not run a second time for a count
        try:
            with torch.device("meta"):
                count = sum(p.numel() for p in build(spec.options, tuple(input_shape), num_classes).parameters())
            size = f", {count:,} parameters = {count * 4 / 2**30:.1f} GiB in float32"
        except Exception:
            pass
    if " " in what:  # not a recipe key (a trained run's student): nothing in the recipe to lower
        advice = "it needs a machine with more memory"
    else:
        key = {"mlp": f"{what}.hidden", "cnn": f"{what}.channels"}.get(spec.arch, f"the sizes in {what}")
        advice = f"lower {key}, or use a smaller model"
    raise AlambicError(f"out of memory building the {what} ({spec.arch}{size}): {advice}") from None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for an allocation failure: ``MemoryError``, ``torch.OutOfMemoryError`` or the CPU allocator's
    ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)
