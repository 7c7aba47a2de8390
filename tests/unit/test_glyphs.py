"""The ``glyphs`` dataset: rendering on a common baseline, font filtering, the on-disk cache and the split
that holds out whole font families.

Hermetic: the fonts are copied from the Debian packages that ``.ci/run`` installs into a temporary folder
passed as ``font_dirs``, so other fonts on the machine change nothing; the cache lives in ``tmp_path``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from alambic.data import IGNORE_INDEX, RawData, build_data, group_split
from alambic.data import glyphs as G
from alambic.errors import AlambicError
from alambic.recipe.schema import DataSpec
from alambic.registry import DATASETS

# 12 faces, 9 families, 3 designs (DejaVu, Liberation, FreeFont = URW): fonts-dejavu-core fonts-liberation
# fonts-freefont-ttf
FONT_FILES = {
    "DejaVuSans.ttf": "DejaVu Sans", "DejaVuSans-Bold.ttf": "DejaVu Sans", "DejaVuSerif.ttf": "DejaVu Serif",
    "DejaVuSansMono.ttf": "DejaVu Sans Mono",
    "LiberationSans-Regular.ttf": "Liberation Sans", "LiberationSans-Bold.ttf": "Liberation Sans",
    "LiberationSerif-Regular.ttf": "Liberation Serif", "LiberationMono-Regular.ttf": "Liberation Mono",
    "FreeSans.ttf": "FreeSans", "FreeSansBold.ttf": "FreeSans", "FreeSerif.ttf": "FreeSerif",
    "FreeMono.ttf": "FreeMono",
}
ALL = G.CHARSETS["all"]


@pytest.fixture(scope="module")
def installed() -> dict[str, Path]:
    by_name: dict[str, Path] = {}
    for f in G.font_files():
        by_name.setdefault(f.name, f)
    missing = sorted(set(FONT_FILES) - set(by_name))
    if missing:
        pytest.skip(f"fonts not installed ({', '.join(missing)}); run: {G.INSTALL_LINE}")
    return {name: by_name[name] for name in FONT_FILES}


@pytest.fixture(scope="module")
def font_dir(installed, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fonts")
    for name, src in installed.items():
        shutil.copy2(src, root / name)
    return root


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("glyph_cache")


@pytest.fixture(autouse=True)
def _cache_env(monkeypatch, shared_cache):
    monkeypatch.setenv("ALAMBIC_CACHE", str(shared_cache))


@pytest.fixture
def count_renders(monkeypatch) -> list[str]:
    """Records the path of every font rendered from here on."""
    calls: list[str] = []
    real = G.render_font

    def counting(path, chars, size):
        calls.append(str(path))
        return real(path, chars, size)

    monkeypatch.setattr(G, "render_font", counting)
    return calls


def cfg(font_dir: Path, **kw) -> G.GlyphsConfig:
    return G.GlyphsConfig(font_dirs=[str(font_dir)], **kw)


def bundle_of(c: G.GlyphsConfig, **split):
    """The DataBundle a recipe with ``data: {name: glyphs, ...}`` gets."""
    return build_data(DataSpec(name="glyphs", **c.model_dump(exclude_none=True), **split))


# ------------------------------------------------------------------------------------------- rendering
def test_every_font_gives_62_classes_in_unit_range(font_dir):
    raw = G.load_glyphs(cfg(font_dir))
    assert isinstance(raw, RawData)
    assert raw.class_names == list(ALL) and raw.num_classes == 62
    assert tuple(raw.x.shape) == (12 * 62, 1, 32, 32) and raw.x.dtype == torch.float32
    assert float(raw.x.min()) >= 0.0 and float(raw.x.max()) <= 1.0
    assert bool((raw.x.flatten(1).amax(1) > 0.5).all()), "every image has ink"
    assert torch.equal(raw.y, torch.arange(62).repeat(12))  # font-major: font f, class k is row f * 62 + k
    small = G.load_glyphs(cfg(font_dir, size=16, classes="digits"))
    assert tuple(small.x.shape) == (12 * 10, 1, 16, 16) and small.class_names == list("0123456789")


def test_characters_share_a_baseline_and_are_centred(installed):
    img = G.render_font(installed["LiberationSans-Regular.ttf"], "xXgIo", 32).astype(np.float64)
    rows = [np.flatnonzero(g.max(1) > 64) for g in img]  # ink rows of each glyph
    (x, big_x, g, i, o) = rows
    assert abs(x[-1] - big_x[-1]) <= 1, "x and X stand on the same baseline"
    assert big_x[0] + 4 <= x[0], "lower case is shorter: the case is readable from the size"
    assert g[-1] >= x[-1] + 4, "descenders go below the baseline"
    cols = img[3].sum(0)
    assert abs((cols * np.arange(32)).sum() / cols.sum() - 15.5) <= 1.0, "centred horizontally"
    assert not np.array_equal(img[1], img[4]), "X and o differ"


@pytest.mark.parametrize(
    "chars, reason",
    [("AB ", "blank"), ("AB\u4e00", ".notdef"), ("abcabcab", "share an image")],
    ids=["blank", "missing-glyph", "duplicates"],
)
def test_fonts_that_cannot_draw_every_character_distinctly_are_unusable(installed, chars, reason):
    with pytest.raises(G.UnusableFont, match=reason):
        G.render_font(installed["LiberationSans-Regular.ttf"], chars, 32)


def test_a_font_missing_characters_is_dropped_from_the_dataset(font_dir, tmp_path, monkeypatch):
    # A "font" whose file cannot be parsed and a real one: only the real one survives.
    (tmp_path / "broken.ttf").write_bytes(b"not a font")
    shutil.copy2(font_dir / "FreeSans.ttf", tmp_path / "FreeSans.ttf")
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))
    g = G.build_glyphs(G.GlyphsConfig(font_dirs=[str(tmp_path)]))
    assert g.families == ["FreeSans"]


# -------------------------------------------------------------------------------------------- selection
def test_fonts_and_exclude_select_by_family_or_file_name(font_dir):
    assert set(G.build_glyphs(cfg(font_dir, fonts=["liberation*"])).families) == {
        "Liberation Sans", "Liberation Serif", "Liberation Mono"}
    assert set(G.build_glyphs(cfg(font_dir, fonts=["FreeSans.ttf", "DejaVu Serif"])).families) == {
        "FreeSans", "DejaVu Serif"}
    assert not any("Mono" in f for f in G.build_glyphs(cfg(font_dir, exclude=["*mono*"])).families)


def test_max_fonts_is_a_fixed_pick_that_grows_by_adding(font_dir, tmp_path, monkeypatch):
    five = G.build_glyphs(cfg(font_dir, max_fonts=5))
    eight = G.build_glyphs(cfg(font_dir, max_fonts=8))
    faces = lambda g: set(zip(g.families, g.styles))  # noqa: E731
    assert len(five.families) == 5 and len(eight.families) == 8 and faces(five) < faces(eight)
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path))  # a fresh render gives the same pick and pixels
    again = G.build_glyphs(cfg(font_dir, max_fonts=5))
    assert again.families == five.families and np.array_equal(again.images, five.images)


def test_default_discovery_includes_what_fontconfig_knows_and_font_dirs_only_their_own(font_dir):
    fc_list = shutil.which("fc-list")
    if fc_list is None:
        pytest.skip("fontconfig not installed")
    listed = subprocess.run([fc_list, "--format", "%{file}\n"], capture_output=True, text=True).stdout.splitlines()
    known = {Path(p).resolve() for p in listed if p.lower().endswith(G.FONT_EXTENSIONS)}
    assert known <= set(G.font_files())
    assert G.font_files([str(font_dir)]) == sorted(font_dir / name for name in FONT_FILES)


def test_no_usable_font_names_the_install_line(tmp_path, font_dir):
    with pytest.raises(AlambicError, match="apt-get install -y fonts-"):
        G.build_glyphs(G.GlyphsConfig(font_dirs=[str(tmp_path)]))
    with pytest.raises(AlambicError, match="NoSuchFont"):
        G.build_glyphs(cfg(font_dir, fonts=["NoSuchFont*"]))


def test_config_is_strict_and_registered():
    with pytest.raises(ValidationError):
        G.GlyphsConfig(sizes=32)
    with pytest.raises(ValidationError):
        G.GlyphsConfig(classes="greek")
    entry = DATASETS.get("glyphs")
    assert entry.config is G.GlyphsConfig and entry.obj is G.load_glyphs


def test_design_groups_merge_variants_and_clones():
    fams = ["Liberation Sans", "Liberation Sans Narrow", "Arimo", "Cabin", "CabinSketch", "FreeSans",
            "TeX Gyre Heros", "Nimbus Sans", "Go", "Go Mono", "Gotham", "DejaVu Serif"]
    assert G.design_groups(fams) == ["liberation", "liberation", "liberation", "cabin", "cabin", "urw",
                                     "urw", "urw", "go", "go", "gotham", "dejavu"]


# ------------------------------------------------------------------------------------------------ cache
def test_cache_is_reused_and_rebuilt_only_when_fonts_or_settings_change(
    font_dir, tmp_path, monkeypatch, count_renders
):
    fonts = tmp_path / "fonts"
    shutil.copytree(font_dir, fonts)
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))
    c = G.GlyphsConfig(font_dirs=[str(fonts)], fonts=["Free*"])
    first = G.build_glyphs(c)
    assert len(count_renders) == 4
    files = list((tmp_path / "cache" / "glyphs").iterdir())
    assert [f.name for f in files] == [f"{first.key}.npz"], "one cache file, no temporary left behind"

    again = G.build_glyphs(c)
    assert len(count_renders) == 4, "a cache hit renders nothing"
    assert again.key == first.key and np.array_equal(again.images, first.images)
    assert again.families == first.families and again.styles == first.styles
    G.build_glyphs(c.model_copy(update={"group_by": "family"}))
    assert len(count_renders) == 4, "the split unit does not change the images"

    G.build_glyphs(c.model_copy(update={"size": 24}))
    assert len(count_renders) == 8, "a new size renders again"
    os.utime(fonts / "FreeMono.ttf", ns=(1, 1))
    G.build_glyphs(c)
    assert len(count_renders) == 12, "a changed font file renders again"
    shutil.copy2(font_dir / "DejaVuSans.ttf", fonts / "Extra.ttf")
    assert G.build_glyphs(c).key != first.key and len(count_renders) == 16, "any new font file changes the key"


def test_a_corrupt_cache_is_rebuilt_and_a_failed_write_leaves_nothing(font_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path))
    c = cfg(font_dir, fonts=["FreeMono"])
    path = tmp_path / "glyphs" / f"{G.build_glyphs(c).key}.npz"
    path.write_bytes(b"truncated")
    assert G.build_glyphs(c).families == ["FreeMono"] and np.load(path)["images"].shape == (1, 62, 32, 32)

    def dies(file, **arrays):
        file.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(G.np, "savez_compressed", dies)
    with pytest.raises(KeyboardInterrupt):
        G.build_glyphs(cfg(font_dir, fonts=["FreeSerif"]))
    assert sorted(p.name for p in (tmp_path / "glyphs").iterdir()) == [path.name]


# ------------------------------------------------------------------------------------------------ split
def test_group_split_keeps_groups_whole_near_the_fractions_and_is_seeded():
    sizes = np.random.default_rng(3).integers(5, 40, size=60)
    groups = torch.from_numpy(np.repeat(np.arange(60), sizes))
    n = len(groups)
    tr, va, te = group_split(groups, 0.15, 0.2, seed=7)
    assert torch.equal(torch.sort(torch.cat([tr, va, te])).values, torch.arange(n))
    owners = [set(groups[s].tolist()) for s in (tr, va, te)]
    assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])
    assert abs(len(te) - 0.2 * n) <= sizes.max() and abs(len(va) - 0.15 * n) <= sizes.max()
    again = group_split(groups, 0.15, 0.2, seed=7)
    assert all(torch.equal(a, b) for a, b in zip((tr, va, te), again))
    assert not torch.equal(group_split(groups, 0.15, 0.2, seed=8)[2], te)
    with pytest.raises(AlambicError, match="2 group"):
        group_split(torch.tensor([0, 0, 1, 1]), 0.15, 0.2, seed=0)
    with pytest.raises(AlambicError, match="fractions"):
        group_split(groups, 0.5, 0.5, seed=0)


@pytest.mark.parametrize("group_by", ["family", "design"])
def test_no_font_family_appears_in_two_splits(font_dir, group_by):
    c = cfg(font_dir, group_by=group_by)
    raw, groups, names = G.glyph_data(c)
    families = np.repeat(G.build_glyphs(c).families, 62)
    b = bundle_of(c, val_fraction=0.2, test_fraction=0.25, split_seed=0)
    per_split = [set(families[s.index.numpy()]) for s in (b.train, b.val, b.test)]
    assert all(per_split), "every split holds at least one family"
    assert not (per_split[0] & per_split[1] or per_split[0] & per_split[2] or per_split[1] & per_split[2])
    assert set.union(*per_split) == set(FONT_FILES.values())
    if group_by == "design":  # DejaVu, Liberation and FreeFont (URW): one design per split
        assert sorted(len({f.split()[0][:4] for f in fams}) for fams in per_split) == [1, 1, 1]
    assert len(names) == (9 if group_by == "family" else 3)
    assert b.num_classes == 62 and b.input_shape == (1, 32, 32)
    assert torch.equal(b.test.x, raw.x[b.test.index]) and torch.equal(b.test.y, raw.y[b.test.index])


def test_bundle_is_deterministic_and_hides_only_train_labels(font_dir):
    c = cfg(font_dir, group_by="family")
    a = bundle_of(c, labeled_fraction=0.5, split_seed=1)
    b = bundle_of(c, labeled_fraction=0.5, split_seed=1)
    assert a.fingerprint == b.fingerprint
    assert bundle_of(cfg(font_dir, group_by="design"), labeled_fraction=0.5, split_seed=1).fingerprint != a.fingerprint
    assert all(torch.equal(getattr(a, s).index, getattr(b, s).index) for s in ("train", "val", "test"))
    hidden = a.train.y == IGNORE_INDEX
    assert torch.equal(hidden, ~a.train.labeled) and 0.4 < hidden.float().mean() < 0.6
    assert bool(a.val.labeled.all() and a.test.labeled.all()) and not bool((a.test.y == IGNORE_INDEX).any())
    others = [bundle_of(c, split_seed=s) for s in range(2, 6)]
    assert any(not torch.equal(o.test.index, a.test.index) for o in others), "the seed moves the held-out families"
    assert len({o.fingerprint for o in others}) == len(others)


def test_a_carried_cache_file_gives_the_same_data_without_fonts(font_dir, tmp_path, monkeypatch, count_renders):
    """A machine without fonts (a lent GPU box) loads the .npz another machine rendered: same samples,
    same split, same data fingerprint (so cached teachers and bench cells still match)."""
    c = cfg(font_dir, size=16)
    here = bundle_of(c)
    carried = tmp_path / "glyphs16.npz"
    shutil.copy2(G.cache_root() / f"{G.build_glyphs(c).key}.npz", carried)
    monkeypatch.setattr(G, "font_files", lambda dirs=None: [])  # no font anywhere
    rendered = len(count_renders)
    there = bundle_of(G.GlyphsConfig(size=16, cache_file=str(carried)))
    assert len(count_renders) == rendered and there.fingerprint == here.fingerprint
    assert torch.equal(there.train.x, here.train.x) and torch.equal(there.test.index, here.test.index)
    with pytest.raises(AlambicError, match=r"holds 16-pixel images of 62 characters; the recipe asks for size 24"):
        G.build_glyphs(G.GlyphsConfig(size=24, cache_file=str(carried)))
    with pytest.raises(AlambicError, match="glyphs cache_file .*nowhere.npz not found"):
        G.build_glyphs(G.GlyphsConfig(cache_file=str(tmp_path / "nowhere.npz")))
    with pytest.raises(ValueError, match="cache_file holds fonts already chosen: drop fonts"):
        G.GlyphsConfig(cache_file=str(carried), fonts=["Free*"])
