"""``mean_teacher``: CE on the labels plus a ramped-up consistency cost towards an EMA of the student."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import Field

from alambic.data.batch import INPUT
from alambic.errors import AlambicError
from alambic.losses import masked_cross_entropy, softmax_mse_loss
from alambic.methods.base import Method, MethodConfig, MethodOutput, SetupInfo
from alambic.registry import METHODS

CONSISTENCY = "consistency_weight"


class MeanTeacherConfig(MethodConfig):
    consistency_weight: float = Field(
        100.0, ge=0,
        description="maximum weight of the softmax-MSE consistency cost (official code's default: 100)",
    )
    rampup_epochs: float = Field(
        5.0, ge=0,
        description="epochs of the sigmoid ramp-up exp(-5(1-t)^2) of that weight (official CIFAR-10 run: 5); 0 = none",
    )
    input_noise: float = Field(
        0.0, ge=0,
        description="std of Gaussian noise on the student's input (paper's ConvNet: 0.15); 0 = off",
    )
    student_view: str = Field(INPUT, description="the view the student learns from (an augmented copy)")
    teacher_view: str = Field(INPUT, description="the view the EMA teacher predicts on (another augmented copy)")


def sigmoid_rampup(step: np.ndarray | float, rampup_steps: float) -> np.ndarray:
    """``exp(−5·(1 − t)²)`` with ``t = clip(step / rampup_steps, 0, 1)``; 1 everywhere when ``rampup_steps`` is 0.

    Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", 2017, arXiv:1610.02242, §3.1, reused
    by mean teacher: it starts at e⁻⁵ ≈ 0.0067 and reaches 1 at the end of the ramp.
    """
    step = np.asarray(step, dtype=np.float64)
    if rampup_steps <= 0:
        return np.ones_like(step)
    t = np.clip(step / rampup_steps, 0.0, 1.0)
    return np.exp(-5.0 * (1.0 - t) ** 2)


@METHODS.register("mean_teacher")
class MeanTeacher(Method):
    """``CE(labelled) + w(t)·mean_{i,c}(softmax(s_i) − softmax(t_i))²`` over every sample, t an EMA teacher.

    The teacher is the recipe's ``teacher: {ema: {momentum: 0.99}}`` (:class:`~alambic.teachers.ema.EmaTeacher`
    averages the student's weights after every step, Eq. 1 of the paper). The consistency cost applies to
    labelled and unlabelled samples alike; its weight ``w(t) = consistency_weight · exp(−5(1 − t)²)`` ramps
    up over ``rampup_epochs`` (a per-step schedule, read as ``ctx.values["consistency_weight"]``).

    The paper perturbs student and teacher inputs independently (noise and augmentation): name two
    augmented views of the recipe's ``views:`` section as ``student_view`` and ``teacher_view`` (both
    default to the clean input, where the student is pulled towards its own recent average only).
    ``input_noise`` adds Gaussian noise of that std to the student's view: the method then runs the
    student a second time on the noisy input (it keeps a reference to it from ``setup``) and trains on
    that pass for both costs. The extra forward pass also updates BatchNorm statistics a second time. Not
    reproduced: the EMA warm-up ``min(1 − 1/(step + 1), m)`` of the official code.
    """

    paper = (
        'Tarvainen & Valpola, "Mean teachers are better role models: Weight-averaged consistency targets '
        'improve semi-supervised deep learning results", 2017, arXiv:1703.01780'
    )

    Config = MeanTeacherConfig
    needs_teacher = True
    uses_unlabeled = True

    def setup(self, student, teacher, info) -> None:
        self.__dict__["_student"] = info.student if info is not None else None  # a reference, not a submodule

    def weight_at(self, step: np.ndarray | float, steps_per_epoch: int) -> np.ndarray:
        cfg = self.config
        return cfg.consistency_weight * sigmoid_rampup(step, cfg.rampup_epochs * steps_per_epoch)

    def schedules(self, info: SetupInfo) -> dict[str, np.ndarray]:
        return {CONSISTENCY: self.weight_at(np.arange(info.total_steps), info.steps_per_epoch)}

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        s = student[cfg.student_view].logits
        if cfg.input_noise > 0 and self.training:
            net = self.__dict__.get("_student")
            if net is None:
                raise AlambicError("mean_teacher: input_noise needs the student (run setup first)")
            x = batch.views[cfg.student_view]
            s = net(x + self.config.input_noise * torch.randn_like(x))
        weight = ctx.values.get(CONSISTENCY)
        if weight is None:  # a hand-written loop without the schedules: same value, from the step
            weight = float(self.weight_at(ctx.step, ctx.steps_per_epoch))
        ce = masked_cross_entropy(s, batch.target, all_labeled=batch.all_labeled)
        consistency = weight * softmax_mse_loss(s, teacher[cfg.teacher_view].logits)
        return MethodOutput(ce + consistency, {"ce": ce.detach(), "consistency": consistency.detach()}, s)
