"""A frozen teacher's outputs, computed once per sample and served from memory (and disk) afterwards.

A frozen teacher in eval mode maps a sample to the same logits and tapped features every epoch, so after the
first epoch its forward pass is wasted work: on the glyphs benchmark it is most of the difference between
a KD run and a CE run. :class:`CachedTeacher` wraps such a teacher and keeps, per stable sample index
(``Batch.index``), its logits and tapped features. A row is served from the cache only if the input it
was computed from is the input now asked about: each row stores a 64-bit fingerprint of its input (a dot
product with a fixed random vector, in float64), and a batch row whose input differs (an augmented or
rotated copy under the same index, another dataset) is computed live and replaces the entry. So the
cache can make a run faster but never different, beyond the rounding of a forward pass in another batch
composition (a teacher row does not depend on the rest of its batch in eval mode, but a BLAS kernel's
summation order may).

With ``path`` the cache persists across runs (the benchmark's seeds and methods share one teacher): it is
loaded at start and written at :meth:`close` (atomically, so parallel workers never read a torn file).
The file name carries the teacher's fingerprint, the data's fingerprint and the taps; a file whose
manifest disagrees with its name is refused with an error that names it. The file also carries a digest of
every stored tensor and of the manifest (:mod:`alambic.integrity`): a damaged file (a flipped bit, a torn
copy, no digest because an older alambic wrote it) is never served: its rows are computed again and the file
rewritten, with one line on stderr naming it. The cache folder and file are never writable by other users
(:mod:`alambic.cache_dir`), who could otherwise poison every later run's teacher outputs.

Only frozen networks are cached: an EMA or transfer teacher changes every step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from alambic.cache_dir import make_dirs
from alambic.data.batch import INPUT, Batch
from alambic.errors import AlambicError, WriteError
from alambic.teachers.base import ModelOutput

CACHE_VERSION = 1
# relative tolerance on input keys: far above float64 rounding of one dot product, far below what any
# changed pixel moves a key by (|w_j| ~ 1 times the change)
KEY_TOLERANCE = 1e-9
_REPORTED: set[str] = set()  # damaged cache files already named on stderr by this process


def input_keys(x: Tensor) -> Tensor:
    """[B] float64 fingerprints of the rows of ``x`` [B, ...]: ``x_flat · w`` with ``w`` fixed by the row size.

    Equal inputs give equal keys; a changed pixel, a rotation or a permutation of the row changes the key
    (``w`` is random, so no symmetry of the input survives it), which a plain sum would not."""
    flat = x.reshape(len(x), -1).to(torch.float64)
    return (flat * _key_weights(flat.shape[1])).sum(1)


@functools.lru_cache(maxsize=8)
def _key_weights(size: int) -> Tensor:
    """The fixed random vector of :func:`input_keys` for rows of ``size`` values, drawn once per size (it is
    asked for on every batch) from a generator seeded with the size."""
    return torch.randn(size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)


class CachedTeacher:
    """Serves ``teacher``'s outputs for the ``"input"`` view from a per-sample cache; other views run live.

    Args:
        teacher: a frozen teacher (``outputs``, ``fingerprint``, optionally ``use_taps``/``close``).
        num_samples: one more than the largest sample index it will see (the dataset's row count).
        path: folder of the on-disk cache, or None for memory only.
        data_fingerprint: the data's fingerprint, part of the file name (required with ``path``).
    """

    def __init__(self, teacher: Any, num_samples: int, path: str | Path | None = None,
                 data_fingerprint: str | None = None):
        if path is not None and not data_fingerprint:
            raise ValueError("an on-disk teacher cache needs the data's fingerprint")
        self.teacher, self.num_samples = teacher, int(num_samples)
        self.folder = Path(path) if path is not None else None
        self.data_fingerprint = data_fingerprint
        self.taps: tuple[str, ...] = ()
        self.hits = self.misses = 0
        self._reset()

    # -- the Teacher protocol -----------------------------------------------------------------------------

    def use_taps(self, paths: Sequence[str]) -> None:
        paths = tuple(paths)
        if hasattr(self.teacher, "use_taps"):
            self.teacher.use_taps(paths)
        elif paths:
            raise AlambicError(f"{type(self.teacher).__name__} has no taps to cache")
        if paths != self.taps:
            self.taps = paths
            self._reset()

    @torch.no_grad()
    def outputs(self, batch: Batch, views: Sequence[str]) -> dict[str, ModelOutput]:
        out = {}
        live = [v for v in views if v != INPUT]
        if live:
            out.update(self.teacher.outputs(batch, live))
        if INPUT in views:
            out[INPUT] = self._cached(batch)
        return {v: out[v] for v in views}

    def after_step(self, student: nn.Module, step: int) -> None:
        return None

    def fingerprint(self) -> str:
        return self.teacher.fingerprint()

    def close(self) -> None:
        """Write the cache to disk if it learned anything, then release the wrapped teacher.

        Closing removes the wrapped teacher's taps, so from here on the cache serves logits only (what the
        evaluation after training reads) and writes nothing more to disk."""
        if self.folder is not None and self._dirty:
            try:
                self.save()
            except WriteError as exc:  # a cache only saves time: the run goes on without it
                print(f"note: {exc}; the run goes on, the next one computes the teacher again", file=sys.stderr)
        if hasattr(self.teacher, "close"):
            self.teacher.close()
        self.taps, self.folder = (), None

    # -- the cache ----------------------------------------------------------------------------------------

    @property
    def file(self) -> Path | None:
        if self.folder is None:
            return None
        taps = hashlib.sha256("|".join(self.taps).encode()).hexdigest()[:8]
        return self.folder / f"{self.teacher.fingerprint()}-{self.data_fingerprint}-{taps}.safetensors"

    def _manifest(self) -> dict[str, Any]:
        return {"version": CACHE_VERSION, "teacher": self.teacher.fingerprint(), "data": self.data_fingerprint,
                "taps": list(self.taps), "num_samples": self.num_samples}

    def _reset(self) -> None:
        self.filled = torch.zeros(self.num_samples, dtype=torch.bool)
        self.keys = torch.zeros(self.num_samples, dtype=torch.float64)
        self.store: dict[str, Tensor] = {}  # "logits" and "feature:<tap>" -> [N, ...]
        self._dirty = False
        if self.file is not None and self.file.is_file():
            self._load(self.file)

    def _cached(self, batch: Batch) -> ModelOutput:
        x, index = batch.views[INPUT], batch.index.cpu()  # the store lives on the CPU, whatever the device
        if len(index) and int(index.max()) >= self.num_samples:
            raise AlambicError(f"teacher cache: sample index {int(index.max())} is beyond the {self.num_samples} "
                               "samples it was made for")
        keys = input_keys(x).cpu()
        known = self.keys[index]
        hit = self.filled[index] & ((known - keys).abs() <= KEY_TOLERANCE * (1 + keys.abs()))
        n_miss = int((~hit).sum())
        self.hits, self.misses = self.hits + len(index) - n_miss, self.misses + n_miss
        if n_miss == len(index):  # the whole batch is new: its live outputs are the answer, as computed
            fresh = self.teacher.outputs(batch, [INPUT])[INPUT]
            self._put(index, keys, fresh)
            return fresh
        if n_miss:
            miss = ~hit
            self._put(index[miss], keys[miss], self.teacher.outputs(batch.select(miss.to(x.device)), [INPUT])[INPUT])
        logits = self.store["logits"][index] if "logits" in self.store else None
        feats = {tap: self.store[f"feature:{tap}"][index] for tap in self.taps}
        return ModelOutput(logits, feats)

    def _put(self, index: Tensor, keys: Tensor, out: ModelOutput) -> None:
        rows = {"logits": out.logits} if out.logits is not None else {}
        rows.update({f"feature:{tap}": out.features[tap] for tap in self.taps})
        for name, value in rows.items():
            if name not in self.store:
                self.store[name] = torch.zeros((self.num_samples, *value.shape[1:]), dtype=value.dtype)
            self.store[name][index] = value.detach().cpu()
        self.filled[index] = True
        self.keys[index] = keys
        self._dirty = True

    def save(self) -> Path:
        from alambic.train.state import atomic_save

        assert self.file is not None
        make_dirs(self.file.parent)  # never group- or world-writable, whatever the umask
        atomic_save({"filled": self.filled, "keys": self.keys, **self.store}, self._manifest(), self.file,
                    what="teacher cache")
        os.chmod(self.file, 0o644)  # shared by every run (and user) of this teacher and data, like the glyph cache
        self._dirty = False
        return self.file

    def _load(self, file: Path) -> None:
        from alambic.train.state import load

        try:
            tensors, meta = load(file, what="teacher cache", require_digest=True)
        except AlambicError as exc:  # damaged, torn or unverifiable: recompute (never serve) and rewrite it
            if str(file) not in _REPORTED:
                _REPORTED.add(str(file))
                print(f"note: {exc}; recomputing its rows and rewriting it", file=sys.stderr)
            self._dirty = True
            return
        want = self._manifest()
        if meta != want:
            diff = sorted(k for k in want if meta.get(k) != want[k])
            raise AlambicError(f"teacher cache {file} does not match this teacher and data (differs in "
                               f"{', '.join(diff)}: {json.dumps({k: meta.get(k) for k in diff})}); delete it")
        self.filled, self.keys = tensors.pop("filled"), tensors.pop("keys")
        self.store = tensors

    def stats(self) -> dict[str, Any]:
        """Hits and misses so far (rows served from the cache vs computed live) and the cached row count."""
        return {"hits": self.hits, "misses": self.misses, "cached_rows": int(self.filled.sum()),
                "file": None if self.file is None else str(self.file)}
