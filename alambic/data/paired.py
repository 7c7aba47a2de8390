"""Paired multi-modal data: several modalities of each sample and the explicit pairings between them.

Cross-modal distillation (a frozen teacher on modality A teaching a student on modality B) needs to know
*which* element of one modality corresponds to which element of the other: the pixel a lidar point
projects to in SLidR (Sautier et al., "Image-to-Lidar Self-Supervised Distillation for Autonomous Driving
Data", CVPR 2022, arXiv:2203.16258, §3) and PPKT (Liu et al., 2021, arXiv:2104.14687), the superpixel a
pixel belongs to. Those correspondences are data, carried with the sample; a method reads them, never
assumes them (not "point i lies at pixel i", not "every point has a pixel").

A :class:`PairedData` is a :class:`~alambic.data.sources.RawData` (the student's modality as ``x``, so
splits, plain loaders, classifiers and probes work on it unchanged) plus, row for row:

- ``views``: the other modalities, ``name -> [N, ...]`` (``"image" -> [N, C, H, W]``);
- ``extras``: integer tensors that relate them, under keys built by :func:`pair_key` and
  :func:`region_key`:

  - ``pair:<source>-><target>``: ``[N, M, 3]`` rows ``(element of source, row, col of target)``: element
    ``e`` of view ``source`` (a point of the ``input`` point cloud) lies on pixel ``(row, col)`` of image view
    ``target``; rows of ``-1`` are padding (a sample with fewer pairs, a point outside the image);
  - ``regions:<view>``: ``[N, H, W]`` region (superpixel) ids of image view ``view``, per image in ``[0, R)``,
    ``-1`` for a pixel in no region.

Several views of one sample are several image views, each with its own pairing (``pair:input->image``,
``pair:input->image_1``, ...): :func:`with_affine_views` adds ``count`` views that are the image under a
fixed random affine map each, with every pairing (and region map) moved by the same map, so that the source
elements stay where they were and only their pixels move (the posed views of 2D-to-3D lifting, in 2D).

:class:`PairedLoader` wraps any loader and adds those views and extras to each batch by its stable sample
index (``batch.index`` is the row of the :class:`PairedData`), so batches, sub-batches
(:meth:`~alambic.data.batch.Batch.select`, gradient accumulation) and resumed epochs carry them exactly.
:func:`flatten_pairs` turns a batch's pairs into the flat form of the losses of
:mod:`alambic.losses.crossmodal` (global point rows, ``(image, row, col)`` triples).

A dataset offers paired modalities by registering a builder beside its loader:
``DATASETS.register(name, ..., paired=builder)`` with ``builder(options) -> PairedData``;
:func:`paired_data` finds it from a recipe's ``data`` section.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.data.batch import INPUT, Batch
from alambic.data.sources import RawData
from alambic.errors import AlambicError, RecipeError, ShapeMismatchError
from alambic.registry import DATASETS

PAIR_PREFIX, REGION_PREFIX = "pair:", "regions:"


def pair_key(source: str, target: str) -> str:
    """The extras key of the pairs between elements of view ``source`` and pixels of view ``target``."""
    return f"{PAIR_PREFIX}{source}->{target}"


def region_key(view: str) -> str:
    """The extras key of the per-pixel region (superpixel) ids of image view ``view``."""
    return f"{REGION_PREFIX}{view}"


def _parse_pair_key(key: str) -> tuple[str, str]:
    source, sep, target = key[len(PAIR_PREFIX):].partition("->")
    if not sep or not source or not target:
        raise AlambicError(f"paired data: extras key {key!r} must read 'pair:<source>-><target>'")
    return source, target


@dataclass(frozen=True)
class PairedData:
    """The student's modality (``raw``), the other modalities (``views``) and the pairings (``extras``).

    Integer extras may be stored narrow (int16) and are served as int64. Checked when built: every tensor
    has one row per sample; a pairing's source and target views exist, its element indices lie in the
    source's element count (dim 1 of the view: the points of a ``[N, P, 2]`` cloud) and its pixels inside the
    target image; a region map has its image's ``[N, H, W]`` shape. Each failure is one line naming the key.
    """

    raw: RawData
    views: Mapping[str, Tensor]
    extras: Mapping[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.raw)
        shapes = {INPUT: tuple(self.raw.x.shape)}
        for name, v in self.views.items():
            if name == INPUT or not name.isidentifier():
                raise AlambicError(f"paired data: view name {name!r} must be an identifier other than {INPUT!r}")
            if v.shape[0] != n:
                raise ShapeMismatchError(f"paired data: view {name!r} has {v.shape[0]} rows, the samples {n}")
            shapes[name] = tuple(v.shape)
        for key, t in self.extras.items():
            if t.shape[0] != n:
                raise ShapeMismatchError(f"paired data: extras {key!r} has {t.shape[0]} rows, the samples {n}")
            if t.is_floating_point() or t.dtype == torch.bool:
                raise AlambicError(f"paired data: extras {key!r} must hold integers, got {t.dtype}")
            if key.startswith(PAIR_PREFIX):
                self._check_pairs(key, t, shapes)
            elif key.startswith(REGION_PREFIX):
                view = key[len(REGION_PREFIX):]
                if view not in shapes or len(shapes[view]) != 4 or t.shape != (n, *shapes[view][2:]):
                    want = f"[N, H, W] = {[n, *shapes[view][2:]]}" if view in shapes else "an image view"
                    raise ShapeMismatchError(f"paired data: {key!r} must be {want}, got {list(t.shape)}")
            else:
                raise AlambicError(f"paired data: extras key {key!r} is neither {PAIR_PREFIX}... nor {REGION_PREFIX}...")

    @staticmethod
    def _check_pairs(key: str, t: Tensor, shapes: dict[str, tuple[int, ...]]) -> None:
        source, target = _parse_pair_key(key)
        for v in (source, target):
            if v not in shapes:
                raise AlambicError(f"paired data: {key!r} names view {v!r}, the views are {sorted(shapes)}")
        if len(shapes[target]) != 4:
            raise ShapeMismatchError(f"paired data: {key!r} pairs with pixels, but view {target!r} is "
                                     f"{list(shapes[target])}, not images [N, C, H, W]")
        if t.dim() != 3 or t.shape[2] != 3:
            raise ShapeMismatchError(f"paired data: {key!r} must be [N, M, 3] (element, row, col), got {list(t.shape)}")
        pad = t[..., 0] < 0
        if bool((t[pad] != -1).any()):
            raise AlambicError(f"paired data: {key!r} padding rows must be (-1, -1, -1)")
        live = t[~pad].long()
        limits = (shapes[source][1], shapes[target][2], shapes[target][3])
        for j, (what, limit) in enumerate(zip(("element", "row", "col"), limits)):
            if len(live) and (int(live[:, j].min()) < 0 or int(live[:, j].max()) >= limit):
                raise AlambicError(f"paired data: {key!r} has a {what} outside 0..{limit - 1}")

    def __len__(self) -> int:
        return len(self.raw)

    def shape(self, view: str) -> tuple[int, ...]:
        """One sample's shape in ``view`` (``input``: the student's modality)."""
        if view == INPUT:
            return tuple(self.raw.x.shape[1:])
        if view not in self.views:
            raise AlambicError(f"paired data has no view {view!r} (views: {[INPUT, *self.views]})")
        return tuple(self.views[view].shape[1:])


class PairedLoader:
    """A loader whose batches carry the paired views and extras of their samples beside their own.

    Wraps any loader with ``epoch(epoch, start=0)`` yielding :class:`Batch`; rows are looked up by
    ``batch.index``, which must index the :class:`PairedData` (the stable sample ids of a split built from its
    ``raw``). Other attributes (``split``, ``batch_size`` ...) are the wrapped loader's.
    """

    def __init__(self, loader: Any, paired: PairedData):
        self.loader, self.paired = loader, paired

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        loader = self.__dict__.get("loader")
        if loader is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(loader, name)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for batch in self.loader.epoch(epoch, start=start):
            yield attach(batch, self.paired)


def attach(batch: Batch, paired: PairedData) -> Batch:
    """``batch`` with the paired views and extras of its rows (``batch.index``) added."""
    rows = batch.index.to("cpu")
    if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(paired)):
        raise AlambicError(f"paired data: batch index {int(rows.max())} outside the {len(paired)} paired samples")
    clash = [k for k in paired.views if k in batch.views] + [k for k in paired.extras if k in batch.extras]
    if clash:
        raise AlambicError(f"paired data: the batch already has {clash[0]!r}; rename the paired view or extra")
    device = batch.index.device
    views = {k: v.index_select(0, rows).to(device) for k, v in paired.views.items()}
    extras = {k: v.index_select(0, rows).long().to(device) for k, v in paired.extras.items()}
    return Batch(views={**batch.views, **views}, index=batch.index, target=batch.target, labeled=batch.labeled,
                 extras={**batch.extras, **extras})


def read_pairs(batch: Batch, source: str, target: str) -> Tensor:
    """The batch's ``[B, M, 3]`` pairs of view ``source`` with view ``target`` (one line when absent)."""
    key = pair_key(source, target)
    if key not in batch.extras:
        have = [k for k in batch.extras if k.startswith(PAIR_PREFIX)]
        raise AlambicError(f"the batch has no pairing {key!r} (pairings: {have or 'none'}): the data must be paired "
                           f"(a dataset with paired modalities) and the method's views must name its modalities")
    return batch.extras[key]


