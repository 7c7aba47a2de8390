"""Self-supervised self-distillation losses: DINO, iBOT masked tokens, BYOL, SEED, SwAV (Sinkhorn codes).

Pure tensor functions: shapes in the docstrings, no configs, no modules, no state. The teacher side (EMA or
frozen teacher outputs, centers, queues, codes) is always a constant target (detached), whatever its
``requires_grad``; the state these losses read (a DINO center, a SEED queue) is owned and updated by the
method, e.g. with :func:`dino_center`.

Every function here is single-process: where the papers all-reduce a statistic over GPUs (DINO's center,
SwAV's Sinkhorn sums) these compute it over the local batch only.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses.divergence import upcast

__all__ = [
    "byol_loss",
    "code_cross_entropy",
    "dino_center",
    "dino_loss",
    "masked_token_loss",
    "seed_loss",
    "sinkhorn",
    "swapped_prediction_loss",
]


def _positive(value: float, name: str, what: str) -> None:
    if not value > 0:
        raise AlambicError(f"{what}: {name} must be > 0, got {value}")


def _views(outputs: Sequence[Tensor], name: str, what: str) -> list[Tensor]:
    """The per-view logits as a list of [B, K] tensors of one shape, with an error naming the odd view."""
    views = list(outputs)
    if not views:
        raise AlambicError(f"{what}: {name} is empty (need at least one [B, K] view)")
    for v, out in enumerate(views):
        if out.dim() != 2:
            raise ShapeMismatchError(f"{what}: {name}[{v}] must be [B, K], got shape {tuple(out.shape)}")
        if out.shape != views[0].shape:
            raise ShapeMismatchError(
                f"{what}: {name}[{v}] has shape {tuple(out.shape)} but {name}[0] has {tuple(views[0].shape)}"
            )
    return views


def _center_row(center: Tensor, k: int, what: str) -> Tensor:
    """``center`` as a detached [1, K] row (accepts [K] or [1, K])."""
    if tuple(center.shape) not in ((k,), (1, k)):
        raise ShapeMismatchError(f"{what}: center must be [K] or [1, K] with K = {k}, got {tuple(center.shape)}")
    return center.detach().reshape(1, k)


def _teacher_probs(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """DINO/iBOT teacher targets ``softmax((t − c)/τ_t)`` over the last dim, as constants."""
    return F.softmax((teacher_logits.detach() - center) / temperature, dim=-1)


def dino_loss(student_outputs: Sequence[Tensor], teacher_outputs: Sequence[Tensor], center: Tensor,
              student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> Tensor:
    """DINO's multi-crop self-distillation loss: mean over view pairs of ``−Σ_k P_t(x_i)_k log P_s(x_v)_k``.

    Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), 2021,
    arXiv:2104.14294, Eq. (3) and Alg. 1: the teacher sees only the global views, the student sees every
    view, and each teacher view ``i`` teaches every student view ``v ≠ i`` (a view never teaches itself).
    Teacher targets are centered and sharpened, ``P_t = softmax((t − c)/τ_t)``, and treated as constants
    (stop-gradient); the student's are ``P_s = softmax(s/τ_s)``. Centering (see :func:`dino_center`) stops
    one dimension from dominating, sharpening (τ_t < τ_s) stops the uniform collapse: together they avoid
    the trivial solutions without negatives or a predictor. Each pair contributes its batch-mean
    cross-entropy, and the loss is the mean over the ``G·V − G`` pairs, as in the official code.

    Args:
        student_outputs: V per-view logits [B, K]; the first G are the global views the teacher saw, in
            the same order as ``teacher_outputs``, the rest are local views.
        teacher_outputs: G per-view logits [B, K] (global views only); constants.
        center: [K] or [1, K], the running mean of the teacher logits; a constant.
        student_temperature: τ_s > 0 (0.1 in the paper).
        teacher_temperature: τ_t > 0 (0.04 in the paper, warmed up from 0.04 to 0.07 by a schedule).
    Returns: scalar.
    """
    what = "dino_loss"
    students = _views(student_outputs, "student_outputs", what)
    teachers = _views(teacher_outputs, "teacher_outputs", what)
    _positive(student_temperature, "student_temperature", what)
    _positive(teacher_temperature, "teacher_temperature", what)
    if students[0].shape != teachers[0].shape:
        raise ShapeMismatchError(
            f"{what}: student views are {tuple(students[0].shape)} but teacher views are {tuple(teachers[0].shape)}"
        )
    if len(students) < len(teachers):
        raise AlambicError(
            f"{what}: {len(teachers)} teacher views but only {len(students)} student views; the first "
            "len(teacher_outputs) student views must be the teacher's global views"
        )
    n_pairs = len(teachers) * len(students) - len(teachers)
    if n_pairs == 0:
        raise AlambicError(
            f"{what}: no (teacher view, other student view) pair with {len(teachers)} teacher and "
            f"{len(students)} student view(s); DINO needs at least two views"
        )
    c = _center_row(center, students[0].shape[1], what)
    targets = [_teacher_probs(upcast(t), c, teacher_temperature) for t in teachers]  # bf16 logits: fp32 softmaxes
    log_probs = [F.log_softmax(upcast(s) / student_temperature, dim=-1) for s in students]
    total = log_probs[0].new_zeros(())
    for i, p_t in enumerate(targets):
        for v, log_p_s in enumerate(log_probs):
            if v == i:
                continue
            total = total + (-(p_t * log_p_s).sum(-1)).mean()
    return total / n_pairs


@torch.no_grad()
def dino_center(center: Tensor, teacher_outputs: Sequence[Tensor], momentum: float = 0.9) -> Tensor:
    """DINO's center update: ``c ← m·c + (1 − m)·mean over the rows of every teacher view``.

    Caron et al., DINO, 2021, arXiv:2104.14294, Eq. (4): the center is an EMA of the teacher's batch-mean
    output (m = 0.9 in the paper). Returns a new tensor of ``center``'s shape and dtype, without grad;
    ``center`` is not modified. Single-process: the official code all-reduces the batch sum over GPUs
    first, which a distributed caller must do itself (out of scope here).

    Args:
        center: [K] or [1, K].
        teacher_outputs: G per-view teacher logits [B, K].
        momentum: m in [0, 1].
    Returns: the new center, shaped like ``center``.
    """
    what = "dino_center"
    teachers = _views(teacher_outputs, "teacher_outputs", what)
    if not 0.0 <= momentum <= 1.0:
        raise AlambicError(f"{what}: momentum must be in [0, 1], got {momentum}")
    _center_row(center, teachers[0].shape[1], what)
    batch_mean = torch.cat([t.detach() for t in teachers], dim=0).mean(dim=0).to(center.dtype)
    return center.detach() * momentum + batch_mean.reshape(center.shape) * (1.0 - momentum)


def byol_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's regression loss: ``mean_i ‖p̄_i − z̄_i‖² = mean_i (2 − 2·cos(p_i, z_i))``, target detached.

    Grill et al., "Bootstrap your own latent: A new approach to self-supervised Learning" (BYOL), 2020,
    arXiv:2006.07733, Eq. (2): the online network's prediction ``p`` regresses the target (EMA) network's
    projection ``z``, both L2-normalised, under a stop-gradient on the target; the paper symmetrises by
    swapping the views, which a caller does by adding the swapped call. 0 for aligned vectors, 2 for
    orthogonal ones, 4 for opposite ones; invariant to the scale of either side.

    Args: prediction [B, D], target [B, D] (a constant). Returns: scalar.
    """
    if prediction.shape != target.shape or prediction.dim() != 2:
        raise ShapeMismatchError(
            f"byol_loss: prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must both be [B, D]"
        )
    p = F.normalize(prediction, dim=-1)
    z = F.normalize(target.detach(), dim=-1)
    return (2.0 - 2.0 * (p * z).sum(-1)).mean()


