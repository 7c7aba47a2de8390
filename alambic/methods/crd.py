"""``crd``: contrastive representation distillation with memory banks of student and teacher embeddings."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from alambic.data.batch import INPUT
from alambic.errors import AlambicError
from alambic.losses import crd_infonce_loss, crd_nce_loss, nce_log_normalizer
from alambic.methods.base import Method, MethodConfig, MethodOutput, supervised_terms
from alambic.registry import METHODS


class CRDConfig(MethodConfig):
    student_tap: str = Field(description="dotted path of the student feature to embed (the penultimate one: body.act0, pool)")
    teacher_tap: str = Field(description="dotted path of the teacher feature to embed (its penultimate one)")
    embed_dim: int = Field(128, ge=1, description="embedding size of both heads (RepDistiller --feat_dim 128)")
    num_negatives: int = Field(
        4096, ge=1,
        description="negatives per anchor drawn from the memory bank, capped at (training samples − 1); "
                    "RepDistiller uses 16384 on CIFAR-100's 50k images",
    )
    nce_temperature: float = Field(0.07, gt=0, description="τ of the critic (RepDistiller --nce_t 0.07)")
    momentum: float = Field(0.5, ge=0, lt=1, description="memory-bank momentum (RepDistiller --nce_m 0.5)")
    objective: Literal["nce", "infonce"] = Field(
        "nce", description="nce: the paper's NCE critic (Eq. 18) with the official normaliser Z; infonce: softmax over 1+K",
    )
    crd_weight: float = Field(0.8, ge=0, description="β on the contrastive term (RepDistiller -b 0.8)")
    ce_weight: float = Field(1.0, ge=0, description="γ on the label cross-entropy (RepDistiller -r 1)")
    kd_weight: float = Field(0.0, ge=0, description="α on Hinton KD (RepDistiller -a 0 for CRD, -a 1 for CRD+KD)")
    temperature: float = Field(4.0, gt=0, description="KD temperature when kd_weight > 0 (RepDistiller --kd_T 4)")


class Embed(nn.Module):
    """Flatten, linear map to ``dim``, L2-normalise: CRD's embedding head g (paper §3.3)."""

    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear = nn.Linear(in_features, dim)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


@torch.no_grad()
def momentum_update_rows(bank: Tensor, index: Tensor, values: Tensor, momentum: float) -> None:
    """``bank[i] ← normalise(m·bank[i] + (1 − m)·v_i)`` for the rows ``index`` only, in place, no gradient."""
    mixed = bank.index_select(0, index).mul_(momentum).add_(values.detach().to(bank.dtype), alpha=1 - momentum)
    bank.index_copy_(0, index, F.normalize(mixed, dim=1))