def read_regions(batch: Batch, view: str) -> Tensor:
    """The batch's ``[B, H, W]`` region ids of image view ``view`` (one line when absent)."""
    key = region_key(view)
    if key not in batch.extras:
        have = [k for k in batch.extras if k.startswith(REGION_PREFIX)]
        raise AlambicError(f"the batch has no region map {key!r} (region maps: {have or 'none'})")
    return batch.extras[key]


def flatten_pairs(pairs: Tensor, elements_per_sample: int) -> tuple[Tensor, Tensor]:
    """A batch's pairs in the flat form of :func:`~alambic.losses.slidr_loss` and :func:`~alambic.losses.ppkt_loss`.

    Args:
        pairs: [B, M, 3] int rows ``(element, row, col)`` per sample, ``-1`` rows = padding.
        elements_per_sample: P, the source elements of one sample (points per cloud).
    Returns: ``(pairing_points [M'], pairing_images [M', 3])``: the row of the element in the batch's
        flattened ``[B · P, D]`` features (``b · P + element``) and ``(b, row, col)``; padding dropped.
    """
    if pairs.dim() != 3 or pairs.shape[2] != 3:
        raise ShapeMismatchError(f"flatten_pairs: pairs must be [B, M, 3], got {list(pairs.shape)}")
    pairs = pairs.long()
    b = torch.arange(pairs.shape[0], device=pairs.device)[:, None].expand(pairs.shape[:2])
    keep = pairs[..., 0] >= 0
    if keep.any() and int(pairs[..., 0][keep].max()) >= elements_per_sample:
        raise AlambicError(f"flatten_pairs: element {int(pairs[..., 0][keep].max())} >= {elements_per_sample} per sample")
    points = b[keep] * elements_per_sample + pairs[..., 0][keep]
    images = torch.stack([b[keep], pairs[..., 1][keep], pairs[..., 2][keep]], dim=1)
    return points, images


