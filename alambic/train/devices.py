"""Where a run computes and in which precision: ``train.device``, ``teacher.device``, ``train.precision``.

The loop moves each batch once per step (:func:`move_batch`; on CUDA, from page-locked memory with
``non_blocking=True`` unless ``train.pin_memory: false``), runs teacher, student and method loss under
``torch.autocast(device_type, dtype)`` for ``bf16``/``fp16``, and backpropagates outside it; the losses in
:mod:`alambic.losses` upcast their softmaxes to fp32 themselves, so a bf16 forward never takes a bf16
softmax. ``fp16`` adds a :class:`torch.amp.GradScaler`, whose state the checkpoint keeps (resume is exact).
Checkpoints hold CPU tensors (:func:`alambic.train.state.atomic_save`) and are mapped onto the run's device
when loaded (``load_state_dict`` copies into the live tensors), so a CUDA checkpoint resumes on a CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from alambic.data.batch import Batch
from alambic.errors import AlambicError
from alambic.teachers.base import ModelOutput

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str | None, what: str = "train.device") -> torch.device:
    """``auto | cpu | cuda | cuda:N | mps`` -> a :class:`torch.device`; a one-line error when it is absent here."""
    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AlambicError(f"{what}: {name} was asked for but this machine has no usable CUDA device "
                               f"(torch {torch.__version__}, cuda build {torch.version.cuda}): use {what}=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AlambicError(f"{what}: {name} was asked for but this machine has {torch.cuda.device_count()} "
                               "CUDA device(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AlambicError(f"{what}: mps was asked for but this machine has no usable MPS device: use {what}=cpu")
    return device


def autocast(device: torch.device, precision: str):
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_precision(device: torch.device, precision: str) -> None:
    """A one-line error for a precision the device cannot autocast to."""
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise AlambicError(f"train.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}: "
                           "use fp16 or fp32")


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """fp16 only: a dynamic loss scale keeps small gradients from flushing to zero (bf16 has fp32's range)."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def pins(device: torch.device, pin_memory: bool) -> bool:
    """Whether batches go to ``device`` from page-locked host memory (``train.pin_memory``): only a CUDA
    device has a pinned-memory allocator and copies from it asynchronously."""
    return bool(pin_memory) and device.type == "cuda"


def move_batch(batch: Batch, device: torch.device, pin: bool = False) -> Batch:
    """``batch`` on ``device``. With ``pin`` (:func:`pins`) each tensor is first in page-locked memory (a
    loader that gathers into it already, such as a pinned :class:`~alambic.data.loader.TensorLoader`, costs
    nothing here) and is copied with ``non_blocking=True``: the host goes on queueing work while the copy
    runs, and CUDA orders the copy before the kernels that read it."""
    if not pin:
        return batch.to(device)

    def move(t: Tensor | None) -> Tensor | None:
        if t is None:
            return None
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)

    return replace(batch, views={k: move(v) for k, v in batch.views.items()}, index=move(batch.index),
                   target=move(batch.target), labeled=move(batch.labeled),
                   extras={k: move(v) for k, v in batch.extras.items()})


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter or buffer (cpu for a module without tensors)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def move_outputs(outputs: Mapping[str, ModelOutput] | None, device: torch.device) -> dict[str, ModelOutput] | None:
    """Teacher outputs moved to the student's ``device`` (a no-op for tensors already there)."""
    return _map_outputs(outputs, lambda t: t.to(device, non_blocking=True))


def float_outputs(outputs: Mapping[str, ModelOutput] | None) -> dict[str, ModelOutput] | None:
    """Outputs with half-precision tensors (an autocast forward's) in float32, for the method's loss: the loop
    runs every method outside autocast on these, so no method's softmax, distance or similarity is taken in
    bf16/fp16 (the cast is differentiable; gradients flow back into the half-precision graph)."""
    return _map_outputs(outputs, lambda t: t.float() if t.dtype in (torch.float16, torch.bfloat16) else t)


def _map_outputs(outputs, fn) -> dict[str, ModelOutput] | None:
    if outputs is None:
        return None
    return {view: _map_output(out, fn) for view, out in outputs.items()}


def _map_output(out: ModelOutput, fn) -> ModelOutput:
    def apply(t: Any) -> Any:
        return fn(t) if isinstance(t, Tensor) else t

    extra = {k: apply(v) for k, v in vars(out).items() if k not in ("logits", "features", "members")}
    return type(out)(apply(out.logits), {k: apply(v) for k, v in out.features.items()},
                     [_map_output(m, fn) for m in out.members], **extra)


def place_teacher(teacher: Any, device: torch.device) -> None:
    """Move a network teacher (frozen, EMA, transfer source, each member of an ensemble, the network behind a
    cache) to ``device``. Analytic and cached teachers keep their CPU-side state (an estimator, the cache
    store) and take batches on any device; the loop moves every teacher's outputs to the student's device."""
    for t in getattr(teacher, "teachers", None) or []:
        place_teacher(t, device)
    inner = getattr(teacher, "teacher", None)
    if inner is not None:
        place_teacher(inner, device)
    model = getattr(teacher, "model", None)
    if isinstance(model, nn.Module):
        model.to(device)
