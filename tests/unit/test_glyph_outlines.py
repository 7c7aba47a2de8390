"""``glyph_outlines``: outline points in the rendered image's frame, their pixels on the glyph's ink, the build is
deterministic, the held-out-font split is the glyphs' one, and the superpixels.

Hermetic like ``test_glyphs``: fonts copied from the Debian packages ``.ci/run`` installs into a temporary
folder passed as ``font_dirs``; the cache lives in ``tmp_path``.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from alambic.data import build_data
from alambic.data import glyph_outlines as O
from alambic.data import glyphs as G
from alambic.data.batch import INPUT
from alambic.data.paired import pair_key, paired_data, region_key
from alambic.errors import AlambicError
from alambic.recipe.schema import DataSpec

# 3 designs (DejaVu, Liberation, FreeFont = URW), regular and bold, a serif and a mono
FONT_FILES = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "LiberationSans-Regular.ttf",
              "LiberationSerif-Regular.ttf", "LiberationMono-Regular.ttf", "FreeSans.ttf", "FreeSerif.ttf",
              "FreeMono.ttf"]
SIZE = 16


@pytest.fixture(scope="module")
def font_dir(tmp_path_factory) -> Path:
    by_name = {}
    for f in G.font_files():
        by_name.setdefault(f.name, f)
    missing = sorted(set(FONT_FILES) - set(by_name))
    if missing:
        pytest.skip(f"fonts not installed ({', '.join(missing)}); run: {G.INSTALL_LINE}")
    root = tmp_path_factory.mktemp("fonts")
    for name in FONT_FILES:
        shutil.copy2(by_name[name], root / name)
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("outline_cache")


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch, cache):
    monkeypatch.setenv("ALAMBIC_CACHE", str(cache))


def cfg(font_dir: Path, **kw) -> O.GlyphOutlinesConfig:
    return O.GlyphOutlinesConfig(**{"size": SIZE, "classes": "all", "font_dirs": [str(font_dir)], "points": 64,
                                    "superpixels": "grid", **kw})


@pytest.fixture(scope="module")
def outlines(font_dir, tmp_path_factory) -> O.OutlineSet:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALAMBIC_CACHE", str(tmp_path_factory.mktemp("outline_cache_main")))
        return O.build_outlines(cfg(font_dir))


def _ink_at(o: O.OutlineSet) -> np.ndarray:
    """[F, K, P] the rendered ink (0-255) at each point's paired pixel."""
    img = o.glyphs.images[o.fonts]
    f, k = o.pixels.shape[:2]
    return img[np.arange(f)[:, None, None], np.arange(k)[None, :, None], o.pixels[..., 0], o.pixels[..., 1]]


def test_every_font_keeps_its_outline_and_every_point_is_paired(outlines):
    assert outlines.points.shape == (len(FONT_FILES), 62, 64, 2)
    assert list(outlines.fonts) == list(range(len(FONT_FILES)))
    assert (outlines.pixels >= 0).all()  # the renderer's margin keeps every outline inside the image


def test_each_point_is_paired_with_the_pixel_that_holds_it_up_to_the_inset(outlines):
    """The pixel (row, col) holds the point moved at most ``inset`` pixels: the frame of the points is the image's."""
    x, y = outlines.points[..., 0], outlines.points[..., 1]
    row, col = outlines.pixels[..., 0], outlines.pixels[..., 1]
    inset = O.GlyphOutlinesConfig().inset
    tol = inset + 1e-4
    assert ((row - tol <= y) & (y <= row + 1 + tol)).all()
    assert ((col - tol <= x) & (x <= col + 1 + tol)).all()


def test_the_paired_pixels_lie_on_the_glyphs_ink(outlines):
    """Exact up to the renderer's hinting (a fraction of a pixel): nearly every pixel holds ink, all but a few
    hundredths of a percent touch it."""
    ink = _ink_at(outlines)
    assert (ink > 0).mean() > 0.95
    img = outlines.glyphs.images[outlines.fonts] > 0
    near = np.zeros_like(img)
    padded = np.pad(img, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for dr in range(3):
        for dc in range(3):
            near |= padded[..., dr:dr + SIZE, dc:dc + SIZE]
    f, k, _ = ink.shape
    touching = near[np.arange(f)[:, None, None], np.arange(k)[None, :, None], outlines.pixels[..., 0],
                    outlines.pixels[..., 1]]
    assert touching.mean() > 0.999


def test_a_shifted_outline_would_not_pair_with_the_ink(outlines):
    """The check above has teeth: the same points two pixels to the right miss the ink far more often."""
    moved = outlines.pixels.copy()
    moved[..., 1] = np.clip(moved[..., 1] + 2, 0, SIZE - 1)
    shifted = O.OutlineSet(outlines.glyphs, outlines.fonts, outlines.points, moved, outlines.superpixels, "x")
    assert (_ink_at(shifted) > 0).mean() < 0.8 < (_ink_at(outlines) > 0).mean()


def test_the_drawn_origin_reproduces_the_rendered_image(font_dir):
    g = G.build_glyphs(cfg(font_dir).glyphs())
    font, origins = G.glyph_layout(g.paths[0], g.chars, SIZE)
    for k in (0, 10, 40):
        o = O.drawn_origin(font, g.chars[k], origins[k], g.images[0, k])
        assert o is not None and all(abs(a - b) < 1 for a, b in zip(o, origins[k]))
    assert O.drawn_origin(font, g.chars[0], origins[0], g.images[0, 1]) is None  # another glyph's image


def test_the_build_is_deterministic_and_cached(font_dir, outlines, tmp_path, monkeypatch):
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "fresh"))  # a separate build, from scratch
    again = O.build_outlines(cfg(font_dir))
    for name in ("points", "pixels", "superpixels", "fonts"):
        assert np.array_equal(getattr(again, name), getattr(outlines, name)), name
    assert again.key == outlines.key
    cached = O.build_outlines(cfg(font_dir))  # read back from the cache file
    assert np.array_equal(cached.points, again.points) and list((tmp_path / "fresh" / "glyph_outlines").glob("*.npz"))
    assert O.outline_key(again.glyphs, cfg(font_dir, points=32)) != again.key


