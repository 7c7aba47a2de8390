"""Data: registered raw sources, fixed seeded splits, and loaders that yield :class:`Batch` with stable indices.

Importing this package registers the built-in datasets (``digits``, ``mnist5k``, ``npz``, ``image_folder``).
"""

from alambic.data.batch import IGNORE_INDEX, INPUT, Batch
from alambic.data.loader import DatasetLoader, TensorLoader, epoch_order, make_loader
from alambic.data.sources import RawData, fingerprint, normalize_labels
from alambic.data.splits import DataBundle, Split, build_data, bundle_from_arrays, labeled_mask, stratified_split

__all__ = [
    "IGNORE_INDEX",
    "INPUT",
    "Batch",
    "DataBundle",
    "DatasetLoader",
    "RawData",
    "Split",
    "TensorLoader",
    "build_data",
    "bundle_from_arrays",
    "epoch_order",
    "fingerprint",
    "labeled_mask",
    "make_loader",
    "normalize_labels",
    "stratified_split",
]
