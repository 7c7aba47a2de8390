"""``glyph_outlines``: the glyph images paired with point clouds sampled on each glyph's outline.

A cross-modal test bed that needs no download, built from the fonts installed on the machine (the same
fonts, images and held-out-font split as :mod:`alambic.data.glyphs`). For every glyph:

- ``input`` (the student's modality, ``RawData.x``): ``[P, 2]`` points sampled at equal arc-length steps on
  the glyph's outline (every contour, holes included), read from the font file with fontTools, as ``(x, y)``
  in the image's own frame scaled to ``[-1, 1]`` (``x`` to the right, ``y`` down the rows);
- ``image``: the glyph image the ``glyphs`` dataset renders (``[1, S, S]`` in ``[0, 1]``, ink = 1), on which an
  image teacher is trained;
- ``pair:input->image``: ``[P, 3]`` rows ``(point, row, col)``: the pixel that contains each point, or a ``-1``
  row for a point outside the image (none with the renderer's margin, but the pairing never assumes it);
- ``regions:image``: ``[S, S]`` superpixel ids of the image: SLIC (Achanta et al., "SLIC Superpixels Compared
  to State-of-the-Art Superpixel Methods", TPAMI 2012; ``skimage.segmentation.slic``, as SLidR computes its
  superpixels) or, without scikit-image, ``grid``: square cells, each split into its ink and background
  pixels (deterministic, no dependency);
- the label: the character;
- with ``views: K``, the images ``image_1 .. image_K``: the glyph image under a fixed random rotation, scale
  and shift each (:func:`~alambic.data.paired.with_affine_views`), with ``pair:input->image_k`` and
  ``regions:image_k`` moved by the same map; the points stay canonical (what 2D-to-3D lifting needs, in 2D).

The pairing is exact, not estimated: the renderer draws each character with Pillow at the pen origin of
:func:`~alambic.data.glyphs.glyph_layout`, and Pillow snaps that origin to whole pixels, so the origin it
actually used is found by drawing the character again at the integer origins around it and keeping the
one that reproduces the rendered image bit for bit; the outline (font units, y up) is then placed with
that origin and the font's render scale (``size / unitsPerEm`` pixels per unit). What remains is FreeType's
hinting, a fraction of a pixel. A glyph whose origin cannot be reproduced (another renderer than the one
that made the images) or whose outline is missing drops its font, with a note.

Built once and cached as ``<cache>/glyph_outlines/<key>.npz``, keyed by the glyph set's own key, the outline
settings and the fontTools / scikit-image versions. Needs fontTools (a dependency of matplotlib, so always
present) and, for ``superpixels: slic``, scikit-image: ``pip install 'alambic[crossmodal]'``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from alambic.cache_dir import cache_dir, make_dirs
from alambic.data.batch import INPUT
from alambic.data.glyphs import (
    GlyphsConfig,
    GlyphSet,
    build_glyphs,
    design_groups,
    glyph_layout,
)
from alambic.data.paired import PairedData, pair_key, region_key, with_affine_views
from alambic.data.sources import RawData, fingerprint
from alambic.errors import AlambicError
from alambic.registry import DATASETS

OUTLINE_VERSION = 1  # bump when the points, pairs or superpixels change: every cache is rebuilt
IMAGE = "image"
_CURVE_STEPS = 16  # straight pieces per Bézier segment when measuring arc length (error << a pixel)
EXTRA_LINE = "pip install 'alambic[crossmodal]'"


class GlyphOutlinesConfig(GlyphsConfig):
    """The ``glyphs`` options (same fonts, images and split) plus how points and superpixels are made."""

    points: int = Field(128, ge=4, le=4096, description="points sampled on each glyph's outline")
    superpixels: Literal["slic", "grid"] = Field(
        "slic", description="slic: scikit-image SLIC on the image (the extra crossmodal); grid: square cells, "
                            "each split into ink and background")
    segments: int = Field(32, ge=2, le=1024, description="slic: n_segments asked for (it returns about as many)")
    compactness: float = Field(0.3, gt=0, description="slic: colour vs space trade-off (images in [0, 1]; "
                                                      "0.1 follows the strokes, 0.3 cuts them into parts)")
    grid: int = Field(4, ge=1, le=64, description="grid: cells per side")
    inset: float = Field(0.25, ge=0, le=1, description="a point is paired with the pixel this far (in pixels) "
                                                      "inside the ink from it: the ink it bounds")
    views: int = Field(0, ge=0, le=16, description="extra image views image_1.. of each glyph: the image under a "
                                                   "fixed random affine map, its pairs moved alike (2D-to-3D "
                                                   "lifting's views, here 2D -> 2D)")
    view_rotate: float = Field(30.0, ge=0, le=180, description="views: max degrees of rotation, uniform in [-r, r]")
    view_scale: tuple[float, float] = Field((0.8, 1.0), description="views: isotropic scale range (0 < lo <= hi)")
    view_shift: float = Field(0.1, ge=0, le=1, description="views: max shift per axis, in half-sides of the image")
    view_seed: int = Field(0, ge=0, description="views: the seed of the maps (fixed across epochs and runs)")

    @model_validator(mode="after")
    def _fonts_needed(self) -> GlyphOutlinesConfig:
        if self.cache_file is not None:
            raise ValueError("cache_file is not supported: the outlines are read from the font files themselves")
        if not 0 < self.view_scale[0] <= self.view_scale[1]:
            raise ValueError(f"view_scale must satisfy 0 < lo <= hi, got {list(self.view_scale)}")
        return self

    def glyphs(self) -> GlyphsConfig:
        return GlyphsConfig(**self.model_dump(include=set(GlyphsConfig.model_fields)))


@dataclass(frozen=True)
class OutlineSet:
    """``points`` float32 ``[F, K, P, 2]`` (x, y) in pixels of the image; ``pixels`` int16 ``[F, K, P, 2]`` (row,
    col) or -1; ``superpixels`` int16 ``[F, K, S, S]``; ``fonts`` the kept rows of the glyph set."""

    glyphs: GlyphSet
    fonts: np.ndarray
    points: np.ndarray
    pixels: np.ndarray
    superpixels: np.ndarray
    key: str


# ------------------------------------------------------------------------------------------- outlines
def _outline_pen(glyph_set):
    """A fontTools pen that records each contour as a polyline (curves cut in :data:`_CURVE_STEPS`)."""
    from fontTools.pens.basePen import BasePen

    class _Polylines(BasePen):
        def __init__(self):
            super().__init__(glyph_set)
            self.contours: list[list[tuple[float, float]]] = []

        def _moveTo(self, p):
            self.contours.append([tuple(p)])

        def _lineTo(self, p):
            self.contours[-1].append(tuple(p))

        def _curve(self, ctrl: list, degree: int) -> None:
            pts = np.array([self.contours[-1][-1], *ctrl], dtype=np.float64)
            t = np.linspace(0.0, 1.0, _CURVE_STEPS + 1)[1:, None]
            coef = [math.comb(degree, i) * (1 - t) ** (degree - i) * t**i for i in range(degree + 1)]
            self.contours[-1].extend(map(tuple, sum(c * p for c, p in zip(coef, pts))))

        def _curveToOne(self, p1, p2, p3):
            self._curve([p1, p2, p3], 3)

        def _qCurveToOne(self, p1, p2):
            self._curve([p1, p2], 2)

        def _closePath(self):
            if self.contours and self.contours[-1][0] != self.contours[-1][-1]:
                self.contours[-1].append(self.contours[-1][0])

    return _Polylines()


def outline_polylines(glyph_set, name: str) -> list[np.ndarray]:
    """The contours of glyph ``name`` as closed polylines ``[n, 2]`` in font units (components decomposed)."""
    pen = _outline_pen(glyph_set)
    glyph_set[name].draw(pen)
    return [np.asarray(c, dtype=np.float64) for c in pen.contours if len(c) > 1]


def sample_outline(contours: list[np.ndarray], count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(points [count, 2], tangents [count, 2])`` at equal arc-length steps over all contours: the midpoints
    ``(i + ½) · L / count`` of the total length L, contour after contour in the font's order, and the unit
    direction of the outline there. Deterministic (no random draw)."""
    seg_a = np.concatenate([c[:-1] for c in contours])
    seg_b = np.concatenate([c[1:] for c in contours])
    lengths = np.linalg.norm(seg_b - seg_a, axis=1)
    total = lengths.sum()
    if not total > 0:
        raise ValueError("the outline has no length")
    ends = np.cumsum(lengths)
    at = (np.arange(count) + 0.5) * total / count
    seg = np.minimum(np.searchsorted(ends, at, side="right"), len(lengths) - 1)
    seg = np.where(lengths[seg] > 0, seg, np.flatnonzero(lengths > 0)[-1])  # only at == total: the last piece
    frac = (at - (ends[seg] - lengths[seg])) / lengths[seg]
    return seg_a[seg] + frac[:, None] * (seg_b[seg] - seg_a[seg]), (seg_b[seg] - seg_a[seg]) / lengths[seg, None]