def test_the_dataset_reuses_the_glyphs_held_out_font_split(font_dir):
    opts = {"size": SIZE, "classes": "digits", "font_dirs": [str(font_dir)]}
    outl = build_data(DataSpec(name="glyph_outlines", points=32, superpixels="grid", **opts))
    imgs = build_data(DataSpec(name="glyphs", **opts))
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(outl, split).index, getattr(imgs, split).index)
        assert torch.equal(getattr(outl, split).y, getattr(imgs, split).y)
    assert outl.input_shape == (32, 2) and outl.num_classes == 10
    assert float(outl.train.x.abs().max()) <= 1.0  # the image frame scaled to [-1, 1]


def test_the_paired_views_hold_the_images_pairs_and_regions(font_dir):
    spec = DataSpec(name="glyph_outlines", size=SIZE, classes="digits", font_dirs=[str(font_dir)], points=32,
                    superpixels="grid")
    paired = paired_data(spec)
    g = G.build_glyphs(G.GlyphsConfig(size=SIZE, classes="digits", font_dirs=[str(font_dir)]))
    assert torch.equal(paired.views["image"], torch.from_numpy(g.images).reshape(-1, 1, SIZE, SIZE).float() / 255)
    pairs = paired.extras[pair_key(INPUT, "image")]
    assert pairs.shape == (len(paired), 32, 3) and torch.equal(pairs[:, :, 0].long(), torch.arange(32).expand(len(paired), 32))
    pixel = ((paired.raw.x + 1) * SIZE / 2).floor().long().clamp(0, SIZE - 1).flip(-1)  # (row, col) of each point
    assert (pixel - pairs[..., 1:].long()).abs().max() <= 1  # the inset moves a point into a neighbour at most
    assert paired.extras[region_key("image")].shape == (len(paired), SIZE, SIZE)


def test_grid_superpixels_are_cells_split_into_ink_and_background():
    images = np.zeros((1, 8, 8), dtype=np.uint8)
    images[0, 2:6, 3] = 200
    sp = O.superpixels(images, O.GlyphOutlinesConfig(superpixels="grid", grid=2))
    assert sp[0, 0, 0] == 0 and sp[0, 0, 7] == 2 and sp[0, 7, 0] == 4 and sp[0, 7, 7] == 6
    assert sp[0, 2, 3] == 1 and sp[0, 5, 3] == 5  # ink pixels in cells 0 and 2
    assert len(np.unique(sp)) == 6


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image (the crossmodal extra)")
def test_slic_superpixels_tile_the_image_and_follow_the_ink(outlines):
    img = outlines.glyphs.images[0, :6]
    sp = O.superpixels(img, O.GlyphOutlinesConfig(superpixels="slic", segments=16, compactness=0.1))
    assert sp.shape == img.shape and sp.min() == 0
    for i in range(len(img)):
        ids = np.unique(sp[i])
        assert np.array_equal(ids, np.arange(len(ids))) and 4 <= len(ids) <= 40
        ink = img[i] >= 128
        purity = [max(ink[sp[i] == s].mean(), 1 - ink[sp[i] == s].mean()) for s in ids]
        assert np.mean(purity) > 0.8  # regions mostly all ink or all background


def test_slic_without_scikit_image_is_one_line(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "skimage.segmentation", None)
    with pytest.raises(AlambicError, match=r"scikit-image \(pip install 'alambic\[crossmodal\]'\)"):
        O._slic()


def test_a_carried_image_cache_is_refused():
    with pytest.raises(ValueError, match="outlines are read from the font files"):
        O.GlyphOutlinesConfig(cache_file="x.npz")


def test_sample_outline_walks_equal_arc_lengths():
    square = [np.array([[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]], dtype=float)]
    pts, tangents = O.sample_outline(square, 8)
    assert np.allclose(pts, [[1, 0], [3, 0], [4, 1], [4, 3], [3, 4], [1, 4], [0, 3], [0, 1]])
    assert np.allclose(tangents[0], [1, 0]) and np.allclose(tangents[2], [0, 1])
    inward = O.inward_normals(pts, tangents, square, step=0.01)
    assert np.allclose(inward[0], [0, 1]) and np.allclose(inward[2], [-1, 0])  # into the square
    hole = [square[0], np.array([[1, 1], [1, 3], [3, 3], [3, 1], [1, 1]], dtype=float)]  # opposite winding
    assert O.winding(np.array([[2.0, 2.0], [0.5, 2.0]]), hole).tolist() == [0, 1]
