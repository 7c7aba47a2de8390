"""What a teacher (and a student) produces, and the protocol every teacher follows.

A teacher maps a batch to outputs without gradients: a frozen network, an EMA copy of the student, a store
of past predictions, an analytic function, a scikit-learn estimator, or a file of cached outputs. Student
and teacher outputs share one type, :class:`ModelOutput`, so a method never cares which one it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence, runtime_checkable

from torch import Tensor, nn

from alambic.data.batch import Batch


@dataclass
class SparseLogits:
    """A language-model teacher known by its top-k log-probabilities per position (an offline logit cache,
    :mod:`alambic.teachers.topk`), read by the losses of :mod:`alambic.losses.sparse_sequence`."""

    ids: Tensor  # [B, T, k] int64 token ids (0 where ``mask`` is False)
    logprobs: Tensor  # [B, T, k] float32 teacher log-probabilities at ``ids`` (0 where ``mask`` is False)
    mask: Tensor  # [B, T] bool: the positions the cache covers (the batch's completion tokens)
    tail: str = "bucket"  # the tail policy the cache was written for: "bucket", "renormalize" or "sample"
    tail_logprob: Tensor | None = None  # [B, T] float32 log of the teacher's mass outside ``ids`` (bucket)
    vocab_size: int = 0  # the vocabulary the ids index: cut the student's logits to it
    weights: Tensor | None = None  # [B, T, k] float32 draw frequencies of ``ids`` (sample; 0 on padding entries)
    temperature: float = 1.0  # the teacher temperature ``logprobs`` (and a sample cache's draws) are at


@dataclass
class ModelOutput:
    logits: Tensor | None
    features: dict[str, Tensor] = field(default_factory=dict)  # tap or head name -> tensor
    members: list["ModelOutput"] = field(default_factory=list)  # an ensemble's per-teacher outputs
    sparse: SparseLogits | None = None  # a cached LM teacher's top-k (then ``logits`` is None)


@runtime_checkable
class Teacher(Protocol):
    def outputs(self, batch: Batch, views: Sequence[str]) -> dict[str, ModelOutput]:
        """Outputs for each requested view, computed without gradients."""

    def after_step(self, student: nn.Module, step: int) -> None:
        """Called after each optimizer step (EMA teachers update here; a no-op otherwise)."""

    def fingerprint(self) -> str:
        """A stable hash of everything that determines the outputs (keys teacher caches)."""