def paired_data(spec: Any) -> PairedData:
    """The :class:`PairedData` of a recipe's ``data`` section: its dataset's registered ``paired`` builder."""
    try:
        entry = DATASETS.get(spec.name)
    except KeyError as e:
        raise RecipeError(f"data.name: {e.args[0]}") from None
    builder = entry.extra.get("paired")
    if builder is None:
        with_pairs = [e.name for e in DATASETS if e.extra.get("paired") is not None]
        raise RecipeError(f"data.name: dataset '{spec.name}' has no paired modalities, which this method reads "
                          f"(paired datasets: {', '.join(with_pairs) or 'none'})")
    options = getattr(spec, "_options", None)
    if options is None:
        options = entry.config.model_validate(spec.raw_options())
    return builder(options)


# ------------------------------------------------------------------------------------ affine views
def random_affines(n: int, rotate: float, scale: tuple[float, float], shift: float,
                   generator: torch.Generator) -> Tensor:
    """``[n, 2, 3]`` float64 forward maps ``p' = M p + t`` of a square image's normalised coordinates.

    Coordinates are ``affine_grid``'s with ``align_corners=False`` (``x`` right, ``y`` down, the image spans
    ``[-1, 1]``, pixel ``j``'s centre at ``(2j + 1) / S − 1``). ``M = s · R(a)``: angle ``a ~ U(−rotate,
    rotate)`` degrees, isotropic scale ``s ~ U(scale)``, translation ``t ~ U(−shift, shift)²`` (in half-sides).
    Draws ``4 n`` numbers from ``generator`` (angles, scales, then the two shifts).
    """
    lo, hi = scale
    if not 0 < lo <= hi:
        raise AlambicError(f"random_affines: scale must satisfy 0 < lo <= hi, got {[lo, hi]}")
    u = torch.rand(4, n, generator=generator, dtype=torch.float64)
    a = torch.deg2rad((2 * u[0] - 1) * rotate)
    s = lo + (hi - lo) * u[1]
    out = torch.zeros(n, 2, 3, dtype=torch.float64)
    out[:, 0, 0], out[:, 0, 1] = s * torch.cos(a), -s * torch.sin(a)
    out[:, 1, 0], out[:, 1, 1] = s * torch.sin(a), s * torch.cos(a)
    out[:, :, 2] = (2 * u[2:] - 1).t() * shift
    return out


