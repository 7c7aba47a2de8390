"""Several teachers behind one: the ensemble's prediction plus every member's own outputs.

``logits`` is the log of the members' mean class probability (so ``kd`` with several teachers distils
the averaged ensemble, as Baby Llama does with two teachers); ``members`` keeps each teacher's output for
methods that weigh or pick teachers themselves (DistillWeighted / DistillNearest).
"""

from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
from torch import nn

from alambic.data.batch import Batch
from alambic.teachers.base import ModelOutput, Teacher


def ensemble_logits(member_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """``log(mean_k softmax(z_k))``: logits whose softmax is the members' average distribution."""
    stacked = torch.stack([z.log_softmax(-1) for z in member_logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(member_logits))


class TeacherEnsemble:
    def __init__(self, teachers: Sequence[Teacher]):
        if not teachers:
            raise ValueError("an ensemble needs at least one teacher")
        self.teachers = list(teachers)

    def outputs(self, batch: Batch, views: Sequence[str]) -> dict[str, ModelOutput]:
        per_teacher = [t.outputs(batch, views) for t in self.teachers]
        out = {}
        for view in views:
            members = [p[view] for p in per_teacher]
            logits = [m.logits for m in members]
            joint = ensemble_logits(logits) if all(z is not None for z in logits) else None
            out[view] = ModelOutput(joint, {}, members)
        return out

    def use_taps(self, paths: Sequence[str]) -> None:
        for t in self.teachers:
            if hasattr(t, "use_taps"):
                t.use_taps(paths)

    def after_step(self, student: nn.Module, step: int) -> None:
        for t in self.teachers:
            t.after_step(student, step)

    def fingerprint(self) -> str:
        return hashlib.sha256("|".join(t.fingerprint() for t in self.teachers).encode()).hexdigest()[:16]

    def close(self) -> None:
        for t in self.teachers:
            if hasattr(t, "close"):
                t.close()
