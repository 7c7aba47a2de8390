"""The method contract: map student and teacher outputs (and the batch) to a loss.

A method owns loss state (projectors, regressors, centers, queues, stores) but never the models. It
declares which views each side sees, which intermediate outputs (taps) it reads, whether it needs a
teacher, and whether unlabelled samples can teach the student anything under it (if not, the trainer
drops them from the method's training set). Its options live in its own strict ``Config``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from alambic.data.batch import INPUT, Batch
from alambic.errors import AlambicError
from alambic.losses import kd_loss, masked_cross_entropy
from alambic.models.heads import feature_path
from alambic.teachers.base import ModelOutput


class MethodConfig(BaseModel):
    """Base of every method's Config: strict (an unknown key is an error)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass
class StepContext:
    """Where training stands; schedules are computed up front and read here, so no loss keeps a clock."""

    step: int  # optimizer steps done before this one
    epoch: int
    total_steps: int
    steps_per_epoch: int
    values: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SetupInfo:
    """What a method may need to size its state before training: models, data and schedule sizes."""

    student: nn.Module
    num_classes: int
    num_samples: int  # 1 + the largest stable sample index: the row count of a per-sample store
    steps_per_epoch: int
    epochs: int
    total_steps: int | None = None  # optimizer steps of the run; None: epochs × steps_per_epoch
    loader: Any = None  # the training loader: for state computed over the whole training set (k-means, ...)
    teacher: Any = None  # the Teacher (None without one)

    def __post_init__(self) -> None:
        if self.total_steps is None:  # train.steps may end the last epoch early; otherwise whole epochs
            object.__setattr__(self, "total_steps", self.epochs * self.steps_per_epoch)


@dataclass
class MethodOutput:
    loss: Tensor  # scalar to minimise
    terms: dict[str, Tensor]  # weighted contributions to ``loss``, for logging and NaN reports
    logits: Tensor | None = None
    monitors: dict[str, Tensor] = field(default_factory=dict)  # logged and shown, never trained (collapse watch)