def _inverse(forward: Tensor) -> Tensor:
    """``[n, 2, 3]`` the inverse maps (``affine_grid``'s theta: output coordinates -> input coordinates)."""
    m_inv = torch.linalg.inv(forward[:, :, :2])
    return torch.cat([m_inv, -(m_inv @ forward[:, :, 2:])], dim=2)


def _square(images: Tensor, what: str) -> int:
    if images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ShapeMismatchError(f"{what}: wants square images [N, C, S, S], got {list(images.shape)}")
    return images.shape[-1]


def warp_images(images: Tensor, forward: Tensor, mode: str = "bilinear") -> Tensor:
    """Each image ``[N, C, S, S]`` moved by its forward map ``[N, 2, 3]`` (:func:`random_affines`).

    Output pixel ``q`` takes the input's value at ``M⁻¹(q − t)``, interpolated (``grid_sample``, bilinear by
    default, ``align_corners=False``); where that falls outside the input, the edge is repeated (the
    background of a glyph). A resampling of the raster, not a fresh rendering: at 16x16 a turned glyph is a
    little blurred.
    """
    _square(images, "warp_images")
    if forward.shape != (images.shape[0], 2, 3):
        raise ShapeMismatchError(f"warp_images: forward must be [N, 2, 3] with N = {images.shape[0]}, got "
                                 f"{list(forward.shape)}")
    grid = F.affine_grid(_inverse(forward).to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


def move_pairs(pairs: Tensor, forward: Tensor, size: int) -> Tensor:
    """The pairs ``[N, M, 3]`` ``(element, row, col)`` of an ``S x S`` image, moved by its forward maps.

    Each pixel's centre is mapped (``p' = M p + t``) and the pair goes to the pixel that contains it: the
    pixel of the warped image (:func:`warp_images`) whose value was interpolated around the old pixel's
    centre. A pair that leaves the image becomes a ``-1`` row (padding); padding stays padding.
    """
    if pairs.dim() != 3 or pairs.shape[2] != 3 or forward.shape != (pairs.shape[0], 2, 3):
        raise ShapeMismatchError(f"move_pairs: pairs [N, M, 3] and forward [N, 2, 3] must share N, got "
                                 f"{list(pairs.shape)} and {list(forward.shape)}")
    live = pairs[..., 0] >= 0
    rc = pairs[..., 1:].to(torch.float64)
    xy = torch.stack([rc[..., 1], rc[..., 0]], dim=-1) * (2 / size) + (1 / size - 1)  # pixel centres
    moved = xy @ forward[:, :, :2].transpose(1, 2) + forward[:, None, :, 2]
    col_row = torch.floor((moved + 1) * (size / 2)).long()
    inside = live & ((col_row >= 0) & (col_row < size)).all(-1)
    out = torch.stack([pairs[..., 0].long(), col_row[..., 1], col_row[..., 0]], dim=-1)
    return torch.where(inside[..., None], out, torch.full_like(out, -1)).to(pairs.dtype)


def move_regions(regions: Tensor, forward: Tensor) -> Tensor:
    """A region map ``[N, S, S]`` moved like its image (nearest region; ``-1`` where the map leaves the image)."""
    n, s = regions.shape[0], regions.shape[-1]
    grid = F.affine_grid(_inverse(forward).float(), [n, 1, s, s], align_corners=False)
    shifted = (regions.float() + 1)[:, None]  # 0 = outside: ``zeros`` padding marks it
    out = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)[:, 0]
    return (out.round().long() - 1).to(regions.dtype)