def winding(points: np.ndarray, contours: list[np.ndarray]) -> np.ndarray:
    """int ``[Q]`` winding numbers of the closed polylines around ``points [Q, 2]``: a point is inside the glyph
    where it is not 0 (the non-zero rule of TrueType and CFF outlines), whatever the contours' orientation."""
    a = np.concatenate([c[:-1] for c in contours])[None]  # [1, E, 2]
    b = np.concatenate([c[1:] for c in contours])[None]
    p = points[:, None]  # [Q, 1, 2]
    cross = (b[..., 0] - a[..., 0]) * (p[..., 1] - a[..., 1]) - (p[..., 0] - a[..., 0]) * (b[..., 1] - a[..., 1])
    up = (a[..., 1] <= p[..., 1]) & (b[..., 1] > p[..., 1]) & (cross > 0)
    down = (b[..., 1] <= p[..., 1]) & (a[..., 1] > p[..., 1]) & (cross < 0)
    return up.sum(1) - down.sum(1)


def inward_normals(points: np.ndarray, tangents: np.ndarray, contours: list[np.ndarray], step: float) -> np.ndarray:
    """``[Q, 2]`` unit normals of the outline at ``points`` pointing into the ink: the side where a step of
    ``step`` (font units) lands inside; zero where neither side does (a hairline thinner than the step)."""
    left = np.stack([-tangents[:, 1], tangents[:, 0]], axis=1)
    in_left = winding(points + step * left, contours) != 0
    in_right = winding(points - step * left, contours) != 0
    return np.where((in_left & ~in_right)[:, None], left, np.where((in_right & ~in_left)[:, None], -left, 0.0))


