"""A distilled (synthetic or selected) training set: its tensors, its file and how a run trains on it.

A set is a folder::

    set.safetensors   images [m, C, H, W] float32; labels [m] int64 (when the method knows them); targets
                      [m, k] float32 (a frozen teacher's representations, or KRR-ST's learned ones); the
                      header holds the JSON metadata and the integrity digest (alambic.integrity)
    manifest.json     the same metadata for people, plus the sha256 of set.safetensors
    recipe.yaml       the resolved distillation recipe (what made the set)

Reading it back (:func:`load_set`) checks the digest of every tensor and of the metadata and the manifest's
file hash: a flipped bit, a torn copy or an edit is one line naming the file and the damaged part, never a
set silently trained on. The set's samples get the stable ids ``0..m-1`` (their row); a run that trains on
a set (``data.distilled``) keeps the real data's validation and test splits, and its probes fit on the real
labelled training split.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.splits import DataBundle, Split
from alambic.errors import AlambicError, IntegrityError, ShapeMismatchError
from alambic.teachers.base import ModelOutput

SET_FILE, MANIFEST, SET_FORMAT = "set.safetensors", "manifest.json", "alambic-distilled-set/1"

__all__ = ["MANIFEST", "SET_FILE", "SetTargetsTeacher", "SyntheticSet", "load_set", "save_set", "train_on_set"]


@dataclass
class SyntheticSet:
    """``images`` [m, C, H, W]; ``labels`` [m] int64 or None; ``targets`` [m, k] or None; ``meta``: JSON-able
    provenance (method, options, data and teacher fingerprints, steps, wall time)."""

    images: Tensor
    labels: Tensor | None = None
    targets: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = self.images.shape[0] if self.images.dim() >= 2 else -1
        if m < 1:
            raise ShapeMismatchError(f"SyntheticSet: images must be [m, ...] with m >= 1, got {tuple(self.images.shape)}")
        if self.labels is not None and (self.labels.shape != (m,) or self.labels.dtype != torch.int64):
            raise ShapeMismatchError(f"SyntheticSet: labels must be int64 [{m}], got {self.labels.dtype} "
                                     f"{tuple(self.labels.shape)}")
        if self.targets is not None and (self.targets.dim() != 2 or self.targets.shape[0] != m):
            raise ShapeMismatchError(f"SyntheticSet: targets must be [{m}, k], got {tuple(self.targets.shape)}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        out = {"images": self.images.detach().float().contiguous().cpu()}
        if self.labels is not None:
            out["labels"] = self.labels.detach().contiguous().cpu()
        if self.targets is not None:
            out["targets"] = self.targets.detach().float().contiguous().cpu()
        return out


def save_set(synthetic: SyntheticSet, folder: str | Path, recipe_yaml: str | None = None) -> Path:
    """Write ``synthetic`` into ``folder`` (atomically, file by file; the manifest last) and return the folder.

    The manifest records, beside the metadata, the shapes, counts, per-class counts of the labels, the digest
    of each tensor and the sha256 of ``set.safetensors``."""
    from alambic import __version__
    from alambic.integrity import tensor_digest
    from alambic.train.state import atomic_save, atomic_write_text

    folder = Path(folder)
    tensors = synthetic.tensors()
    meta = {"format": SET_FORMAT, "alambic_version": __version__, **synthetic.meta}
    if recipe_yaml is not None:
        atomic_write_text(folder / "recipe.yaml", recipe_yaml)
    atomic_save(tensors, meta, folder / SET_FILE, what="distilled set")
    counts = None
    if synthetic.labels is not None:
        counts = torch.bincount(synthetic.labels).tolist()
    manifest = {
        **meta,
        "size": len(synthetic),
        "shapes": {k: list(v.shape) for k, v in tensors.items()},
        "per_class": counts,
        "tensor_digests": {k: tensor_digest(v) for k, v in tensors.items()},
        "sha256": _file_sha256(folder / SET_FILE),
    }
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return folder


def load_set(folder: str | Path) -> SyntheticSet:
    """The set in ``folder``, verified: the safetensors digest (every tensor and the metadata) and the
    manifest's sha256 of the file. Anything missing, unreadable or damaged is one :class:`AlambicError` or
    :class:`IntegrityError` line naming the file."""
    from alambic.train.state import load

    folder = Path(folder)
    path, manifest_path = folder / SET_FILE, folder / MANIFEST
    if not folder.is_dir():
        raise AlambicError(f"distilled set {folder}: no such folder (write one with alambic distill-data)")
    if not path.is_file() or not manifest_path.is_file():
        missing = SET_FILE if not path.is_file() else MANIFEST
        raise AlambicError(f"distilled set {folder}: {missing} is missing (an unfinished distillation? continue it "
                           "with alambic distill-data --resume)")
    tensors, meta = load(path, what="distilled set", require_digest=True)
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        want = manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"distilled set {manifest_path} is damaged: unreadable ({type(exc).__name__})") from None
    if want != _file_sha256(path):
        raise IntegrityError(f"distilled set {path} does not match the sha256 in {manifest_path} (a torn copy, "
                             "or a set file from another distillation)")
    if meta.get("format") != SET_FORMAT:
        raise AlambicError(f"distilled set {path}: format {meta.get('format')!r}, not {SET_FORMAT!r}")
    if "images" not in tensors:
        raise IntegrityError(f"distilled set {path} holds no 'images' tensor")
    try:
        return SyntheticSet(tensors["images"], tensors.get("labels"), tensors.get("targets"), meta)
    except ShapeMismatchError as exc:
        raise AlambicError(f"distilled set {path}: {exc}") from None


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def set_fingerprint(synthetic: SyntheticSet) -> str:
    """16 hex digits over the set's tensors: what a run trained on."""
    from alambic.integrity import tensor_digest

    h = hashlib.sha256()
    for name, t in sorted(synthetic.tensors().items()):
        h.update(f"{name}:{tensor_digest(t)}".encode())
    return h.hexdigest()[:16]