def with_affine_views(paired: PairedData, target: str, count: int, rotate: float = 30.0,
                      scale: tuple[float, float] = (0.8, 1.0), shift: float = 0.1, seed: int = 0) -> PairedData:
    """``paired`` plus ``count`` views ``<target>_1 .. <target>_<count>``: image view ``target`` under a fixed
    random affine map per sample and view (:func:`random_affines`, drawn from ``seed``: the same views every
    epoch and run, like the fixed cameras of a scene), with every pairing into ``target``
    (``pair:<source>-><target>``) moved by the same map (:func:`move_pairs`) and its region map too.

    The other modalities are untouched: a point cloud keeps its canonical coordinates and only its pixels move,
    so one feature per point has to agree with every view. For a 2D image this is 2D -> 2D: the views are
    rotations, scalings and shifts in the image plane, not new viewpoints on a 3D object.
    """
    what = "with_affine_views"
    if target not in paired.views:
        raise AlambicError(f"{what}: no image view {target!r} (views: {sorted(paired.views)})")
    images = paired.views[target]
    size = _square(images, f"{what}: view {target!r}")
    if count < 1:
        raise AlambicError(f"{what}: count must be >= 1, got {count}")
    if not 0 <= rotate <= 180 or shift < 0 or math.isnan(shift):
        raise AlambicError(f"{what}: rotate must be in [0, 180] and shift >= 0, got {rotate}, {shift}")
    g = torch.Generator().manual_seed(int(seed))
    views, extras = dict(paired.views), dict(paired.extras)
    sources = [k for k in paired.extras if k.startswith(PAIR_PREFIX) and _parse_pair_key(k)[1] == target]
    for v in range(1, count + 1):
        name = f"{target}_{v}"
        if name in views:
            raise AlambicError(f"{what}: the data already has a view {name!r}")
        forward = random_affines(len(paired), rotate, scale, shift, g)
        views[name] = warp_images(images.float(), forward).to(images.dtype)
        for key in sources:
            extras[pair_key(_parse_pair_key(key)[0], name)] = move_pairs(paired.extras[key], forward, size)
        if region_key(target) in paired.extras:
            extras[region_key(name)] = move_regions(paired.extras[region_key(target)], forward)
    return replace(paired, views=views, extras=extras)