def masked_token_loss(student_tokens: Tensor, teacher_tokens: Tensor, mask: Tensor, center: Tensor,
                      student_temperature: float = 0.1, teacher_temperature: float = 0.04) -> Tensor:
    """iBOT's masked image modelling loss: per sample, the mean over masked tokens of the token-level DINO CE.

    Zhou et al., "iBOT: Image BERT Pre-Training with Online Tokenizer", 2022, arXiv:2111.07832, Eq. (1)
    ``L_MIM = −Σ_i m_i · P_t(u_i)ᵀ log P_s(û_i)``: the teacher (online tokenizer) sees the unmasked image and
    its patch distributions ``softmax((t − c)/τ_t)`` (constants) are the targets for the student's
    distributions ``softmax(s/τ_s)`` at the patches the student saw masked. As in the official code each
    sample's sum is divided by its own number of masked tokens (at least 1), then samples are averaged, so
    a sample with one masked token weighs as much as one with many; a sample with none contributes 0.

    Args:
        student_tokens: [B, N, K] patch-token logits of the student (masked input).
        teacher_tokens: [B, N, K] patch-token logits of the teacher (unmasked input); constants.
        mask: [B, N] bool, True where the student's patch was masked.
        center: [K] or [1, K], the running mean of the teacher's patch logits; a constant.
        student_temperature, teacher_temperature: τ_s, τ_t > 0 (iBOT: 0.1 and 0.04 → 0.07).
    Returns: scalar.
    """
    what = "masked_token_loss"
    if student_tokens.dim() != 3 or student_tokens.shape != teacher_tokens.shape:
        raise ShapeMismatchError(
            f"{what}: student_tokens {tuple(student_tokens.shape)} and teacher_tokens "
            f"{tuple(teacher_tokens.shape)} must both be [B, N, K]"
        )
    if tuple(mask.shape) != tuple(student_tokens.shape[:2]):
        raise ShapeMismatchError(
            f"{what}: mask has shape {tuple(mask.shape)}, expected [B, N] = {tuple(student_tokens.shape[:2])}"
        )
    _positive(student_temperature, "student_temperature", what)
    _positive(teacher_temperature, "teacher_temperature", what)
    c = _center_row(center, student_tokens.shape[-1], what)
    p_t = _teacher_probs(teacher_tokens, c, teacher_temperature)
    log_p_s = F.log_softmax(student_tokens / student_temperature, dim=-1)
    ce_BN = -(p_t * log_p_s).sum(-1)
    m = mask.to(ce_BN.dtype)
    per_sample = (ce_BN * m).sum(-1) / m.sum(-1).clamp_min(1.0)
    return per_sample.mean()