class Method(nn.Module):
    """Base class: subclasses set the class attributes and implement ``forward``."""

    Config: ClassVar[type[MethodConfig]] = MethodConfig
    paper: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False
    uses_unlabeled: ClassVar[bool] = False
    self_supervised: ClassVar[bool] = False  # trains on every sample without its label; evaluated by probes
    # False: the method keeps state across batches (a memory bank, a per-sample store) that is not yet reduced
    # across ranks, so a run on several processes is refused rather than silently different
    distributed_safe: ClassVar[bool] = True
    modality: ClassVar[str] = "tensor"  # "text": a language method, its run assembled by alambic.language_run
    # True: the method reads paired modalities (alambic.data.paired): the run adds the dataset's paired views and
    # pairings to every batch, and the teacher is checked against the view it sees, not the student's input
    paired: ClassVar[bool] = False
    # True: under bf16/fp16 the loop hands the method the forwards' half-precision outputs as they are, and the
    # method's losses upcast to fp32 themselves (token_kd, gkd, seqkd: chunk by chunk), instead of the loop
    # casting every output to fp32 first (float_outputs), which copies a [B, T, V] logits tensor
    upcasts_itself: ClassVar[bool] = False
    student_views: tuple[str, ...] = (INPUT,)
    teacher_views: tuple[str, ...] = (INPUT,)

    def __init__(self, config: MethodConfig | None = None):
        super().__init__()
        self.config = config if config is not None else self.Config()

    def use_views(self, names: Sequence[str]) -> None:
        """Choose which of the loader's views (``names``, in order) each side sees; called before training.

        The default keeps the class's own ``student_views``/``teacher_views``, or the single view its config
        names as ``student_view``/``teacher_view`` (pseudo_label, mean_teacher, dho), and checks they exist.
        A multi-view method (DINO, BYOL) overrides this to build its view plan from the names.
        """
        config = getattr(self, "config", None)
        if getattr(config, "student_view", None) is not None:
            self.student_views = (config.student_view,)
        if getattr(config, "teacher_view", None) is not None:
            self.teacher_views = (config.teacher_view,)
        missing = [v for v in (*self.student_views, *self.teacher_views) if v not in names]
        if missing:
            raise AlambicError(
                f"method {type(self).__name__} reads view(s) {missing}, the data gives {list(names)}: "
                f"add them to the recipe's `views:` section"
            )

    def wrap_student(self, student: nn.Module, example: Tensor, arch: str) -> nn.Module:
        """The network to train around ``student`` (self-supervised methods add a projection head).

        ``example`` is a small batch of inputs (to size heads); ``arch`` the student's architecture name
        (to find its representation). The run deploys ``student`` itself, not the wrapper.
        """
        return student

    def student_taps(self) -> list[str]:
        return []

    def teacher_taps(self) -> list[str]:
        return []

    def setup(
        self, student: Mapping[str, ModelOutput], teacher: Mapping[str, ModelOutput] | None, info: SetupInfo
    ) -> None:
        """Build heads and state from one probe batch's outputs (their shapes) and ``info``.

        Called once, before the optimizer exists, so every parameter created here is trained; every buffer
        and parameter registered on the method is checkpointed.
        """

    def tune_on_validation(self, student: nn.Module, val_x: Tensor, val_y: Tensor) -> None:
        """After training, choose inference-time settings on the validation split (DHO's head mix).

        Called once by the run before :meth:`deploy`; the test split is never passed here.
        """

    def deploy(self, student: nn.Module) -> nn.Module:
        """The network that is evaluated and exported after training (default: the student itself).

        A method whose inference differs from the student's plain forward (DHO's mixed heads) returns a
        wrapper here; it then also implements :meth:`deploy_meta` and :meth:`rebuild`.
        """
        return student

    def deploy_meta(self) -> dict[str, Any] | None:
        """JSON-able description :meth:`rebuild` needs to recreate the deployed wrapper (None: no wrapper)."""
        return None

    @classmethod
    def rebuild(cls, student: nn.Module, meta: dict[str, Any]) -> nn.Module:
        """The deployed wrapper around a freshly built ``student``, from :meth:`deploy_meta` (weights loaded later)."""
        raise NotImplementedError(f"{cls.__name__} does not wrap its student at deployment")

    def chunk_weight(self, chunk: Batch, whole: Batch) -> float:
        """Weight of a grad-accumulation chunk's loss in its step, so the weighted chunk losses sum to the loss
        of ``whole`` in one piece. Default: the chunk's share of rows (a loss that is a mean over rows); a
        loss that is a mean over tokens returns the chunk's share of valid tokens instead."""
        return len(chunk) / len(whole)

    def prepare(self, batch: Batch, ctx: StepContext) -> Batch:
        """The batch this step trains on, given the loader's (default: as it is). The Trainer calls it once per
        optimizer step, before any forward pass and before the batch is split into chunks or ranks; an
        on-policy method (``gkd``) replaces the completions with the student's own samples here."""
        return batch

    def schedules(self, info: SetupInfo) -> dict[str, np.ndarray]:
        """Per-step values (one per optimizer step) the loop hands over as ``ctx.values[name]``."""
        return {}

    def forward(
        self,
        student: Mapping[str, ModelOutput],
        teacher: Mapping[str, ModelOutput] | None,
        batch: Batch,
        ctx: StepContext,
    ) -> MethodOutput:
        raise NotImplementedError


def supervised_terms(student_logits: Tensor, teacher_logits: Tensor | None, batch, ce_weight: float,
                     kd_weight: float, temperature: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``ce_weight · CE(labelled) + kd_weight · KD(T)``, the supervised part many methods add to their own term.

    A term with weight 0 is neither computed nor logged.
    """
    loss, terms = student_logits.sum() * 0.0, {}
    if ce_weight > 0:
        ce = ce_weight * masked_cross_entropy(student_logits, batch.target, all_labeled=batch.all_labeled)
        loss, terms["ce"] = loss + ce, ce.detach()
    if kd_weight > 0:
        if teacher_logits is None:
            raise AlambicError("kd_weight > 0 needs a teacher with logits")
        kd = kd_weight * kd_loss(student_logits, teacher_logits, temperature)
        loss, terms["kd"] = loss + kd, kd.detach()
    return loss, terms


class ReadsStudentFeature:
    """Mixin of a method that reads one representation of the student: ``config.feature`` (a tap path), or
    (None) the default tap of the student's zoo architecture, resolved when the student is wrapped."""

    _feature: str | None = None

    def wrap_student(self, student, example, arch):
        self._feature = feature_path(arch, self.config.feature)
        return student

    @property
    def feature(self) -> str:
        return self._feature or feature_path("?", self.config.feature)

    def student_taps(self) -> list[str]:
        return [self.feature]
