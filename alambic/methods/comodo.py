"""``comodo``: a student on one modality learns the teacher's similarity distribution over a queue of cached
teacher embeddings of the other modality."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from alambic.errors import AlambicError
from alambic.losses import comodo_loss, queue_push
from alambic.methods._instance import InstanceConfig, InstanceMethod
from alambic.methods.base import MethodOutput
from alambic.registry import METHODS


class COMODOConfig(InstanceConfig):
    queue_size: int = Field(16384, ge=1, description="FIFO of cached teacher embeddings (paper and code: 16,384); "
                                                     "at most the training samples")
    student_temperature: float = Field(0.05, gt=0, description="τ_s of the student's log-softmax (code: 0.05)")
    teacher_temperature: float = Field(0.1, gt=0, description="τ_t of the teacher's softmax (code: 0.1)")


@METHODS.register("comodo")
class COMODO(InstanceMethod):
    """``−(1/B) Σ softmax(z_t Q'ᵀ/τ_t) · log_softmax(ẑ_s Q'ᵀ/τ_s)``, ``Q' = [Q; z_t]``, then ``Q ← Q'[B:]``.

    Chen et al., "COMODO: Cross-Modal Video-to-IMU Distillation for Efficient Egocentric Human Activity
    Recognition", 2025, arXiv:2503.07259, §3 (the distillation objective); details as in Breezelled/COMODO
    ``comodo/loss.py::COMODOLoss`` and ``comodo/train.py``:

    - the keys of *both* distributions are teacher embeddings only: the queue ``Q`` of cached teacher
      embeddings plus the current batch's ``z_t`` (so every teacher row has its own self-similarity column,
      and the student ``ẑ_s`` (L2-normalised) is compared against the teacher's keys, never its own);
    - the teacher is softened at τ_t = 0.1, the student sharpened at τ_s = 0.05;
    - after each step the batch's teacher embeddings enter the queue and the oldest leave (FIFO,
      :func:`~alambic.losses.queue_push`);
    - the queue is full before the first step: the official code fills it with 16,384 cached embeddings of
      training samples drawn at random and holds those samples out of epoch 0 (so no sample meets its own
      cached copy in the queue), then adds them back. Here it is filled with the teacher embeddings of the
      last ``queue_size`` samples of epoch 0's order, oldest first: the batches before them push exactly those
      rows out by the time they come, so, for ``queue_size`` at most half the training set, no sample of epoch
      0 meets its own copy either, and no sample is left out of an epoch;
    - the queue and its pointer are buffers, so they are checkpointed and a resumed run continues with the
      same queue (the official code keeps the queue in the loss object and does not save it: a resumed run
      would start from a stale or empty one).

    The teacher embedding is the teacher's tap on the paired view, or the paired view itself when the data
    carries the teacher's cached embeddings (no ``teacher`` section); see :mod:`alambic.methods._instance`.
    """

    paper = ('Chen et al., "COMODO: Cross-Modal Video-to-IMU Distillation for Efficient Egocentric Human Activity '
             'Recognition", 2025, arXiv:2503.07259')

    Config = COMODOConfig
    # the queue is filled from this rank's share of the data and extended with this rank's batches
    distributed_safe = False

    def __init__(self, config: COMODOConfig | None = None):
        super().__init__(config)
        self.register_buffer("queue", torch.zeros(0))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))

    def setup(self, student, teacher, info) -> None:
        super().setup(student, teacher, info)
        self.queue = self.initial_queue(info)
        self.queue_ptr = torch.zeros((), dtype=torch.int64)

    @torch.no_grad()
    def initial_queue(self, info) -> torch.Tensor:
        """``[queue_size, D]`` the teacher embeddings of the last ``queue_size`` samples of epoch 0, oldest first."""
        k, loader = self.config.queue_size, getattr(info, "loader", None)
        if loader is None:
            raise AlambicError("method comodo fills its queue from the training data before training: setup needs "
                               "the training loader")
        teacher = getattr(info, "teacher", None)
        per_batch = getattr(loader, "batch_size", None) or 1
        start = max(0, len(loader) - math.ceil(k / per_batch) - 1)  # enough batches from the end of epoch 0
        rows = []
        for batch in loader.epoch(0, start=start):
            out = teacher.outputs(batch, self.teacher_views) if teacher is not None else None
            rows.append(self.teacher_embeddings(out, batch).cpu())
        keys = torch.cat(rows) if rows else torch.zeros(0, 1)
        if len(keys) < k:
            raise AlambicError(f"method.queue_size: {k} is more than the {len(keys)} training samples it is filled "
                               f"from; give at most {len(keys)}")
        return keys[len(keys) - k:].clone()

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        z_s = self.student_embeddings(student)
        z_t = self.teacher_embeddings(teacher, batch).to(z_s.dtype)
        loss = comodo_loss(z_s, z_t, self.queue, cfg.student_temperature, cfg.teacher_temperature)
        with torch.no_grad():  # how often the student's nearest key is its own teacher embedding (the last B keys)
            keys = torch.cat([self.queue.to(z_t.dtype), z_t])
            nearest = (F.normalize(z_s.detach(), dim=1) @ keys.t()).argmax(1)
            own = (nearest == len(self.queue) + torch.arange(len(z_t), device=z_t.device)).float().mean()
        if self.training:
            new, ptr = queue_push(self.queue, int(self.queue_ptr), z_t)
            self.queue.copy_(new)
            self.queue_ptr.fill_(ptr)
        return MethodOutput(loss, {"comodo": loss.detach()}, None, monitors={"own_key_top1": own})