def seed_loss(student_embedding: Tensor, teacher_embedding: Tensor, queue: Tensor,
              student_temperature: float = 0.2, teacher_temperature: float = 1e-4) -> Tensor:
    """SEED: cross-entropy between the teacher's and the student's similarity distributions over a queue.

    Fang et al., "SEED: Self-supervised Distillation for Visual Representation", 2021, arXiv:2101.04731,
    Eq. (3)/(4): with every embedding L2-normalised and the support ``D⁺ = [z_t_i; queue]`` (the sample's own
    teacher embedding, then Q past teacher embeddings), the teacher's distribution is
    ``p_t = softmax([z_t_i·z_t_i, z_t_i·d_1, …]/τ_t)`` and the student's ``p_s = softmax([z_s_i·z_t_i,
    z_s_i·d_1, …]/τ_s)``; the loss is ``mean_i −Σ_j p_t_j log p_s_j``. The tiny default τ_t = 1e-4 makes
    p_t nearly one-hot on the own column, i.e. instance discrimination against the queue with the
    teacher's embedding as the positive; larger τ_t passes on the teacher's similarity structure. With an
    empty queue (Q = 0) both distributions have one column and the loss is exactly 0.

    Args:
        student_embedding: [B, D]; teacher_embedding: [B, D] (a constant).
        queue: [Q, D] past teacher embeddings, Q ≥ 0 (a constant; the method keeps and updates it).
        student_temperature, teacher_temperature: τ_s, τ_t > 0 (SEED: 0.2 and 1e-4 … 0.01).
    Returns: scalar.
    """
    what = "seed_loss"
    if student_embedding.dim() != 2 or student_embedding.shape != teacher_embedding.shape:
        raise ShapeMismatchError(
            f"{what}: student_embedding {tuple(student_embedding.shape)} and teacher_embedding "
            f"{tuple(teacher_embedding.shape)} must both be [B, D]"
        )
    if queue.dim() != 2 or queue.shape[1] != student_embedding.shape[1]:
        raise ShapeMismatchError(
            f"{what}: queue must be [Q, D] with D = {student_embedding.shape[1]}, got {tuple(queue.shape)}"
        )
    _positive(student_temperature, "student_temperature", what)
    _positive(teacher_temperature, "teacher_temperature", what)
    # fp32 similarities even under autocast: divided by τ_t = 1e-4, a bf16 dot product's rounding (~4e-3)
    # would swamp the differences the teacher's distribution is made of
    with torch.autocast(student_embedding.device.type, enabled=False):
        z_s = F.normalize(upcast(student_embedding), dim=-1)
        z_t = F.normalize(upcast(teacher_embedding.detach()), dim=-1)
        bank = F.normalize(queue.detach().to(z_t.dtype), dim=-1)
        own_s = (z_s * z_t).sum(-1, keepdim=True)  # [B, 1]: z_s_i · z_t_i
        own_t = (z_t * z_t).sum(-1, keepdim=True)  # [B, 1]: z_t_i · z_t_i (= 1)
        logits_s = torch.cat([own_s, z_s @ bank.T], dim=1) / student_temperature  # [B, 1 + Q]
        logits_t = torch.cat([own_t, z_t @ bank.T], dim=1) / teacher_temperature
        p_t = F.softmax(logits_t, dim=-1)
        return (-(p_t * F.log_softmax(logits_s, dim=-1)).sum(-1)).mean()


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """SwAV's equipartitioned soft codes by Sinkhorn-Knopp on ``exp(scores/ε)``.

    Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments" (SwAV),
    2020, arXiv:2006.09882, §3.1 Eq. (3)-(5): the codes ``Q* = Diag(u) exp(Cᵀ Z/ε) Diag(v)`` maximise
    ``Tr(Qᵀ Cᵀ Z) + ε H(Q)`` over the transportation polytope in which every sample carries mass 1 and every
    prototype mass B/K, so a batch cannot put all its samples in one cluster. Following the paper's
    algorithm, the whole matrix is normalised to sum 1, then each iteration rescales the prototypes to
    1/K each and the samples to 1/B each; finally rows are scaled to sum to 1. After a few iterations the
    column sums are ≈ B/K (exactly so only in the limit).

    The iterations run in the log domain (``logsumexp`` instead of sums of exponentials): every step is
    the paper's algorithm exactly, rewritten as ``log Q ← log Q − log(sum) − log K`` etc., so the codes
    equal the unstabilised float64 algorithm on moderate scores and stay finite where ``exp(scores/ε)``
    overflows (``|scores|/ε`` above ~88 in float32), and no sample's row can underflow to all zeros. Do not
    subtract each *row's* maximum before the exponential: SwAV's first normalisation is over the whole
    matrix and the next over each prototype, so a per-sample factor is not absorbed in 3 iterations (codes
    moved by up to ~0.3); only a global or per-prototype shift of the scores is a no-op. Single-process:
    SwAV all-reduces the sums over GPUs.

    Args:
        scores: [B, K] sample-prototype similarities (cosines in SwAV); treated as constants.
        epsilon: ε > 0 (0.05 in SwAV; smaller is sharper but needs more iterations).
        iterations: number of Sinkhorn iterations ≥ 1 (3 in SwAV).
    Returns: codes [B, K] without grad, each row summing to 1; computed in at least float32, returned in
        ``scores``' dtype.
    """
    what = "sinkhorn"
    if scores.dim() != 2:
        raise ShapeMismatchError(f"{what}: scores must be [B, K], got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise AlambicError(f"{what}: scores is empty, got shape {tuple(scores.shape)}")
    _positive(epsilon, "epsilon", what)
    if iterations < 1:
        raise AlambicError(f"{what}: iterations must be >= 1, got {iterations}")
    work_dtype = torch.promote_types(scores.dtype, torch.float32)
    log_q = scores.detach().to(work_dtype) / epsilon  # [B, K]: log exp(scores/ε)
    b, k = log_q.shape
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)  # Q /= sum(Q)
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)  # each prototype: 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(b)  # each sample: 1/B
    return torch.exp(log_q + math.log(b)).to(scores.dtype)