def as_split(synthetic: SyntheticSet) -> Split:
    """The set as a training :class:`Split`: ids ``0..m-1``; unlabelled (``IGNORE_INDEX``) without labels."""
    m = len(synthetic)
    if synthetic.labels is None:
        y, labeled = torch.full((m,), IGNORE_INDEX, dtype=torch.int64), torch.zeros(m, dtype=torch.bool)
    else:
        y, labeled = synthetic.labels.clone(), torch.ones(m, dtype=torch.bool)
    return Split(x=synthetic.images.detach().float().clone(), y=y, index=torch.arange(m), labeled=labeled)


def train_on_set(data: DataBundle, folder: str | Path) -> DataBundle:
    """``data`` with its training split replaced by the distilled set in ``folder`` (validation and test stay).

    Refused in one line: a set of another input shape, labels beyond the data's classes, or a set made from
    other data (its recorded data fingerprint differs: another dataset or split)."""
    synthetic = load_set(folder)
    where = f"data.distilled {folder}"
    if tuple(synthetic.images.shape[1:]) != tuple(data.input_shape):
        raise ShapeMismatchError(f"{where}: images of shape {list(synthetic.images.shape[1:])}, but the data's "
                                 f"inputs are {list(data.input_shape)}")
    if synthetic.labels is not None and int(synthetic.labels.max()) >= data.num_classes:
        raise AlambicError(f"{where}: labels up to {int(synthetic.labels.max())}, but the data has "
                           f"{data.num_classes} classes")
    made_from = synthetic.meta.get("data_fingerprint")
    if made_from is not None and made_from != data.fingerprint:
        raise AlambicError(f"{where}: distilled from data {made_from}, but this recipe's data is {data.fingerprint} "
                           "(another dataset or split): use the data section the set was made with")
    fp = hashlib.sha256(f"{data.fingerprint}|set:{set_fingerprint(synthetic)}".encode()).hexdigest()[:16]
    return replace(data, train=as_split(synthetic), fingerprint=fp)


class SetTargetsTeacher:
    """A distilled set's stored targets as a teacher: ``outputs`` returns row ``batch.index`` of ``targets``.

    KRR-ST's student is pre-trained to regress the set's learned target representations (Lee et al., ICLR
    2024, arXiv:2310.06511, §3: "pre-train a model on (X_s, Y_s)"); the targets are a file of cached
    teacher outputs keyed by sample id, like any cached teacher. The same target serves every view. A batch
    whose ids or images are not the set's (a run on other data) is refused."""

    def __init__(self, synthetic: SyntheticSet, where: str = "teacher.distilled"):
        if synthetic.targets is None:
            raise AlambicError(f"{where}: this set holds no targets (distilled without a teacher): train on its "
                               "labels (method ce) instead")
        self.targets = synthetic.targets.detach().float()
        self.images = synthetic.images.detach().float()
        self.where = where
        self._fingerprint = set_fingerprint(synthetic)

    @classmethod
    def from_folder(cls, folder: str | Path) -> SetTargetsTeacher:
        return cls(load_set(folder), f"teacher.distilled {folder}")

    @torch.no_grad()
    def outputs(self, batch: Batch, views: Sequence[str]) -> dict[str, ModelOutput]:
        idx = batch.index.cpu()
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= len(self.targets)):
            raise AlambicError(f"{self.where}: batch ids up to {int(idx.max())}, but the set holds {len(self.targets)} "
                               "samples: train on the same set (data.distilled)")
        x = batch.views.get("input")
        if x is not None and not torch.equal(x.detach().cpu().float(), self.images[idx]):
            raise AlambicError(f"{self.where}: the batch's images are not this set's: data.distilled must name the "
                               "same set")
        y = self.targets[idx].to(batch.index.device)
        return {v: ModelOutput(y, {"target": y}) for v in views}

    def after_step(self, student: nn.Module, step: int) -> None:
        return None

    def fingerprint(self) -> str:
        return self._fingerprint
