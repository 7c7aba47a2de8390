"""``glyphs``: the 62 characters 0-9A-Za-z rendered with Pillow from the fonts installed on the machine.

A notMNIST-like benchmark that needs no download: every usable font becomes K images (one per class), and
val and test hold out whole font *designs*, so a model is scored on typefaces it has never seen rather
than on other styles of ones it trained on. Fonts come from Debian's ``fonts-*`` packages::

    apt-get install -y fonts-dejavu-core fonts-liberation fonts-freefont-ttf   # 50 fonts, 11 families, 3 designs

(enough for the tests; the README lists the benchmark set: ~1,140 usable fonts, 333 designs).

Rendering is ``size`` x ``size`` grayscale in ``[0, 1]``, ink = 1: each font is scaled once so that its
tallest ascender, deepest descender and widest glyph fit the square, and every character sits on that
font's common baseline, centred horizontally. A shared baseline and scale matter because ``o``/``O``,
``x``/``X`` or ``s``/``S`` differ only by size and position.

Fonts that cannot render every requested character distinctly are dropped: a blank glyph, a character
that renders as the font's ``.notdef`` box, or more than :data:`MAX_DUPLICATES` characters that share one
image (all-caps fonts whose lower case repeats the upper case). Fonts that map the Latin code points to
pictures cannot be told from display faces by their renders: the ones in Debian's packages are listed in
:data:`PICTURE_FONTS`; add others to ``exclude``.

The images are built once and cached as ``<cache>/glyphs/<fingerprint>.npz`` (``<cache>`` is
``$ALAMBIC_CACHE`` or ``~/.cache/alambic``). The fingerprint hashes the path, size and mtime of every font
file in the searched folders, the settings and the Pillow/FreeType versions, so installing a font or
changing a setting rebuilds, and nothing else does. The file is written to a temporary name and renamed,
so an interrupted build never leaves a half-written cache.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from alambic.cache_dir import cache_dir, make_dirs
from alambic.data.sources import RawData, fingerprint
from alambic.errors import AlambicError
from alambic.registry import DATASETS

CHARSETS = {
    "digits": "0123456789",
    "letters": "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
    "all": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
}
INSTALL_LINE = "apt-get install -y fonts-dejavu-core fonts-liberation fonts-freefont-ttf"
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
MAX_DUPLICATES = 4  # characters allowed to share an image with another one (I/l, O/0 in some sans fonts)
RENDER_VERSION = 1  # bump when the rendering changes: every cache is rebuilt
_MARGIN = 1 / 16  # blank border, as a fraction of the side

# Same design sold under several names (metric clones and forks). Held out together, or the "unseen" test
# typeface would be a renamed training one. Keys and values are design stems (see :func:`design_stem`).
SAME_DESIGN = {
    "tex": "urw", "nimbus": "urw", "c059": "urw", "p052": "urw", "z003": "urw",  # TeX Gyre = URW base 35
    "freesans": "urw", "freeserif": "urw", "freemono": "urw",  # GNU FreeFont derives from URW Nimbus
    "arimo": "liberation", "tinos": "liberation", "cousine": "liberation",  # Liberation 2 = Croscore
    "carlito": "lato",  # Carlito is Lato re-spaced to Calibri's metrics
    "latin": "cmu", "lm": "cmu",  # Latin Modern and CMU both extend Knuth's Computer Modern
}

# Fonts that map 0-9A-Za-z to pictures (dingbats, patterns, ornaments) or draw letters too small to read: found
# by looking at every font in the Debian packages the README lists. Renders cannot tell them from display
# faces, so they are named here (globs on the family name) and always excluded.
PICTURE_FONTS = (
    "3d let brk", "90 stars brk", "bandwidth brk", "binary*01s brk", "bit blocks*", "code of life brk",
    "d050000l", "dash dot brk", "entangled layer b brk", "faux snow brk", "head-ding maker brk",
    "line dings brk", "mishmash 4x4o brk", "numskull brk", "skull capz brk", "snailets brk", "symmetry brk",
)


class GlyphsConfig(BaseModel):
    """Options of the ``glyphs`` dataset (all have defaults: ``data: {name: glyphs}`` uses every font)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    size: int = Field(32, ge=8, le=128, description="side of the square images, in pixels")
    classes: Literal["all", "digits", "letters"] = Field("all", description="0-9A-Za-z (62), 0-9 or A-Za-z")
    fonts: list[str] | None = Field(
        None, description="keep fonts whose family name or file name matches one of these globs (case-insensitive)"
    )
    exclude: list[str] = Field(default_factory=list, description="drop fonts matching these globs (same rules)")
    max_fonts: int | None = Field(None, ge=1, description="at most this many usable fonts (a fixed pseudo-random pick)")
    font_dirs: list[str] | None = Field(
        None, description=f"folders searched recursively (default {list(FONT_DIRS)} and whatever fc-list knows)"
    )
    group_by: Literal["design", "family"] = Field(
        "design", description="unit held out by the split: the design stem (default) or the exact family name"
    )
    cache_file: str | None = Field(
        None, description="a rendered set (.npz) from another machine's cache, used as is, without fonts: "
                          "copy <cache>/glyphs/<key>.npz of a build with the same size and classes",
    )

    @model_validator(mode="after")
    def _file_or_fonts(self) -> "GlyphsConfig":
        chosen = [k for k in ("fonts", "max_fonts", "font_dirs") if getattr(self, k) is not None] + (
            ["exclude"] if self.exclude else [])
        if self.cache_file is not None and chosen:
            raise ValueError(f"cache_file holds fonts already chosen: drop {', '.join(chosen)}")
        return self