def swapped_prediction_loss(scores_a: Tensor, scores_b: Tensor, codes_a: Tensor, codes_b: Tensor,
                            temperature: float = 0.1, hard: bool = False) -> Tensor:
    """SwAV's swapped prediction: each view predicts the other view's code from its prototype scores.

    Caron et al., SwAV, 2020, arXiv:2006.09882, Eq. (1)/(2):
    ``L = ½[ℓ(z_a, q_b) + ℓ(z_b, q_a)]``, ``ℓ(z, q) = −Σ_k q_k log softmax(zᵀc/τ)_k``, batch-mean, with the
    codes (from :func:`sinkhorn`) as constants. (The paper's loss is the sum of the two terms; the official
    code averages them, as here.) ``hard=True`` trains on the arg-max code as a class label, as DISCOVR
    does (Divyanshu et al., "Self-supervised Video Representation Learning with Cross-modal Semantic
    Cluster Distillation", 2025: hard arg-max codes with τ = 0.1); on one-hot codes both modes agree.

    Args:
        scores_a, scores_b: [B, K] prototype scores of the two views.
        codes_a, codes_b: [B, K] codes of the two views (rows summing to 1); constants.
        temperature: τ > 0 (0.1 in SwAV).
        hard: use ``argmax`` of the codes as hard targets.
    Returns: scalar.
    """
    what = "swapped_prediction_loss"
    shapes = [tuple(t.shape) for t in (scores_a, scores_b, codes_a, codes_b)]
    if len(shapes[0]) != 2 or len(set(shapes)) != 1:
        raise ShapeMismatchError(
            f"{what}: scores_a {shapes[0]}, scores_b {shapes[1]}, codes_a {shapes[2]}, codes_b {shapes[3]} "
            "must all be [B, K]"
        )
    _positive(temperature, "temperature", what)

    return 0.5 * (code_cross_entropy(scores_a, codes_b, temperature, hard)
                  + code_cross_entropy(scores_b, codes_a, temperature, hard))


def code_cross_entropy(scores: Tensor, codes: Tensor, temperature: float = 0.1, hard: bool = False) -> Tensor:
    """One direction of SwAV's swapped prediction, ``ℓ(z, q) = −Σ_k q_k log softmax(zᵀc/τ)_k``, batch-mean.

    Caron et al., SwAV, 2020, arXiv:2006.09882, Eq. (2): ``scores`` [B, K] are one view's prototype scores,
    ``codes`` [B, K] another view's codes (constants); ``hard=True`` uses their arg-max as class labels
    (DISCOVR). :func:`swapped_prediction_loss` averages it over the two directions of a pair; a multi-crop
    method pairs every view with every other global view through it.
    """
    log_p = F.log_softmax(scores / temperature, dim=-1)
    if hard:
        return F.nll_loss(log_p, codes.detach().argmax(dim=-1))
    return (-(codes.detach().to(log_p.dtype) * log_p).sum(-1)).mean()
