"""Checkpoints: one safetensors file with the JSON metadata in its header, written atomically.

Loading never unpickles: tensors come from safetensors, everything else from JSON. A checkpoint is
written to a temporary file in the same directory, flushed to disk, then moved over the previous one
with ``os.replace`` (atomic on POSIX), so a kill at any moment leaves either the old or the new
checkpoint, never half of one. A write that fails (a full disk) raises a one-line
:class:`~alambic.errors.WriteError` and leaves the previous file as it was.

Integrity: the header also holds a digest of every tensor and of the metadata
(:mod:`alambic.integrity`), checked by :func:`load`; a damaged file is refused with an
:class:`~alambic.errors.IntegrityError` naming it and the damaged tensor. Checkpoints written before
digests existed load unverified (a run started by an older alambic still resumes).
:func:`check_checkpoint` then validates the metadata against the resuming run (the one place that knows
its structure), so a malformed or out-of-range checkpoint is one line, never a traceback.
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from alambic.cache_dir import not_writable_by_others
from alambic.errors import AlambicError, CheckpointError, IntegrityError, WriteError
from alambic.integrity import DIGEST_KEY, verify, with_digest

META_KEY = "alambic"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``, so a reader
    (or a resumed run) sees the old file or the whole new one, never half of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")  # reports hold ±, —: not the locale's encoding
        not_writable_by_others(tmp)  # never group/world-writable, whatever the umask (a cache file may go here)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(tensors: dict[str, Tensor], meta: dict[str, Any], path: Path, what: str = "checkpoint") -> None:
    """Write ``tensors`` and the JSON ``meta`` (plus their digest) to ``path`` atomically.

    The file is never group- or world-writable. If the write fails (``OSError``, a safetensors I/O error:
    a full disk, a lost mount) a one-line :class:`WriteError` names ``what`` and ``path``; the previous
    file at ``path`` is untouched and no temporary file is left."""
    path = Path(path)
    existed = path.exists()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(tensors, str(tmp), metadata=with_digest(tensors, {META_KEY: json.dumps(meta)}))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        not_writable_by_others(tmp)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except (OSError, SafetensorError) as exc:
        kept = f"the previous {what} is intact" if existed else f"no {what} was written"
        raise WriteError(f"could not write {what} {path}: {_reason(exc)}; {kept}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _reason(exc: BaseException) -> str:
    """The operating system's words for a failed write (safetensors wraps them in a Rust debug string)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.search(r'message: "([^"]+)"', str(exc))
    return found.group(1) if found else " ".join(str(exc).split()) or type(exc).__name__