@dataclass(frozen=True)
class GlyphSet:
    """Rendered fonts: ``images`` uint8 ``[F, K, S, S]`` and, per font, its file, family and style name."""

    images: np.ndarray
    paths: list[str]
    families: list[str]
    styles: list[str]
    chars: str
    key: str  # cache fingerprint


# ------------------------------------------------------------------------------------- font discovery
def font_files(dirs: list[str] | None = None) -> list[Path]:
    """Every .ttf/.otf/.ttc under ``dirs`` (recursively), resolved and sorted; missing folders are skipped.

    By default: the usual font folders plus every file fontconfig knows (``fc-list``), since some packages
    (``fonts-texgyre``, ``fonts-lmodern``) install under ``/usr/share/texmf`` and only register there.
    """
    found: set[Path] = set()
    for d in dirs if dirs is not None else FONT_DIRS:
        root = Path(d).expanduser()
        if root.is_dir():
            found.update(p.resolve() for p in root.rglob("*") if p.suffix.lower() in FONT_EXTENSIONS and p.is_file())
    fc_list = shutil.which("fc-list") if dirs is None else None
    if fc_list:
        try:
            listed = subprocess.run([fc_list, "--format", "%{file}\n"], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            listed = None
        for line in listed.stdout.splitlines() if listed else []:
            p = Path(line)
            if p.suffix.lower() in FONT_EXTENSIONS and p.is_file():
                found.add(p.resolve())
    return sorted(found)


def design_stem(family: str) -> str:
    """The first word of a family name, lower-cased, with the clones of :data:`SAME_DESIGN` merged."""
    words = re.findall(r"[a-z0-9]+", family.lower())
    stem = words[0] if words else family.lower()
    return SAME_DESIGN.get(stem, stem)


def design_groups(families: list[str]) -> list[str]:
    """The held-out unit of each family: its :func:`design_stem`, merged into a shorter stem (4+ letters)
    that starts it.

    Styles of one family already share a family name; the stem also keeps together the widths and variants
    that a family name spells out ("Liberation Sans Narrow", "Bocuma Dent BRK") and the prefix merge the
    ones glued to the name ("Cabin" and "CabinSketch", "Beteckna" and "BetecknaGS"). Unrelated fonts that
    share a first word are held out together too, which only costs the split a little balance.
    """
    stems = sorted({design_stem(f) for f in families}, key=lambda s: (len(s), s))
    root: dict[str, str] = {}
    for s in stems:
        root[s] = next((root[r] for r in stems if len(r) >= 4 and len(r) < len(s) and s.startswith(r)), s)
    return [root[design_stem(f)] for f in families]


def _matches(globs: list[str], family: str, path: Path) -> bool:
    names = (family.lower(), path.name.lower(), path.stem.lower())
    return any(fnmatch.fnmatchcase(n, g.lower()) for g in globs for n in names)


def _order_key(family: str, style: str) -> str:
    # The max_fonts pick: a hash of the names, not of the path, so two machines with the same fonts agree and
    # installing one more font does not reshuffle the others.
    return hashlib.sha256(f"{family}|{style}".encode()).hexdigest()


# ------------------------------------------------------------------------------------------ rendering
class UnusableFont(Exception):
    """A font that cannot render the requested characters as distinct glyphs (the message says why)."""


_NOTDEF = "\U0010fffd"  # an unassigned code point: every font draws its .notdef box for it


def glyph_layout(path: str | Path, chars: str, size: int, also: str = "") -> tuple[Any, np.ndarray]:
    """(the font at its render size, float64 ``[len(chars + also), 2]`` pen origins ``(x, baseline)``).

    The font is measured at a large size to find the scale at which the union of the glyph boxes of
    ``chars`` (top of the tallest, bottom of the deepest, width of the widest) fits inside the margin, then
    loaded at that (fractional) size; each character of ``chars + also`` is centred horizontally and sits on
    the baseline shared by ``chars``. :func:`render_font` draws at these origins (anchor ``ls``), and the
    outline point clouds of :mod:`alambic.data.glyph_outlines` are placed in the same frame from them.
    Raises :class:`UnusableFont` when no glyph has any extent (other failures propagate).
    """
    from PIL import ImageFont

    big = ImageFont.truetype(str(path), 4 * size)
    boxes = np.array([big.getbbox(c, anchor="ls") for c in chars], dtype=np.float64)
    inner = size * (1 - 2 * _MARGIN)
    height = boxes[:, 3].max() - boxes[:, 1].min()
    width = (boxes[:, 2] - boxes[:, 0]).max()
    if height <= 0 or width <= 0:
        raise UnusableFont("no glyph has any extent")
    font = ImageFont.truetype(str(path), 4 * size * min(inner / height, inner / width))
    boxes = np.array([font.getbbox(c, anchor="ls") for c in chars + also], dtype=np.float64)
    top, bottom = boxes[: len(chars), 1].min(), boxes[: len(chars), 3].max()
    baseline = (size - (bottom - top)) / 2 - top
    x = (size - (boxes[:, 2] - boxes[:, 0])) / 2 - boxes[:, 0]
    return font, np.stack([x, np.full_like(x, baseline)], axis=1)


def render_font(path: str | Path, chars: str, size: int) -> np.ndarray:
    """uint8 ``[len(chars), size, size]``: each character centred horizontally on the font's baseline.

    Drawn at the origins of :func:`glyph_layout` directly at the target size, so FreeType's anti-aliasing
    works at the target resolution. Raises :class:`UnusableFont` for blank, missing (``.notdef``) or too
    many identical glyphs.
    """
    from PIL import Image, ImageDraw

    try:
        font, origins = glyph_layout(path, chars, size, also=_NOTDEF)  # the last one draws .notdef
        out = np.zeros((len(origins), size, size), dtype=np.uint8)
        image = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(image)
        for i, ch in enumerate(chars + _NOTDEF):
            image.paste(0, (0, 0, size, size))
            draw.text(tuple(origins[i]), ch, 255, font, anchor="ls")
            out[i] = np.asarray(image)
    except UnusableFont:
        raise
    except Exception as e:  # bitmap-only fonts, broken tables, unsupported formats
        raise UnusableFont(f"cannot render ({type(e).__name__}: {e})") from None
    glyphs, notdef = out[:-1], out[-1]
    blank = [c for c, g in zip(chars, glyphs) if not g.any()]
    if blank:
        raise UnusableFont(f"blank glyphs for {''.join(blank)!r}")
    missing = [c for c, g in zip(chars, glyphs) if np.array_equal(g, notdef)]
    if missing:
        raise UnusableFont(f"no glyphs for {''.join(missing)!r} (they draw the .notdef box)")
    counts = Counter(g.tobytes() for g in glyphs)
    shared = sum(c for c in counts.values() if c > 1)
    if shared > MAX_DUPLICATES:
        raise UnusableFont(f"{shared} characters share an image with another one (more than {MAX_DUPLICATES})")
    return glyphs


# -------------------------------------------------------------------------------------- build + cache
def cache_root() -> Path:
    return cache_dir("glyphs")


def cache_key(files: list[Path], cfg: GlyphsConfig) -> str:
    """sha256 (first 24 hex digits) of every font file's path, size and mtime, the settings that change the
    images and the renderer versions. ``group_by`` is left out: it changes the split, not the images."""
    import PIL
    from PIL import features

    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    settings = cfg.model_dump(exclude={"group_by"})
    settings.update(render=RENDER_VERSION, pictures=PICTURE_FONTS, pillow=PIL.__version__,
                    freetype=features.version("freetype2"))
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()[:24]


def build_glyphs(cfg: GlyphsConfig, *, progress: bool | None = None) -> GlyphSet:
    """The rendered fonts for ``cfg``, from the cache when its fingerprint matches, else rendered and cached.

    ``progress``: a rich progress bar while rendering (default: on a terminal, for more than 50 fonts).
    """
    chars = CHARSETS[cfg.classes]
    if cfg.cache_file is not None:
        return _carried_cache(Path(cfg.cache_file).expanduser(), cfg, chars)
    files = font_files(cfg.font_dirs)
    key = cache_key(files, cfg)
    path = cache_root() / f"{key}.npz"
    cached = _read_cache(path, key)
    if cached is not None:
        return cached
    images, paths, families, styles = _render_all(files, cfg, chars, progress)
    glyphs = GlyphSet(images, paths, families, styles, chars, key)
    _write_cache(path, glyphs)
    return glyphs


def _candidates(files: list[Path], cfg: GlyphsConfig) -> dict[tuple[str, str], Path]:
    """(family, style) -> file for the fonts the settings select; the first path wins, since packages ship
    the same face as .ttf and .otf (or two versions of it)."""
    from PIL import ImageFont

    out: dict[tuple[str, str], Path] = {}
    for f in files:
        try:
            family, style = ImageFont.truetype(str(f), 16).getname()
        except Exception:
            continue  # not a scalable font FreeType can open: skipped like an unusable one
        family, style = family or f.stem, style or ""
        if cfg.fonts is not None and not _matches(cfg.fonts, family, f):
            continue
        if _matches([*PICTURE_FONTS, *cfg.exclude], family, f):
            continue
        out.setdefault((family, style), f)
    return out


def _render_all(files: list[Path], cfg: GlyphsConfig, chars: str, progress: bool | None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    candidates = _candidates(files, cfg)
    order = sorted(candidates, key=lambda fs: _order_key(*fs))
    if progress is None:
        progress = sys.stderr.isatty() and len(order) > 50
    bar = Progress(TextColumn("rendering glyphs"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(stderr=True), transient=True, disable=not progress)
    kept: list[tuple[str, str, Path, np.ndarray]] = []
    with bar:  # one process: ~40 ms a font; worker processes would each pay torch's import for little gain
        for family, style in bar.track(order):
            if cfg.max_fonts is not None and len(kept) >= cfg.max_fonts:
                break
            try:
                kept.append((family, style, candidates[family, style],
                             render_font(candidates[family, style], chars, cfg.size)))
            except UnusableFont:
                continue
    if not kept:
        where = ", ".join(cfg.font_dirs if cfg.font_dirs is not None else FONT_DIRS)
        subset = f" matching fonts={cfg.fonts}" if cfg.fonts is not None else ""
        raise AlambicError(
            f"dataset 'glyphs': no usable font{subset} in {where} ({len(files)} font files); "
            f"install some with: {INSTALL_LINE}"
        )
    kept.sort(key=lambda k: (k[0].lower(), k[1].lower(), str(k[2])))  # stable sample order: by name
    images = np.stack([k[3] for k in kept])
    return images, [str(k[2]) for k in kept], [k[0] for k in kept], [k[1] for k in kept]


def _carried_cache(path: Path, cfg: GlyphsConfig, chars: str) -> GlyphSet:
    """The set in ``cache_file``: any key is accepted (its fonts are not here to hash), size and classes
    must match the recipe's."""
    if not path.is_file():
        raise AlambicError(f"glyphs cache_file {path} not found (copy it from {cache_root()} on a machine that "
                           "rendered the same size and classes)")
    try:
        with np.load(path, allow_pickle=False) as f:
            g = GlyphSet(f["images"], f["paths"].tolist(), f["families"].tolist(), f["styles"].tolist(),
                         str(f["chars"]), str(f["key"]))
    except Exception as exc:
        raise AlambicError(f"glyphs cache_file {path} is not a rendered glyph set ({type(exc).__name__}: {exc})") from None
    if g.images.ndim != 4 or g.images.shape[-1] != cfg.size or g.chars != chars:
        raise AlambicError(f"glyphs cache_file {path} holds {g.images.shape[-1]}-pixel images of {len(g.chars)} "
                           f"characters; the recipe asks for size {cfg.size} and classes {cfg.classes!r} "
                           f"({len(chars)} characters)")
    return g


def _read_cache(path: Path, key: str) -> GlyphSet | None:
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if str(f["key"]) != key:
                return None
            return GlyphSet(f["images"], f["paths"].tolist(), f["families"].tolist(), f["styles"].tolist(),
                            str(f["chars"]), key)
    except Exception:  # truncated or foreign file: render again and overwrite it
        return None


def _write_cache(path: Path, g: GlyphSet) -> None:
    make_dirs(path.parent)  # never group/world-writable, whatever the umask (alambic.cache_dir)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            np.savez_compressed(out, images=g.images, paths=np.array(g.paths), families=np.array(g.families),
                                styles=np.array(g.styles), chars=np.array(g.chars), key=np.array(g.key))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shareable
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------ dataset + split
def glyph_data(cfg: GlyphsConfig) -> tuple[RawData, Tensor, list[str]]:
    """(RawData, groups, group names): samples font-major (font ``f``, class ``k`` is row ``f * K + k``),
    fonts ordered by family and style name; ``groups[i]`` int64 is the held-out unit of sample ``i``, an
    index into the sorted group names (design stems or family names, per ``cfg.group_by``)."""
    g = build_glyphs(cfg)
    n_fonts, k = g.images.shape[:2]
    x = torch.from_numpy(g.images).reshape(-1, 1, cfg.size, cfg.size).to(torch.float32).div_(255.0)
    y = torch.arange(k, dtype=torch.int64).repeat(n_fonts)
    units = design_groups(g.families) if cfg.group_by == "design" else list(g.families)
    names = sorted(set(units))
    ids = {name: i for i, name in enumerate(names)}
    groups = torch.tensor([ids[u] for u in units], dtype=torch.int64).repeat_interleave(k)
    fp = fingerprint(g.images, np.array(g.families), np.array(g.styles), source="glyphs", size=cfg.size, chars=g.chars)
    return RawData(x, y, list(g.chars), fp), groups, names


@DATASETS.register("glyphs", config=GlyphsConfig, description="0-9A-Za-z rendered from the installed fonts")
def load_glyphs(options: GlyphsConfig | None = None) -> RawData:
    """The glyph images as :class:`RawData` (see the module docstring), with ``groups`` set so that the split
    holds out whole font designs (or families, per ``group_by``)."""
    raw, groups, _ = glyph_data(options or GlyphsConfig())
    return dataclasses.replace(raw, groups=groups)
