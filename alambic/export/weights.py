"""Weights to and from safetensors files.

safetensors (https://github.com/huggingface/safetensors) stores raw tensors and a JSON header, so loading
runs no code, unlike a pickled ``torch.save`` checkpoint. It refuses tensors that share storage (tied
weights, views of one buffer) and non-contiguous ones; :func:`state_dict_tensors` therefore stores a
contiguous, detached CPU clone of every entry. Tied weights are thus written once per name, which keeps the
file loadable with a plain ``safetensors.torch.load_file`` + ``load_state_dict(strict=True)`` anywhere.

Files are written atomically (a temporary file in the same directory, then :func:`os.replace`), so an
interrupted export never leaves a truncated file under the final name; a failed write (a full disk) is a
one-line :class:`~alambic.errors.WriteError` naming the file.

Integrity: the header carries a digest of every tensor and of the metadata (:mod:`alambic.integrity`, under
``alambic.digest``, which plain safetensors readers ignore). :func:`load_weights` checks it and refuses a
bit-flipped or edited file with an :class:`~alambic.errors.IntegrityError` naming it and the damaged
tensor. A file without a digest (a student.safetensors of an older alambic, or weights from another tool)
is accepted as it is: there is nothing to check it against.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as _save_bytes
from torch import Tensor, nn

from alambic.errors import AlambicError, WriteError
from alambic.integrity import verify, with_digest

__all__ = ["export_safetensors", "load_weights", "serialize", "state_dict_tensors"]

#: Written unless the caller sets it: Hugging Face loaders check for ``format == "pt"``.
DEFAULT_METADATA = {"format": "pt"}


def state_dict_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The model's ``state_dict`` as contiguous, detached CPU clones that share no storage."""
    tensors = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, Tensor):
            raise AlambicError(
                f"cannot save '{key}' to safetensors: it is a {type(value).__name__}, not a tensor "
                "(a module's get_extra_state?)"
            )
        tensors[key] = value.detach().to("cpu").contiguous().clone()
    return tensors


def _metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    merged = dict(DEFAULT_METADATA)
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise AlambicError(
                f"safetensors metadata must map str to str, got {key!r}: {value!r} "
                f"({type(value).__name__}); serialise it, e.g. with json.dumps"
            )
        merged[key] = value
    return merged


def serialize(model: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    """The exact bytes :func:`export_safetensors` writes for ``model`` (and ``metadata``, plus the digest)."""
    tensors = state_dict_tensors(model)
    return _save_bytes(tensors, metadata=with_digest(tensors, _metadata(metadata)))


def _write_file(fh, data: bytes) -> None:
    fh.write(data)
    fh.flush()
    os.fsync(fh.fileno())


def export_safetensors(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model.state_dict()`` to ``path`` as safetensors, atomically; returns the path.

    ``metadata`` (str -> str) goes into the file header, next to ``format: pt``.
    """
    path = Path(path)
    data = serialize(model, metadata)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            _write_file(f, data)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(exc, OSError):
            kept = "the previous file is intact" if path.exists() else "nothing was written"
            raise WriteError(f"could not write {path}: {exc.strerror or exc}; {kept}") from None
        raise
    return path


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a safetensors file into ``model`` strictly; returns the model.

    Every key must match in name and shape (dtypes are cast, as ``load_state_dict`` does). Otherwise an
    :class:`AlambicError` lists the missing keys, the unexpected keys and each shape mismatch with both
    shapes, all in one message, so one run shows everything that is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise AlambicError(f"load_weights: {path} not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = fh.metadata() or {}
            loaded = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise AlambicError(f"load_weights: {path} is not a readable safetensors file ({e})") from e
    verify(loaded, header, path, "load_weights: weights file")
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in loaded)
    unexpected = sorted(k for k in loaded if k not in expected)
    mismatched = [
        f"{k}: file {tuple(loaded[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(expected)
        if k in loaded and isinstance(expected[k], Tensor) and loaded[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if mismatched:
        problems.append(f"shape mismatch: {_listing(mismatched)}")
    if problems:
        raise AlambicError(f"load_weights: {path} does not fit {type(model).__name__}: " + "; ".join(problems))
    with torch.no_grad():
        model.load_state_dict(loaded, strict=True)
    return model