def load(path: Path, what: str = "checkpoint",
         require_digest: bool = False) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and JSON metadata of a file :func:`atomic_save` wrote, verified against its digest.

    Raises :class:`AlambicError` (one line, naming ``what`` and ``path``) for a missing or unreadable
    file and :class:`IntegrityError` for a damaged one. A file without a digest (an older alambic's) is
    accepted unverified unless ``require_digest``; but one whose header holds anything besides the
    metadata is damaged (a flipped bit in the digest's own name)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            header = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except FileNotFoundError:
        raise AlambicError(f"{what} not found: {path}") from None
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise AlambicError(f"{what} {path} is unreadable ({type(exc).__name__}: {exc})") from None
    if DIGEST_KEY not in header and set(header) - {META_KEY}:
        raise IntegrityError(f"{what} {path} is damaged: its header holds unknown entries "
                             f"{sorted(set(header) - {META_KEY})} and no digest")
    verify(tensors, header, path, what, required=require_digest)
    try:
        meta = json.loads(header.get(META_KEY, "{}"))
    except ValueError as exc:
        raise AlambicError(f"{what} {path} is unreadable (its metadata is not JSON: {exc})") from None
    if not isinstance(meta, dict):
        raise AlambicError(f"{what} {path} is unreadable (its metadata is a {type(meta).__name__}, not an object)")
    return tensors, meta


# --- what a checkpoint must hold to resume a run -----------------------------------------------------


def _is_int(x: Any) -> bool:
    return type(x) is int


def check_checkpoint(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any], *, total_steps: int,
                     steps_per_epoch: int, epochs: int, optimizer: torch.optim.Optimizer,
                     modules: dict[str, nn.Module], teacher_fingerprint: str | None,
                     teacher_name: str = "teacher") -> None:
    """Raise a one-line :class:`CheckpointError` naming ``path`` unless the checkpoint fits this run.

    Checks every key :meth:`Trainer.load_checkpoint` reads (present, of the right type, in range: ``0 <=
    step <= total_steps``, ``0 <= pos < steps_per_epoch``, the step where that epoch and position put it),
    the optimizer's groups and per-parameter state, the RNG states (applied to scratch generators), the
    tensors of each module in ``modules`` (names and shapes) and the teacher's fingerprint. Nothing of the
    run is changed, so a refused checkpoint leaves the trainer as it was."""

    def fail(problem: str) -> None:
        raise CheckpointError(f"checkpoint {path} {problem}")

    for key in ("step", "epoch", "pos", "total_steps", "optim", "rng"):
        if key not in meta:
            fail(f"lacks '{key}' in its metadata")
    for key in ("step", "epoch", "pos", "total_steps") + (("steps_per_epoch",) if "steps_per_epoch" in meta else ()):
        if not _is_int(meta[key]):
            fail(f"has '{key}' = {meta[key]!r}, not an integer")
    if meta["total_steps"] != total_steps:
        fail(f"was made for {meta['total_steps']} steps, this run has {total_steps}: the recipe or data "
             "changed since (start a new run directory)")
    if meta.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        fail(f"was made for {meta['steps_per_epoch']} steps per epoch, this run has {steps_per_epoch}: the "
             "data or batch size changed since (start a new run directory)")
    step, epoch, pos = meta["step"], meta["epoch"], meta["pos"]
    if not 0 <= step <= total_steps:
        fail(f"has step {step}, outside [0, {total_steps}]")
    if not 0 <= epoch <= epochs:
        fail(f"has epoch {epoch}, outside [0, {epochs}]")
    if not 0 <= pos < steps_per_epoch:
        fail(f"has pos {pos}, outside [0, {steps_per_epoch})")
    if step != min(epoch * steps_per_epoch + pos, total_steps):
        fail(f"has step {step}, but epoch {epoch} and pos {pos} at {steps_per_epoch} steps per epoch "
             f"put it at {min(epoch * steps_per_epoch + pos, total_steps)}")
    wall = meta.get("wall_time_s", 0.0)
    if type(wall) not in (int, float) or not wall >= 0:
        fail(f"has 'wall_time_s' = {wall!r}, not a duration in seconds")

    fp = meta.get("teacher")
    if fp is not None and fp != teacher_fingerprint:
        if teacher_fingerprint is None:
            fail(f"was made with a teacher (fingerprint {fp}), this run has none")
        fail(f"was made with teacher fingerprint {fp}, but this run's teacher ({teacher_name}) has "
             f"{teacher_fingerprint}: the teacher changed since the run started (restore it, or start a new run "
             "directory)")

    _check_optimizer(meta["optim"], unprefixed("optim", tensors), optimizer, fail)
    _check_rng(meta["rng"], unprefixed("rng", tensors), fail)
    for prefix, module in modules.items():
        _check_module(prefix, module, unprefixed(prefix, tensors), fail)


def _check_module(prefix: str, module: nn.Module, given: dict[str, Tensor], fail) -> None:
    want = module.state_dict()
    missing = sorted(f"{prefix}.{k}" for k in want if k not in given)
    unexpected = sorted(f"{prefix}.{k}" for k in given if k not in want)
    shapes = [f"{prefix}.{k} {tuple(given[k].shape)} vs {tuple(want[k].shape)}" for k in sorted(want)
              if k in given and torch.is_tensor(want[k]) and given[k].shape != want[k].shape]
    problems = [f"{what}: {_listing(keys)}" for what, keys in
                (("missing tensors", missing), ("unexpected tensors", unexpected), ("other shapes", shapes)) if keys]
    if problems:
        fail(f"does not fit this run's {prefix} ({'; '.join(problems)})")


def _check_optimizer(m: Any, given: dict[str, Tensor], optimizer: torch.optim.Optimizer, fail) -> None:
    if not isinstance(m, dict):
        fail(f"has 'optim' = {type(m).__name__}, not an object")
    for key in ("param_groups", "scalars"):
        if key not in m:
            fail(f"lacks 'optim.{key}' in its metadata")
    groups, scalars = m["param_groups"], m["scalars"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                               and all(_is_int(p) for p in g["params"]) for g in groups):
        fail("has malformed 'optim.param_groups' (a list of groups, each with a 'params' list of integers)")
    if len(groups) != len(optimizer.param_groups):
        fail(f"has {len(groups)} optimizer parameter groups, this run's optimizer has "
             f"{len(optimizer.param_groups)} (a different number of parameter groups)")
    params = {}
    for i, (saved, live) in enumerate(zip(groups, optimizer.param_groups)):
        if len(saved["params"]) != len(live["params"]):
            fail(f"has {len(saved['params'])} parameters in optimizer group {i}, this run has {len(live['params'])}")
        params.update(zip(saved["params"], live["params"]))
    if not isinstance(scalars, dict):
        fail(f"has 'optim.scalars' = {type(scalars).__name__}, not an object")
    for name, value in list(scalars.items()) + list(given.items()):
        pid, _, key = name.partition(".")
        if not pid.isdigit() or int(pid) not in params or not key:
            fail(f"has optimizer state '{name}' for no parameter of this run")
        if torch.is_tensor(value):
            if value.numel() > 1 and value.shape != params[int(pid)].shape:
                fail(f"has optimizer state 'optim.{name}' of shape {tuple(value.shape)}, its parameter has "
                     f"{tuple(params[int(pid)].shape)}")
        elif value is not None and type(value) not in (int, float, bool):
            fail(f"has optimizer state 'optim.scalars.{name}' = {value!r}, not a number")


def _check_rng(m: Any, given: dict[str, Tensor], fail) -> None:
    if not isinstance(m, dict) or "numpy" not in m or "python" not in m:
        fail("has malformed 'rng' metadata (an object with 'numpy' and 'python')")
    if "torch" not in given:
        fail("lacks the tensor 'rng.torch'")
    try:
        torch.Generator().set_state(given["torch"])
    except (RuntimeError, TypeError, ValueError) as exc:
        fail(f"has an unusable 'rng.torch' ({one_line(exc)})")
    try:
        kind, keys, pos, has_gauss, cached = m["numpy"]
        np.random.RandomState().set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (TypeError, ValueError, OverflowError) as exc:
        fail(f"has an unusable 'rng.numpy' ({one_line(exc)})")
    try:
        random.Random().setstate(_to_tuple(m["python"]))
    except (TypeError, ValueError, OverflowError) as exc:
        fail(f"has an unusable 'rng.python' ({one_line(exc)})")


def _listing(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# --- pieces of training state -------------------------------------------------------------------------


def prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}.{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def module_state(module: nn.Module) -> dict[str, Tensor]:
    """A state_dict with storage-sharing tensors cloned apart (safetensors refuses shared storage)."""
    seen: set[int] = set()
    out = {}
    for k, v in module.state_dict().items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer's state_dict into tensors and JSON (param groups, scalar state)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> tuple[dict[str, Tensor], dict[str, Any]]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return (
        {"torch": torch.get_rng_state()},
        {
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": _to_json(random.getstate()),
        },
    )


def set_rng_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuple(meta["python"]))


def _to_json(x: Any) -> Any:
    return [_to_json(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x
