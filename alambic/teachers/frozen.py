"""A frozen network as teacher: eval mode and no gradients, enforced rather than assumed.

torchdistill leaves the teacher in train mode, so its BatchNorm running statistics drift with every
student batch. Here the wrapped model is put in eval mode on every call (whatever else toggled it), its
parameters have ``requires_grad=False`` and its forward runs under ``torch.no_grad``: neither weights nor
buffers can change during distillation, and a test proves it.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import nn

from alambic.data.batch import Batch
from alambic.models.taps import Taps
from alambic.teachers.base import ModelOutput


def model_outputs(model: nn.Module, batch: Batch, views: Sequence[str], taps: Taps | None) -> dict[str, ModelOutput]:
    """Run ``model`` on each view of ``batch``, collecting the tapped features of each forward pass."""
    outs = {}
    for view in views:
        logits = model(batch.views[view])
        outs[view] = ModelOutput(logits, taps.take() if taps is not None else {})
    return outs


def on_model_device(batch: Batch, model: nn.Module) -> Batch:
    """``batch`` on the device of ``model``'s parameters (the teacher may sit on another device than the student)."""
    for p in model.parameters():
        return batch.to(p.device) if batch.index.device != p.device else batch
    return batch


def state_fingerprint(module: nn.Module, *extra: str) -> str:
    """sha256 over the class name, every parameter and buffer (name, dtype, shape, bytes) and ``extra``."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for e in extra:
        h.update(e.encode())
    return h.hexdigest()[:16]


class FrozenTeacher:
    """A trained ``nn.Module`` that teaches without ever changing.

    ``shard="fsdp"`` (``teacher.shard``): on several processes the Trainer shards ``model`` over the ranks
    (:func:`alambic.train.fsdp.shard_teacher`) and gathers it back at the end of training; one process: no effect."""

    def __init__(self, model: nn.Module, taps: Sequence[str] = (), shard: str = "none"):
        if shard not in ("none", "fsdp"):
            raise ValueError(f"shard must be 'none' or 'fsdp', not {shard!r}")
        self.shard = shard
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._taps: Taps | None = None
        self.use_taps(taps)
        self._fingerprint: str | None = None

    def use_taps(self, paths: Sequence[str]) -> None:
        """Capture these intermediate outputs (as ``ModelOutput.features``) from now on."""
        if self._taps is not None:
            self._taps.remove()
        self._taps = Taps(self.model, paths, detach=True).attach() if paths else None

    @torch.no_grad()
    def outputs(self, batch: Batch, views: Sequence[str]) -> dict[str, ModelOutput]:
        if self.model.training:
            self.model.eval()
        return model_outputs(self.model, on_model_device(batch, self.model), views, self._taps)

    def after_step(self, student: nn.Module, step: int) -> None:
        return None

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = state_fingerprint(self.model)
        return self._fingerprint

    def close(self) -> None:
        """Remove the tap hooks (the model is left exactly as it was given, minus train mode/grads)."""
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
