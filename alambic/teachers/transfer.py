"""A separately trained model that teaches twice: through its outputs, and by pulling the student's weights.

MACIL-SD (Yu et al., "Modality-Aware Contrastive Instance Learning with Self-Distillation for Weakly-
Supervised Audio-Visual Violence Detection", 2022, arXiv:2207.05500) trains a light unimodal network
beside the multimodal student. After each epoch it moves the parameters the two share toward that
network: ``θ_S ← m·θ_S + (1 − m)·θ_src``, with ``m`` rising on a cosine from 0.91 to 1 over training.
Parameters the other network lacks (or that a user excludes) are left alone. This is the mean-teacher
average (Tarvainen & Valpola, 2017, arXiv:1703.01780, Eq. 1) run the other way: the student moves, the
teacher stays put. So the teacher is a :class:`~alambic.teachers.frozen.FrozenTeacher` (eval mode, no
gradients, constant fingerprint). Its outputs can still drive a KD loss, and :meth:`TransferTeacher.after_step`
does the transfer.

Names are matched explicitly rather than by position. Models with different heads, or a source that is a
sub-module of the student, are the normal case: a silent positional match would average unrelated tensors.
"""

from __future__ import annotations

import fnmatch
from typing import Mapping, Sequence

import torch
from torch import Tensor, nn

from alambic.errors import AlambicError
from alambic.teachers.ema import check_schedule, momentum_schedule, scheduled_momentum
from alambic.teachers.frozen import FrozenTeacher


def _source_name(name: str, name_map: Mapping[str, str]) -> tuple[str, bool]:
    """The source name for dst ``name`` and whether ``name_map`` chose it (an exact key, else the longest
    matching prefix key ending in ``"."``)."""
    if name in name_map:
        return name_map[name], True
    prefixes = [k for k in name_map if k.endswith(".") and name.startswith(k)]
    if prefixes:
        key = max(prefixes, key=len)
        return name_map[key] + name[len(key):], True
    return name, False


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


@torch.no_grad()
def param_transfer(dst: nn.Module, src: nn.Module, momentum: float, name_map: Mapping[str, str] | None = None,
                   skip: Sequence[str] = ()) -> list[str]:
    """Move ``dst``'s floating parameters and buffers toward ``src``'s in place: ``d ← m·d + (1 − m)·s``.

    The source of dst name ``n`` is ``name_map[n]``, or the longest prefix key of ``name_map`` ending in
    ``"."`` rewritten to its value (``{"att_mmil.fc.": "fc."}`` maps ``att_mmil.fc.weight`` to
    ``fc.weight``), or ``n`` itself. Names matching an ``fnmatch`` pattern in ``skip`` are left untouched.
    Integer buffers are never touched. A dst name with no source of that name is left alone. A mapped name
    whose source is missing, or any source of another shape, raises :class:`AlambicError`, as does a
    transfer that matches nothing. Everything is checked before anything is written, so an error leaves
    ``dst`` unchanged. Returns the dst names that were updated (with ``m = 1``, listed but unchanged).
    """
    if not 0.0 <= momentum <= 1.0:
        raise AlambicError(f"param_transfer: momentum must be in [0, 1], got {momentum}")
    name_map = dict(name_map or {})
    skip = [skip] if isinstance(skip, str) else list(skip)
    d_state, s_state = dst.state_dict(), src.state_dict()
    d_kind, s_kind = type(dst).__name__, type(src).__name__
    for key in name_map:
        known = any(n.startswith(key) for n in d_state) if key.endswith(".") else key in d_state
        if not known:
            raise AlambicError(f"param_transfer: name_map key '{key}' names nothing in {d_kind} "
                               f"(its names start {', '.join(list(d_state)[:4])}, ...)")
    pairs: list[tuple[str, Tensor, Tensor]] = []
    for name, d in d_state.items():
        if not d.dtype.is_floating_point or any(fnmatch.fnmatchcase(name, p) for p in skip):
            continue
        source, mapped = _source_name(name, name_map)
        s = s_state.get(source)
        if s is None:
            if mapped:
                raise AlambicError(f"param_transfer: {d_kind}.{name} {_shape(d)} is mapped to {s_kind}.{source}, "
                                   f"which {s_kind} does not have")
            continue
        if s.shape != d.shape:
            hint = "" if mapped else f" (add '{name}' to skip, or map it in name_map)"
            raise AlambicError(f"param_transfer: {d_kind}.{name} has shape {_shape(d)} but {s_kind}.{source} "
                               f"has shape {_shape(s)}{hint}")
        pairs.append((name, d, s))
    if not pairs:
        raise AlambicError(f"param_transfer: no parameter of {d_kind} matches {s_kind} by name and shape "
                           f"({d_kind} starts {', '.join(list(d_state)[:3])}; {s_kind} starts "
                           f"{', '.join(list(s_state)[:3])}): pass name_map")
    if momentum != 1.0:  # m = 1 is exactly the identity; skip the arithmetic (0·inf would be nan)
        for _, d, s in pairs:
            d.mul_(momentum).add_(s.detach().to(device=d.device, dtype=d.dtype), alpha=1 - momentum)
    return [name for name, _, _ in pairs]


class TransferTeacher(FrozenTeacher):
    """A frozen ``source`` model whose outputs teach like any frozen teacher, and which also pulls the
    student's matching parameters toward its own every ``every`` optimizer steps (MACIL-SD: once per epoch,
    ``every = steps_per_epoch``). The momentum of update ``u`` follows
    :func:`~alambic.teachers.ema.momentum_schedule` over ``total_steps // every`` updates. The default runs
    0.91 -> 1, so the last update leaves the student as it is.
    """

    def __init__(self, source: nn.Module, momentum: float = 0.91, end_momentum: float | None = 1.0,
                 total_steps: int = 0, every: int = 1, name_map: Mapping[str, str] | None = None,
                 skip: Sequence[str] = ()):
        check_schedule(type(self).__name__, momentum, end_momentum, every)
        super().__init__(source)
        self.momentum, self.end_momentum, self.total_steps, self.every = momentum, end_momentum, total_steps, every
        self.name_map = dict(name_map or {})
        self.skip = [skip] if isinstance(skip, str) else list(skip)
        self.schedule = momentum_schedule(total_steps // every, momentum, end_momentum)
        self.updated: list[str] = []  # the student names the last transfer moved

    def after_step(self, student: nn.Module, step: int) -> None:
        m = scheduled_momentum(self.schedule, step, self.every, self.momentum)
        if m is not None:
            self.updated = param_transfer(student, self.model, m, self.name_map, self.skip)
