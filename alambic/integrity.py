"""Digests of the safetensors files alambic writes (checkpoints, teacher caches, exported weights).

Every file carries, in its header metadata under :data:`DIGEST_KEY`, a JSON object
``{"algo": "blake2b-128", "metadata": <hex>, "tensors": {name: <hex>}}``: one digest per tensor (over its
dtype, shape and bytes) and one over every other header metadata entry (for a checkpoint, its JSON
metadata: step, epoch, RNG, optimizer groups...). Reading the file back recomputes them, so a flipped bit,
a torn copy or an edited header is reported with the file and the damaged tensor named, instead of being
trained on or served.

A file without a digest (written by an alambic older than this, or by another tool) has nothing to check;
each caller decides what that means: checkpoints and exported weights are accepted as they are (so older
runs still resume and load), a teacher cache is recomputed (it is only a cache).

Cost: hashing runs at several hundred MB/s per core, a few milliseconds for the checkpoints of the tiny
and glyph recipes (see ``verify``'s caller in :mod:`alambic.train.state`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from alambic.errors import IntegrityError

DIGEST_KEY = "alambic.digest"
ALGO = "blake2b-128"


def _hasher() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=16)


def tensor_digest(t: Tensor) -> str:
    """Digest of one tensor: dtype, shape and raw bytes (no copy for a contiguous CPU tensor)."""
    t = t.detach().cpu().contiguous()
    h = _hasher()
    h.update(f"{t.dtype}:{tuple(t.shape)}:".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def metadata_digest(metadata: Mapping[str, str]) -> str:
    """Digest of every header metadata entry except the digest itself (sorted, length-prefixed)."""
    h = _hasher()
    for key in sorted(k for k in metadata if k != DIGEST_KEY):
        for part in (key.encode(), str(metadata[key]).encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """The :data:`DIGEST_KEY` value for a file holding ``tensors`` with header ``metadata``."""
    return json.dumps({"algo": ALGO, "metadata": metadata_digest(metadata),
                       "tensors": {k: tensor_digest(tensors[k]) for k in sorted(tensors)}},
                      separators=(",", ":"))


def with_digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` plus its digest entry, ready for ``safetensors`` ``save_file(..., metadata=)``."""
    out = {k: v for k, v in metadata.items() if k != DIGEST_KEY}
    out[DIGEST_KEY] = digest(tensors, out)
    return out


def verify(tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None, path: Path, what: str,
           *, required: bool = False) -> bool:
    """Check ``tensors`` and ``metadata`` read from ``path`` against the digest stored with them.

    Returns True when verified, False when the file has no digest (and ``required`` is False). Raises
    :class:`IntegrityError` (one line: ``what``, the path, the damaged parts) on any mismatch."""
    metadata = metadata or {}
    stored = metadata.get(DIGEST_KEY)
    if stored is None:
        if required:
            raise IntegrityError(f"{what} {path} carries no integrity digest (written by an older alambic?)")
        return False
    try:
        record = json.loads(stored)
        algo, want_meta, want = record["algo"], record["metadata"], dict(record["tensors"])
    except (ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{what} {path} is damaged: its integrity digest is unreadable ({exc})") from None
    if algo != ALGO:
        raise IntegrityError(f"{what} {path} has a digest of unknown kind '{algo}' (written by a newer alambic?)")
    bad = []
    if metadata_digest(metadata) != want_meta:
        bad.append("its metadata")
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    changed = [k for k in sorted(set(want) & set(tensors)) if tensor_digest(tensors[k]) != want[k]]
    if changed:
        bad.append(f"tensor{'s' if len(changed) > 1 else ''} {_names(changed)}")
    if missing:
        bad.append(f"missing tensor{'s' if len(missing) > 1 else ''} {_names(missing)}")
    if extra:
        bad.append(f"unlisted tensor{'s' if len(extra) > 1 else ''} {_names(extra)}")
    if bad:
        raise IntegrityError(f"{what} {path} is damaged: the digest written with it no longer matches "
                             f"{'; '.join(bad)} (a flipped bit, a torn copy or an edit)")
    return True


def _names(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