def drawn_origin(font, char: str, origin: np.ndarray, image: np.ndarray) -> tuple[int, int] | None:
    """The whole-pixel pen origin at which Pillow drew ``char`` into ``image`` when asked for ``origin``.

    Pillow draws text at whole-pixel positions: drawing again at each integer origin next to the requested
    one, the origin whose drawing equals ``image`` exactly is the one used; None if none does.
    """
    from PIL import Image, ImageDraw

    size = image.shape[-1]
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    for ox in sorted({math.floor(origin[0]), math.ceil(origin[0])}):
        for oy in sorted({math.floor(origin[1]), math.ceil(origin[1])}):
            canvas.paste(0, (0, 0, size, size))
            draw.text((ox, oy), char, 255, font, anchor="ls")
            if np.array_equal(np.asarray(canvas), image):
                return ox, oy
    return None


def font_outlines(path: str, chars: str, images: np.ndarray, count: int,
                  inset: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """``(points [K, P, 2] float (x, y) pixels, pixels [K, P, 2] int (row, col) or -1)`` of one rendered font.

    ``images`` uint8 ``[K, S, S]`` are this font's rendered glyphs. A point is paired with the pixel that holds
    the point moved ``inset`` pixels into the ink (along the outline's inward normal): a point lies *on* the
    boundary of the ink, often exactly on a pixel edge (hinting aligns stems and the baseline to the grid), and
    the pixel it bounds the ink of is the one it belongs to. Raises ValueError (the reason) when a character
    has no outline or its drawn origin cannot be reproduced.
    """
    from fontTools.ttLib import TTFont

    size = images.shape[-1]
    font, origins = glyph_layout(path, chars, size)
    with _quiet_fonttools(), TTFont(path, fontNumber=0, lazy=True) as tt:
        scale = font.size / tt["head"].unitsPerEm
        cmap, glyph_set = tt.getBestCmap() or {}, tt.getGlyphSet()
        points = np.zeros((len(chars), count, 2), dtype=np.float64)
        paired_at = np.zeros_like(points)
        for k, ch in enumerate(chars):
            if ord(ch) not in cmap:
                raise ValueError(f"no outline for {ch!r} in its cmap")
            o = drawn_origin(font, ch, origins[k], images[k])
            if o is None:
                raise ValueError(f"{ch!r}: no whole-pixel origin reproduces the rendered image (another renderer?)")
            contours = outline_polylines(glyph_set, cmap[ord(ch)])
            if not contours:
                raise ValueError(f"{ch!r} has an empty outline")
            xy, tangent = sample_outline(contours, count)
            inward = inward_normals(xy, tangent, contours, step=0.01 / scale)  # a hundredth of a pixel
            for out, at in ((points, xy), (paired_at, xy + inward * (inset / scale))):
                out[k, :, 0] = o[0] + at[:, 0] * scale
                out[k, :, 1] = o[1] - at[:, 1] * scale  # font units point up, image rows down
    rc = np.floor(paired_at[..., ::-1]).astype(np.int64)  # (row, col) of the pixel
    inside = ((rc >= 0) & (rc < size)).all(-1)
    return points, np.where(inside[..., None], rc, -1)


@contextlib.contextmanager
def _quiet_fonttools():
    """fontTools' warnings about harmless table oddities ("'created' timestamp seems very low") off while reading."""
    log = logging.getLogger("fontTools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ---------------------------------------------------------------------------------------- superpixels
def superpixels(images: np.ndarray, cfg: GlyphOutlinesConfig) -> np.ndarray:
    """int16 ``[K, S, S]`` region ids (from 0) of uint8 images ``[K, S, S]``, per ``cfg.superpixels``."""
    k, s, _ = images.shape
    if cfg.superpixels == "grid":
        cell = -(-s // cfg.grid)
        r = np.arange(s) // cell
        cells = r[:, None] * cfg.grid + r[None, :]
        return (cells[None] * 2 + (images >= 128)).astype(np.int16)
    slic = _slic()
    out = np.empty((k, s, s), dtype=np.int16)
    for i in range(k):
        out[i] = slic(images[i] / 255.0, n_segments=cfg.segments, compactness=cfg.compactness, channel_axis=None,
                      start_label=0, enforce_connectivity=True)
    return out


def _slic():
    try:
        from skimage.segmentation import slic
    except ImportError:
        raise AlambicError(f"glyph_outlines: superpixels: slic needs scikit-image ({EXTRA_LINE}); or set "
                           "superpixels: grid") from None
    return slic


# -------------------------------------------------------------------------------------- build + cache
def outline_key(glyphs: GlyphSet, cfg: GlyphOutlinesConfig) -> str:
    """sha256 (24 hex digits) of the glyph set's key, the outline settings and the library versions."""
    import fontTools

    settings = cfg.model_dump(include={"points", "superpixels", "segments", "compactness", "grid", "inset"})
    settings.update(glyphs=glyphs.key, version=OUTLINE_VERSION, fonttools=fontTools.version)
    if cfg.superpixels == "slic":
        import skimage

        settings["skimage"] = skimage.__version__
    else:
        settings.pop("segments"), settings.pop("compactness")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def build_outlines(cfg: GlyphOutlinesConfig, *, progress: bool | None = None) -> OutlineSet:
    """The outline set of ``cfg``, from the cache when its key matches, else built and cached."""
    if cfg.superpixels == "slic":
        _slic()  # the one-line error before any work
    glyphs = build_glyphs(cfg.glyphs())
    key = outline_key(glyphs, cfg)
    path = cache_dir("glyph_outlines") / f"{key}.npz"
    cached = _read(path, glyphs, key)
    if cached is not None:
        return cached
    fonts, points, pixels, regions, dropped = [], [], [], [], []
    for f in _progress(range(len(glyphs.paths)), progress):
        try:
            p, q = font_outlines(glyphs.paths[f], glyphs.chars, glyphs.images[f], cfg.points, cfg.inset)
        except Exception as e:  # fontTools cannot read it, a character without outline, another renderer
            dropped.append(f"{Path(glyphs.paths[f]).name} ({type(e).__name__}: {e})")
            continue
        fonts.append(f)
        points.append(p.astype(np.float32))
        pixels.append(q.astype(np.int16))
        regions.append(superpixels(glyphs.images[f], cfg))
    if dropped:
        print(f"note: glyph_outlines dropped {len(dropped)} of {len(glyphs.paths)} fonts: {'; '.join(dropped[:3])}"
              + (" ..." if len(dropped) > 3 else ""), file=sys.stderr)
    if not fonts:
        raise AlambicError("glyph_outlines: no font gave outlines for every character (fontTools could not read "
                           "them, or the images came from another renderer)")
    out = OutlineSet(glyphs, np.asarray(fonts, dtype=np.int64), np.stack(points), np.stack(pixels),
                     np.stack(regions), key)
    _write(path, out)
    return out


def _progress(items, show: bool | None):
    from rich.console import Console
    from rich.progress import track

    if show is None:
        show = sys.stderr.isatty() and len(items) > 50
    return track(items, description="glyph outlines", console=Console(stderr=True), transient=True, disable=not show)


def _read(path: Path, glyphs: GlyphSet, key: str) -> OutlineSet | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            return OutlineSet(glyphs, f["fonts"], f["points"], f["pixels"], f["superpixels"], key)
    except Exception:  # truncated or foreign file: build again and overwrite it
        return None


def _write(path: Path, o: OutlineSet) -> None:
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez_compressed(out, fonts=o.fonts, points=o.points, pixels=o.pixels, superpixels=o.superpixels,
                                key=np.array(o.key))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------- dataset + pairs
def paired_glyph_outlines(cfg: GlyphOutlinesConfig) -> PairedData:
    """The paired dataset: ``raw`` (points, labels, font-design groups) + the image view, pairs and regions.

    Rows are font-major like ``glyphs`` (kept font ``f``, class ``k`` is row ``f · K + k``)."""
    return _paired(cfg.model_dump_json(), str(cache_dir("glyph_outlines")))


@functools.lru_cache(maxsize=2)  # the run builds the data twice (the plain split, then the pairs): once here
def _paired(cfg_json: str, cache: str) -> PairedData:
    cfg = GlyphOutlinesConfig.model_validate_json(cfg_json)
    o = build_outlines(cfg)
    g, size = o.glyphs, cfg.size
    n_fonts, k, p = o.points.shape[:3]
    x = torch.from_numpy(o.points.reshape(-1, p, 2) * (2.0 / size) - 1.0).float()
    y = torch.arange(k, dtype=torch.int64).repeat(n_fonts)
    families = [g.families[i] for i in o.fonts]
    units = design_groups(families) if cfg.group_by == "design" else families
    names = sorted(set(units))
    groups = torch.tensor([names.index(u) for u in units], dtype=torch.int64).repeat_interleave(k)
    images = torch.from_numpy(g.images[o.fonts]).reshape(-1, 1, size, size).float().div_(255.0)
    rc = torch.from_numpy(o.pixels.reshape(-1, p, 2))
    element = torch.arange(p, dtype=torch.int16).expand(len(rc), p)
    pairs = torch.cat([element[..., None], rc], dim=2)
    pairs[rc[..., 0] < 0] = -1
    regions = torch.from_numpy(o.superpixels.reshape(-1, size, size))
    fp = fingerprint(o.points, o.pixels, o.superpixels, g.images[o.fonts], np.array(families),
                     source="glyph_outlines", key=o.key)
    raw = RawData(x, y, list(g.chars), fp, groups=groups)
    paired = PairedData(raw, {IMAGE: images}, {pair_key(INPUT, IMAGE): pairs, region_key(IMAGE): regions})
    if cfg.views:  # the same glyph seen through fixed affine maps: its points stay, their pixels move
        paired = with_affine_views(paired, IMAGE, cfg.views, cfg.view_rotate, cfg.view_scale, cfg.view_shift,
                                   cfg.view_seed)
    return paired


@DATASETS.register("glyph_outlines", config=GlyphOutlinesConfig, paired=paired_glyph_outlines,
                   description="glyph outline point clouds paired with the glyph images (fontTools, held-out fonts)")
def load_glyph_outlines(options: GlyphOutlinesConfig | None = None) -> RawData:
    """The outline point clouds as :class:`RawData` ``x [N, P, 2]`` (the student's modality), with the font
    groups of the held-out-font split; the images and pairings come with :func:`paired_glyph_outlines`."""
    return paired_glyph_outlines(options or GlyphOutlinesConfig()).raw
