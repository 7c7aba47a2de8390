"""What the instance-paired cross-modal methods (``comodo``, ``instance_nce``) share: a student on one modality,
a teacher embedding of the *same sample* on another, and a projection head between the two.

The pairing is the sample itself: row ``i`` of a batch is one instance seen through two modalities (an IMU
window and its video clip in COMODO; an emoji's image and its name; a glyph's outline points and its image).
The student sees ``input``; the teacher side is a paired view of the batch (:mod:`alambic.data.paired`),
read in one of two ways:

- with a teacher (``teacher: {run: ...}``): the frozen network sees the paired view (an image) and its tap
  ``teacher_tap`` (a pooled feature) is the embedding;
- without one: the paired view already *is* the teacher's embedding, computed once offline and carried by the
  data (COMODO encodes its video teacher once into ``encoded.pkl``, arXiv:2503.07259 and Breezelled/COMODO
  ``comodo/train.py``; ``emoji_text`` caches MiniLM's sentence embeddings the same way).

Either way the teacher embedding is L2-normalised and constant (COMODO's video teacher normalises when it
encodes). The student's representation (the zoo default tap, or ``feature``) goes through a projection head
owned by the method (Linear, BatchNorm, ReLU, Linear, to the teacher's width; COMODO's IMU student has an MLP
head, ``IMUStudentMLP``), trained with the student and thrown away after training: the deployed student is the
backbone, judged by probes of its representation (the run's ``self_supervised`` path).
"""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from alambic.data.batch import INPUT, Batch
from alambic.errors import AlambicError, ShapeMismatchError
from alambic.methods.base import Method, MethodConfig, ReadsStudentFeature
from alambic.models.heads import MLPHead


class InstanceConfig(MethodConfig):
    teacher_view: str | None = Field(None, description="the paired view of the teacher side; None: the data's one "
                                                       "paired view")
    teacher_tap: str = Field("pool", description="with a teacher: its tap that gives the embedding [B, D] (cnn: "
                                                 "pool); without one the paired view is the embedding")
    feature: str | None = Field(None, description="tap path of the student's representation; None: the zoo default")
    hidden: int = Field(512, ge=1, description="hidden width of the student's projection head to the teacher's width")


class InstanceMethod(ReadsStudentFeature, Method):
    """Base of the instance-paired methods: the student sees ``input``, the teacher one paired view."""

    Config = InstanceConfig
    needs_teacher = False  # the teacher's embeddings may come with the data (a paired view), computed offline
    uses_unlabeled = True
    self_supervised = True  # trained without labels; judged by probes of the student's representation
    paired = True
    student_views: ClassVar[tuple[str, ...]] = (INPUT,)

    def __init__(self, config: InstanceConfig | None = None):
        super().__init__(config)
        self.teacher_views = (self.config.teacher_view or "",)
        self.projector: MLPHead | None = None

    def use_views(self, names) -> None:
        view = self.config.teacher_view
        if view is None:
            others = [n for n in names if n != INPUT]
            if len(others) != 1:
                raise AlambicError(f"method {type(self).__name__.lower()}: set method.teacher_view, the paired view "
                                   f"of the teacher side (views: {list(names)})")
            view = others[0]
        self.teacher_views = (view,)
        super().use_views(names)

    def teacher_taps(self) -> list[str]:
        return [self.config.teacher_tap]

    def teacher_embeddings(self, teacher, batch: Batch) -> Tensor:
        """``[B, D]`` the batch's L2-normalised teacher embeddings, detached: the teacher's tap on the paired view,
        or (no teacher) the paired view itself."""
        view = self.teacher_views[0]
        if teacher is not None:
            z = teacher[view].features[self.config.teacher_tap]
        else:
            if view not in batch.views:
                raise AlambicError(f"method {type(self).__name__.lower()}: the batch has no view {view!r} "
                                   f"(views: {list(batch.views)})")
            z = batch.views[view]
            if z.dim() != 2:
                raise ShapeMismatchError(f"method {type(self).__name__.lower()} without a teacher reads the paired "
                                         f"view {view!r} as embeddings [B, D], got {list(z.shape)}: give a teacher "
                                         "network that sees it (teacher: {run: ...})")
        return F.normalize(z.detach().flatten(1).float(), dim=1)

    def student_embeddings(self, student) -> Tensor:
        """``[B, D]`` the student's representation through the projection head (not normalised)."""
        return self.projector(student[INPUT].features[self.feature].flatten(1))

    def setup(self, student, teacher, info) -> None:
        s = student[INPUT].features[self.feature].flatten(1)
        self.projector = MLPHead(s.shape[1], self._teacher_width(teacher, info), self.config.hidden)

    def _teacher_width(self, teacher, info) -> int:
        if teacher is not None:
            return int(teacher[self.teacher_views[0]].features[self.config.teacher_tap].flatten(1).shape[1])
        loader = getattr(info, "loader", None)
        if loader is None:
            raise AlambicError(f"method {type(self).__name__.lower()} without a teacher sizes its head from the data's "
                               "paired embeddings: setup needs the training loader")
        return int(self.teacher_embeddings(None, next(iter(loader.epoch(0)))).shape[1])
