"""``seed``: a small student learns a frozen self-supervised teacher's similarity distribution over a queue."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from alambic.losses import seed_loss
from alambic.methods._ssl import one_view
from alambic.methods.base import Method, MethodConfig, MethodOutput, ReadsStudentFeature
from alambic.models.heads import MLPHead
from alambic.registry import METHODS


class SEEDConfig(MethodConfig):
    queue_size: int = Field(4096, ge=0, description="FIFO of past teacher embeddings (paper: 65,536)")
    student_temperature: float = Field(0.2, gt=0, description="τ_s (paper: 0.2)")
    teacher_temperature: float = Field(1e-4, gt=0, description="τ_t (published recipe: 1e-4, nearly one-hot)")
    feature: str | None = Field(None, description="tap path of the student's representation; None = the zoo default")
    teacher_feature: str = Field("pool", description="tap path of the teacher's embedding (mlp teachers: body)")
    hidden: int = Field(256, ge=1, description="hidden width of the student's projection head to the teacher's width")
    view: str | None = Field(None, description="the view both networks see; None = the first augmented view, "
                                               "else the plain input")


@METHODS.register("seed")
class SEED(ReadsStudentFeature, Method):
    """``H(softmax(z_t·[z_t; Q]ᵀ/τ_t), softmax(z_s·[z_t; Q]ᵀ/τ_s))``, then the batch's ``z_t`` enter the queue.

    The teacher is a frozen network (``teacher: {run: ...}``, e.g. a larger network pre-trained with
    ``dino`` or ``byol``); its embedding is the tap ``teacher_feature``. The student is the backbone's
    representation followed by a projection head to the teacher's width (owned by the method, thrown away
    after training). Both see the *same* augmented view (paper §3.2). The queue holds L2-normalised
    teacher embeddings, oldest overwritten first; it is a buffer, so it is checkpointed with its write
    position and fill count, and a resumed run sees the same queue. Labels are never read.
    """

    paper = ('Fang et al., "SEED: Self-supervised Distillation for Visual Representation", 2021, '
             'arXiv:2101.04731, Eq. (3)-(4)')

    Config = SEEDConfig
    needs_teacher = True
    uses_unlabeled = True
    self_supervised = True

    def __init__(self, config: SEEDConfig | None = None):
        super().__init__(config)
        self.register_buffer("queue", torch.zeros(0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.int64))

    def use_views(self, names) -> None:
        self.student_views = self.teacher_views = (one_view(names, self.config.view, "seed"),)

    def teacher_taps(self) -> list[str]:
        return [self.config.teacher_feature]

    def setup(self, student, teacher, info) -> None:
        s = student[self.student_views[0]].features[self.feature].flatten(1)
        t = teacher[self.teacher_views[0]].features[self.config.teacher_feature].flatten(1)
        self.projector = MLPHead(s.shape[1], t.shape[1], self.config.hidden)
        self.queue = torch.zeros(self.config.queue_size, t.shape[1])

    @torch.no_grad()
    def enqueue(self, z_t: torch.Tensor) -> None:
        """Write the rows of ``z_t`` at the FIFO position (wrapping); the oldest entries go first."""
        q = self.queue.shape[0]
        if q == 0:
            return
        z = F.normalize(z_t.detach(), dim=-1)[-q:]
        rows = (self.queue_ptr + torch.arange(len(z))) % q
        self.queue[rows] = z.to(self.queue.dtype)
        self.queue_ptr.fill_(int((self.queue_ptr + len(z)) % q))
        self.queue_filled.fill_(min(q, int(self.queue_filled) + len(z)))

    def stored(self) -> torch.Tensor:
        """The queue's filled rows, oldest first."""
        n, q = int(self.queue_filled), self.queue.shape[0]
        if n < q:
            return self.queue[:n]
        return torch.roll(self.queue, -int(self.queue_ptr), 0)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        v = self.student_views[0]
        z_s = self.projector(student[v].features[self.feature].flatten(1))
        z_t = teacher[self.teacher_views[0]].features[cfg.teacher_feature].flatten(1)
        loss = seed_loss(z_s, z_t, self.stored(), cfg.student_temperature, cfg.teacher_temperature)
        if self.training:  # several processes: the all-gathered batch, in rank order (the one-process batch)
            from alambic.train.distributed import gather_rows

            self.enqueue(gather_rows(z_t.detach()))
        return MethodOutput(loss, {"seed": loss.detach()}, None)