def draw_negatives(ids: Tensor, index: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """[B, k] sample ids drawn uniformly with replacement from ``ids`` (sorted), never the anchor's own id.

    Draw a position ``r`` in ``0..M−2`` and skip the anchor's own position ``p`` (``r ≥ p ⇒ r + 1``): every
    other sample has probability ``1/(M − 1)``.
    """
    m = len(ids)
    pos = torch.searchsorted(ids, index)
    if bool((pos >= m).any()) or not torch.equal(ids[pos.clamp(max=m - 1)], index):
        bad = index[(pos >= m) | (ids[pos.clamp(max=m - 1)] != index)][:5].tolist()
        raise AlambicError(f"crd: batch sample ids {bad} are not training samples of the memory bank")
    r = torch.randint(0, m - 1, (len(index), k), generator=generator).to(index.device)
    r = r + (r >= pos[:, None]).long()
    return ids[r]


@METHODS.register("crd")
class CRD(Method):
    """``γ·CE + α·KD + β·(L_NCE(student anchor, teacher bank) + L_NCE(teacher anchor, student bank))``.

    Two heads (linear + L2 norm) embed a student and a teacher feature into ``embed_dim``. Two memory
    banks keyed by the stable sample index hold one student and one teacher embedding per training
    sample. For each anchor, the positive is the other network's bank row of the same sample and the
    ``K`` negatives are bank rows of other samples; like the official code both directions are used and
    summed. After the loss is computed, the batch's rows are moved towards the new embeddings with
    momentum and re-normalised (no gradient; only those rows change). Banks start as random unit vectors
    (the official code: uniform noise of expected unit norm).

    Negatives are drawn from a private generator seeded by (a seed drawn at setup and kept as a buffer,
    ``ctx.step``), so a resumed run draws exactly what the uninterrupted run drew. They come uniformly from
    all other training samples ("instance" negatives); RepDistiller's CIFAR loader instead draws them from
    samples of other classes, which needs labels on every sample.
    """

    distributed_safe = False  # its memory bank: not reduced across ranks yet

    paper = 'Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020, arXiv:1910.10699'

    Config = CRDConfig
    needs_teacher = True
    uses_unlabeled = True  # the contrastive and KD terms need no label

    def __init__(self, config: CRDConfig | None = None):
        super().__init__(config)
        self.embed_s: Embed | None = None
        self.embed_t: Embed | None = None
        for name in ("memory_s", "memory_t", "bank_ids", "log_z", "neg_seed"):
            self.register_buffer(name, None)
        self.num_negatives = 0

    def student_taps(self) -> list[str]:
        return [self.config.student_tap]

    def teacher_taps(self) -> list[str]:
        return [self.config.teacher_tap]

    def setup(self, student, teacher, info) -> None:
        cfg = self.config
        if teacher is None:
            raise AlambicError("crd needs a teacher: add a teacher section to the recipe")
        s_feat = student[INPUT].features[cfg.student_tap]
        t_feat = teacher[INPUT].features[cfg.teacher_tap]
        self.embed_s = Embed(math.prod(s_feat.shape[1:]), cfg.embed_dim)
        self.embed_t = Embed(math.prod(t_feat.shape[1:]), cfg.embed_dim)
        split = getattr(info.loader, "split", None)
        ids = torch.unique(split.index) if split is not None else torch.arange(info.num_samples)
        if len(ids) < 2 or int(ids.max()) >= info.num_samples:
            raise AlambicError(
                f"crd: needs at least 2 training samples with ids below {info.num_samples}, got {len(ids)}"
            )
        self.bank_ids = ids.long()
        self.num_negatives = min(cfg.num_negatives, len(ids) - 1)
        shape = (info.num_samples, cfg.embed_dim)
        self.memory_s = F.normalize(torch.randn(shape), dim=1)
        self.memory_t = F.normalize(torch.randn(shape), dim=1)
        self.log_z = torch.full((2,), float("nan"))  # [student-anchor, teacher-anchor]; set by the first batch
        self.neg_seed = torch.randint(0, 2**62, (), dtype=torch.int64)

    def _generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((int(self.neg_seed) * 1_000_003 + int(step)) % 2**63)

    def contrastive(self, v_s: Tensor, v_t: Tensor, index: Tensor, step: int) -> Tensor:
        """The two-sided contrastive term for embeddings ``v_s, v_t`` [B, D] of samples ``index``."""
        cfg = self.config
        neg = draw_negatives(self.bank_ids, index.long(), self.num_negatives, self._generator(step))
        rows = torch.cat([index.long()[:, None], neg], dim=1)  # [B, 1+K], the positive first
        cand_t = self.memory_t[rows].to(v_s.dtype)  # teacher bank rows for the student anchor
        cand_s = self.memory_s[rows].to(v_t.dtype)  # student bank rows for the teacher anchor
        tau = cfg.nce_temperature
        if cfg.objective == "infonce":
            return crd_infonce_loss(v_s, cand_t, tau) + crd_infonce_loss(v_t, cand_s, tau)
        n = len(self.bank_ids)
        if torch.isnan(self.log_z).any():
            self.log_z.copy_(torch.stack([nce_log_normalizer(v_s, cand_t, tau, n),
                                          nce_log_normalizer(v_t, cand_s, tau, n)]))
        return (crd_nce_loss(v_s, cand_t, tau, n, self.log_z[0].to(v_s.dtype))
                + crd_nce_loss(v_t, cand_s, tau, n, self.log_z[1].to(v_t.dtype)))

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        s_out, t_out = student[INPUT], teacher[INPUT]
        v_s = self.embed_s(s_out.features[cfg.student_tap])
        v_t = self.embed_t(t_out.features[cfg.teacher_tap].detach())
        crd = cfg.crd_weight * self.contrastive(v_s, v_t, batch.index, ctx.step)
        logits = s_out.logits
        supervised, terms = supervised_terms(logits, t_out.logits, batch, cfg.ce_weight, cfg.kd_weight,
                                             cfg.temperature)
        terms = {"crd": crd.detach(), **terms}
        loss = crd + supervised
        if self.training:  # after the loss: this step's scores used the banks as they were
            index = batch.index.long().to(self.memory_s.device)
            momentum_update_rows(self.memory_s, index, v_s, cfg.momentum)
            momentum_update_rows(self.memory_t, index, v_t, cfg.momentum)
        return MethodOutput(loss, terms, logits)
