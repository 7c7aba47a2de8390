"""Data: registered raw sources, fixed seeded splits, and loaders that yield :class:`Batch` with stable indices.

Importing this package registers the built-in datasets (``digits``, ``mnist5k``, ``npz``, ``image_folder``,
``glyphs``).
"""

from alambic.data.batch import IGNORE_INDEX, INPUT, Batch
from alambic.data.loader import DatasetLoader, TensorLoader, epoch_order, make_loader
from alambic.data.sources import RawData, fingerprint, normalize_labels
from alambic.data.splits import (
    DataBundle, Split, build_data, bundle_from_arrays, group_split, labeled_mask, stratified_split,
)
from alambic.data.glyphs import GlyphsConfig, load_glyphs  # noqa: E402  (registers "glyphs")
from alambic.data import text_build as _text_build  # noqa: E402,F401  (registers "text")
from alambic.data import tasks as _tasks  # noqa: E402,F401  (registers "arithmetic", "tasks")
from alambic.data import glyph_outlines as _glyph_outlines  # noqa: E402,F401  (registers "glyph_outlines")
from alambic.data import emoji_text as _emoji_text  # noqa: E402,F401  (registers "emoji_text")

__all__ = [
    "IGNORE_INDEX",
    "INPUT",
    "Batch",
    "DataBundle",
    "DatasetLoader",
    "GlyphsConfig",
    "RawData",
    "Split",
    "TensorLoader",
    "build_data",
    "bundle_from_arrays",
    "epoch_order",
    "fingerprint",
    "group_split",
    "load_glyphs",
    "labeled_mask",
    "make_loader",
    "normalize_labels",
    "stratified_split",
]
