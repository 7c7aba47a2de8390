"""Token-level divergences of language-model distillation: forward/reverse KL, generalised JSD, skew KL, TV.

Pure tensor functions: shapes in the docstrings, no configs, no modules. As everywhere in
``alambic.losses`` the teacher side is a constant target (detached), whatever its ``requires_grad``.

One interface for all of them::

    divergence(student_logits, teacher_logits, mask=None, *, temperature=1.0, scale_t2=False,
               num_tokens=None, chunk_size=256, <the divergence's own parameter>)

- ``student_logits``, ``teacher_logits``: [B, T, V] (or [N, V]), any float dtype; computed in float32
  (float64 logits in float64), so bf16/fp16 logits lose nothing to a half-precision softmax.
  Position ``t`` holds the distribution over token ``t + 1`` in a causal LM: align (shift) logits and
  the mask before calling, as for cross-entropy.
- ``mask``: [B, T] (or [N]) bool, True at the tokens that count (the completion tokens). With labels in
  the ``-100`` convention pass ``mask=labels != IGNORE_INDEX``. ``None``: every position counts. Masked
  positions are never read into the computation, so whatever they hold (padding garbage, NaN) does not
  leak into the value or the gradient.
- ``temperature``: the *loss* temperature τ > 0, applied to both sides (``softmax(z / τ)``). It is not
  the sampling temperature of on-policy generation, which only decides which tokens were drawn and
  must not be passed here.
- ``scale_t2``: multiply by τ² (Hinton et al. 2015, arXiv:1503.02531, §2: keeps gradient magnitudes
  comparable across τ). Off by default: LM distillation papers (GKD, DistiLLM) use τ = 1.
- Reduction: sum over the vocabulary, sum over the valid tokens, divided by ``num_tokens``. Pass the
  valid-token count of the whole optimizer step (every gradient-accumulation chunk, every rank) so that
  summing the chunks' losses gives the loss of the whole batch; the default is this call's own valid
  count (at least 1, so an empty mask gives 0, with a gradient path, instead of NaN). Under DDP, which
  averages gradients over R ranks, pass the all-reduced count divided by R.
- ``chunk_size``: tokens per chunk. The valid positions are gathered first and the divergence is
  computed chunk by chunk inside a custom autograd function that forms the gradient with respect to the
  student logits chunk by chunk as it goes, so no autograd graph spanning every token is kept: peak
  extra memory is O(chunk_size × V) plus the logits' own gradient, instead of several [N, V] float32
  intermediates. The constant is about ten float32 [chunk_size, V] tensors during a chunk (~0.5 GB at
  the default 256 and V = 49,152). At 4,096 tokens and V = 49,152 (bf16 logits, one thread) chunk 256 added
  0.9 GB at its peak against 2.2 GB for chunk 1,024 and 6.3 GB for plain autograd, in the same time as
  1,024 and 2.6x faster than plain autograd (``benchmarks/sequence_divergence.py``). The gradient is formed during
  the forward call (when the student requires grad) and handed to autograd once, so a second backward
  through the same call raises. ``None`` uses plain autograd over all tokens at once (then it is
  twice-differentiable and can be back-propagated repeatedly).

Every function returns the true divergence: 0 when the two distributions are equal (not a
cross-entropy that differs from it by the teacher's entropy). Vocabulary entries that are ``-inf`` in
both logits (masked vocabulary) contribute exactly 0 and no NaN; an entry the target gives positive
probability and the other side ``-inf`` gives ``+inf``, as the divergence does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from alambic.errors import ShapeMismatchError

__all__ = [
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
    "truncate_to_shared_vocab",
]

# (log p_S [n, V], log p_T [n, V]) float32 -> [n] divergence per token
RowFn = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------- per-token formulas


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``Σ_v p·(log p − log q)`` per row with ``0·log 0 = 0``: [n, V], [n, V] -> [n].

    The ``where`` wraps the log-ratio, not the product, so an entry that is ``-inf`` on both sides
    gives 0 in the value *and* 0 in the gradient (``where(c, x·y, 0)`` would back-propagate
    ``0·NaN = NaN`` into ``x``).
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """``log(w·a + (1 − w)·b)`` for distributions given as log-probs; the endpoints are exact.

    Where both ``a`` and ``b`` are 0 the result is 0 instead of ``-inf`` (and its gradient 0): it is
    only ever used in a KL whose first argument is ``a`` or ``b``, where those entries are skipped.
    """
    if w == 1.0:
        return log_a
    if w == 0.0:
        return log_b
    m = w * log_a.exp() + (1.0 - w) * log_b.exp()
    return torch.where(m > 0, m, 1.0).log()


def _forward_kl_rows(log_s: Tensor, log_t: Tensor) -> Tensor:
    return _kl_rows(log_t, log_s)


def _reverse_kl_rows(log_s: Tensor, log_t: Tensor) -> Tensor:
    return _kl_rows(log_s, log_t)


def _jsd_rows(log_s: Tensor, log_t: Tensor, beta: float) -> Tensor:
    log_m = _log_mixture(log_t, log_s, beta)
    return beta * _kl_rows(log_t, log_m) + (1.0 - beta) * _kl_rows(log_s, log_m)


def _skew_kl_rows(log_s: Tensor, log_t: Tensor, alpha: float) -> Tensor:
    return _kl_rows(log_t, _log_mixture(log_t, log_s, alpha))


def _skew_reverse_kl_rows(log_s: Tensor, log_t: Tensor, alpha: float) -> Tensor:
    return _kl_rows(log_s, _log_mixture(log_s, log_t, alpha))


def _tv_rows(log_s: Tensor, log_t: Tensor) -> Tensor:
    return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(-1)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for half-precision and float32 logits, float64 for float64 ones."""
    return torch.promote_types(logits.dtype, torch.float32)


def _logit_rows(row_fn: RowFn, temperature: float, student: Tensor, teacher: Tensor) -> Tensor:
    """Raw logits [n, V] -> log-softmax at temperature τ in float32 (float64 stays) -> ``row_fn`` -> [n]."""
    dtype = _compute_dtype(student)
    student, teacher = student.to(dtype), teacher.to(dtype)
    if temperature != 1.0:  # skip a full [n, V] pass in the common case
        student, teacher = student / temperature, teacher / temperature
    log_s = F.log_softmax(student, dim=-1)
    log_t = F.log_softmax(teacher, dim=-1)
    return row_fn(log_s, log_t)


# ------------------------------------------------------------------------------------- chunked reduction


def _take_rows(teacher: Tensor | tuple[Tensor, ...], rows: slice | Tensor) -> Tensor | tuple[Tensor, ...]:
    """Rows of the teacher side: one [M, ...] tensor or a tuple of them (sparse top-k ids and values)."""
    if isinstance(teacher, tuple):
        return tuple(_take_rows(t, rows) for t in teacher)
    return teacher[rows] if isinstance(rows, slice) else teacher.index_select(0, rows)


def _chunk_sum(rows: Callable[[Tensor, Tensor], Tensor], student: Tensor, teacher: Tensor | tuple[Tensor, ...],
               index: Tensor | None, weight: Tensor, chunk_size: int, grad: Tensor | None) -> Tensor:
    """``weight · Σ`` over the selected rows of ``rows(student_rows, teacher_rows)``, a chunk at a time.

    ``student``: [M, V]; ``teacher``: [M, V], or a tuple of [M, ...] tensors (the sparse losses of
    :mod:`alambic.losses.sparse_sequence`), whose rows are taken alike; ``index``: [N] rows to use
    (``None``: all M); ``weight``: a scalar (τ²/num_tokens). When ``grad`` (an [M, V] buffer of zeros)
    is given, each chunk's gradient of its weighted sum with respect to its student rows is written into
    it, and the chunk's graph is freed before the next chunk starts. Weighting inside the chunk, in the
    compute dtype, rounds a half precision gradient once, as plain autograd does.
    """
    n = student.shape[0] if index is None else index.numel()
    total = torch.zeros((), dtype=_compute_dtype(student), device=student.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        if index is None:
            s, t = student[start:stop], _take_rows(teacher, slice(start, stop))
        else:
            rows_idx = index[start:stop]
            s, t = student.index_select(0, rows_idx), _take_rows(teacher, rows_idx)
        if grad is None:
            total += rows(s, t).sum() * weight
            continue
        with torch.enable_grad():
            s = s.detach().requires_grad_(True)
            part = rows(s, t).sum() * weight
            if not part.requires_grad:  # a divergence that ignores the student (skew α = 1): zero gradient
                total += part
                continue
            (g,) = torch.autograd.grad(part, s)
        if index is None:
            grad[start:stop] = g
        else:
            grad.index_copy_(0, rows_idx, g)
        total += part.detach()
    return total


class _ChunkedTokenSum(torch.autograd.Function):
    """Weighted sum of a per-token divergence over the selected rows, with an exact, chunk-wise gradient.

    Forward computes, per chunk, the value and the gradient with respect to that chunk's student rows
    (a local autograd pass, freed at once) into one [M, V] buffer, the size of the gradient autograd
    would produce anyway; backward multiplies it in place by the incoming gradient (1 for
    ``loss.backward()``) and hands it over, so it can run once only (a second backward raises).
    The gradient is plain autograd's over the unchunked computation: the same operations per row.
    """

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, index: Tensor | None, weight: Tensor,
                rows: Callable[[Tensor, Tensor], Tensor], chunk_size: int) -> Tensor:
        grad = torch.zeros_like(student)
        total = _chunk_sum(rows, student, teacher, index, weight, chunk_size, grad)
        ctx.grad = grad  # an intermediate, not an input or output: kept as an attribute, handed over once
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: Tensor):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "a chunked token divergence was back-propagated twice (retain_graph=True); its stored "
                "gradient is handed over on the first backward to save an [N, V] copy: pass chunk_size=None "
                "to back-propagate through it more than once"
            )
        ctx.grad = None
        return grad.mul_(grad_total.to(grad.dtype)), None, None, None, None, None


def _token_divergence(row_fn: RowFn, what: str, student_logits: Tensor, teacher_logits: Tensor,
                      mask: Tensor | None, temperature: float, scale_t2: bool,
                      num_tokens: int | Tensor | None, chunk_size: int | None) -> Tensor:
    if student_logits.shape != teacher_logits.shape or student_logits.dim() < 2:
        raise ShapeMismatchError(
            f"{what}: needs student and teacher logits of one shape [B, T, V] or [N, V], got student "
            f"{tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} (padded vocabularies: "
            "truncate_to_shared_vocab)"
        )
    if not student_logits.is_floating_point() or not teacher_logits.is_floating_point():
        raise TypeError(f"{what}: logits must be floating point, got {student_logits.dtype} and {teacher_logits.dtype}")
    if temperature <= 0:
        raise ValueError(f"{what}: temperature must be > 0, got {temperature}")
    v = student_logits.shape[-1]
    teacher = teacher_logits.detach().reshape(-1, v)
    return masked_token_sum(partial(_logit_rows, row_fn, temperature), what, student_logits, teacher, mask,
                            temperature, scale_t2, num_tokens, chunk_size)


def masked_token_sum(rows: Callable[[Tensor, Any], Tensor], what: str, student_logits: Tensor,
                     teacher: Tensor | tuple[Tensor, ...], mask: Tensor | None, temperature: float, scale_t2: bool,
                     num_tokens: int | Tensor | None, chunk_size: int | None) -> Tensor:
    """The reduction every token divergence shares (dense here, top-k in ``sparse_sequence``): the positions
    of ``mask`` (all when None) of ``student_logits`` [..., V] and of the flattened ``teacher`` rows, summed by
    :func:`token_sum` and weighted by τ² (``scale_t2``) / ``num_tokens`` (default: the valid count, at least 1)."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"{what}: chunk_size must be >= 1 or None, got {chunk_size}")
    if isinstance(num_tokens, (int, float)) and num_tokens < 0:
        raise ValueError(f"{what}: num_tokens must be >= 0, got {num_tokens}")
    lead = student_logits.shape[:-1]
    student = student_logits.reshape(-1, student_logits.shape[-1])  # a view for contiguous logits and [..., :V]

    index: Tensor | None = None
    count: int | Tensor = student.shape[0]
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(
                f"{what}: mask must be bool (True = token counts), got {mask.dtype}; with -100 labels pass "
                "mask=labels != IGNORE_INDEX"
            )
        if mask.shape != lead:
            raise ShapeMismatchError(
                f"{what}: mask {tuple(mask.shape)} does not match logits {tuple(student_logits.shape)} "
                f"(expected {tuple(lead)})"
            )
        index = mask.reshape(-1).to(student.device).nonzero().squeeze(1)
        count = index.numel()

    # weight = τ² (optional) / num_tokens, a scalar tensor in the compute dtype
    dtype = _compute_dtype(student)
    denom = count if num_tokens is None else num_tokens
    denom = torch.as_tensor(denom, device=student.device).to(dtype).clamp_min(1)
    weight = (temperature**2 if scale_t2 else 1.0) / denom
    return token_sum(rows, student, teacher, index, weight, chunk_size)


def token_sum(rows: Callable[[Tensor, Any], Tensor], student: Tensor, teacher: Tensor | tuple[Tensor, ...],
              index: Tensor | None, weight: float, chunk_size: int | None) -> Tensor:
    """``weight`` × Σ ``rows(student, teacher)`` over the rows ``index`` (all when None): plain autograd when
    ``chunk_size`` is None, else chunk by chunk through :class:`_ChunkedTokenSum` (a teacher given as a tuple
    of tensors, as the sparse top-k losses give it, is selected and chunked tensor by tensor)."""
    if chunk_size is None:
        pick = lambda x: x if index is None else x.index_select(0, index)  # noqa: E731
        s = pick(student)
        t = tuple(pick(x) for x in teacher) if isinstance(teacher, tuple) else pick(teacher)
        total = rows(s, t).sum() * weight
        if student.requires_grad and not total.requires_grad:  # skew α = 1 ignores the student: keep a path
            total = total + 0.0 * s.sum()
        return total
    if student.requires_grad and torch.is_grad_enabled():
        return _ChunkedTokenSum.apply(student, teacher, index, weight, rows, chunk_size)
    return _chunk_sum(rows, student, teacher, index, weight, chunk_size, None)


_SHARED_ARGS = """
    Args:
        student_logits: [B, T, V] or [N, V], any float dtype (computed in float32; float64 in float64).
        teacher_logits: same shape; treated as a constant.
        mask: [B, T] or [N] bool, True at the tokens that count; ``None``: all. With ``-100`` labels:
            ``labels != IGNORE_INDEX``.
        temperature: loss temperature τ > 0 on both sides (not the sampling temperature).
        scale_t2: multiply by τ² (default off).
        num_tokens: normaliser: the valid-token count of the whole optimizer step (all accumulation
            chunks and ranks); default this call's valid count. Clamped to at least 1.
        chunk_size: tokens per chunk (peak memory O(chunk_size × V)); ``None``: unchunked autograd.
    Returns:
        scalar, float32 (float64 for float64 logits): Σ_tokens Σ_v (...) / num_tokens (× τ² if
        ``scale_t2``). The gradient w.r.t. the student logits has their dtype.
"""


# ------------------------------------------------------------------------------------------ public API


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0, scale_t2: bool = False, num_tokens: int | Tensor | None = None,
               chunk_size: int | None = 256) -> Tensor:
    """Forward KL per token, ``KL(p_T ‖ p_S) = Σ_v p_T (log p_T − log p_S)``: mode-covering.

    The supervised-KD objective of Hinton et al. ("Distilling the Knowledge in a Neural Network", 2015,
    arXiv:1503.02531, §2) applied at every token (word-level KD, Kim & Rush, "Sequence-Level Knowledge
    Distillation", 2016, arXiv:1606.07947, §3.1, which drops the teacher-entropy constant); the "forward
    KL" of GKD (Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated
    Mistakes", ICLR 2024, arXiv:2306.13649, §2 Preliminaries). It includes the teacher's entropy, so it is 0 when the
    student matches the teacher; its gradient equals the soft cross-entropy's, ``(p_S − p_T)/τ``.
    """
    return _token_divergence(_forward_kl_rows, "forward_kl", student_logits, teacher_logits, mask,
                             temperature, scale_t2, num_tokens, chunk_size)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
               temperature: float = 1.0, scale_t2: bool = False, num_tokens: int | Tensor | None = None,
               chunk_size: int | None = 256) -> Tensor:
    """Reverse KL per token, ``KL(p_S ‖ p_T) = Σ_v p_S (log p_S − log p_T)``: mode-seeking.

    The token-level objective of MiniLLM (Gu et al., "MiniLLM: Knowledge Distillation of Large Language
    Models", ICLR 2024, arXiv:2306.08543: the sequence-level objective KL[q_θ ‖ p] of §2.1, Eq. 1, here
    per token) and the "reverse KL" of GKD (Agarwal et al. 2024, arXiv:2306.13649, §2 Preliminaries). Computed exactly over the full vocabulary (not a sampled-token
    estimate); the gradient reaches the student through both ``p_S`` factors.
    """
    return _token_divergence(_reverse_kl_rows, "reverse_kl", student_logits, teacher_logits, mask,
                             temperature, scale_t2, num_tokens, chunk_size)


def generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                    beta: float = 0.5, temperature: float = 1.0, scale_t2: bool = False,
                    num_tokens: int | Tensor | None = None, chunk_size: int | None = 256) -> Tensor:
    """Generalised Jensen–Shannon divergence JSD(β) per token, 0 < β < 1.

    Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
    ICLR 2024, arXiv:2306.13649, §2 Preliminaries, the generalized JSD D_JSD(β)(P ‖ Q) (after Huszár 2015,
    arXiv:1511.05101), used as D(p_T ‖ p_S^θ) per token: P = p_T the teacher, Q = p_S the student::

        JSD(β)(p_T ‖ p_S) = β·KL(p_T ‖ m) + (1 − β)·KL(p_S ‖ m),   m = β·p_T + (1 − β)·p_S.

    β = 0.5 is the symmetric JSD (swapping teacher and student leaves it unchanged). As β → 0 it tends
    to ``β·KL(p_T ‖ p_S)`` and as β → 1 to ``(1 − β)·KL(p_S ‖ p_T)``: forward- and reverse-KL-like in
    its gradient (the paper's remark) but vanishing in scale. The endpoints themselves are therefore
    refused rather than silently swapped for a KL whose scale jumps by a factor 1/β: call
    :func:`forward_kl` or :func:`reverse_kl` instead. (TRL's ``beta`` follows this same convention.)
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"generalized_jsd: beta must be in (0, 1), got {beta}; JSD(β) tends to 0 at both ends, so for "
            "beta=0 use forward_kl (KL(p_T‖p_S)) and for beta=1 use reverse_kl (KL(p_S‖p_T))"
        )
    return _token_divergence(partial(_jsd_rows, beta=beta), "generalized_jsd", student_logits, teacher_logits,
                             mask, temperature, scale_t2, num_tokens, chunk_size)


def _check_alpha(alpha: float, what: str) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{what}: alpha must be in [0, 1], got {alpha}")


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
            alpha: float = 0.1, temperature: float = 1.0, scale_t2: bool = False,
            num_tokens: int | Tensor | None = None, chunk_size: int | None = 256) -> Tensor:
    """α-skew KL per token, ``SKL_α(p_T, p_S) = KL(p_T ‖ α·p_T + (1 − α)·p_S)``.

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024,
    arXiv:2402.03898, §3.1, the definition of D_SKL^(α)(p, q_θ) with p the teacher and q_θ the student;
    α = 0.1 is the paper's default. Mixing a little of the teacher into the student's side bounds the
    log-ratio by ``log(1/α)`` and stabilises the gradient. α = 0 is the forward KL exactly; α = 1 gives 0.
    Unlike the DistiLLM code (a cross-entropy against the mixture) this omits no teacher-entropy
    constant, so the value is 0 at equality; the gradient is the same.
    """
    _check_alpha(alpha, "skew_kl")
    return _token_divergence(partial(_skew_kl_rows, alpha=alpha), "skew_kl", student_logits, teacher_logits,
                             mask, temperature, scale_t2, num_tokens, chunk_size)


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                    alpha: float = 0.1, temperature: float = 1.0, scale_t2: bool = False,
                    num_tokens: int | Tensor | None = None, chunk_size: int | None = 256) -> Tensor:
    """α-skew reverse KL per token, ``SRKL_α(p_T, p_S) = KL(p_S ‖ α·p_S + (1 − α)·p_T)``.

    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024,
    arXiv:2402.03898, §3.1, the definition of D_SRKL^(α)(p, q_θ) = D_KL(q_θ ‖ (1 − α)p + αq_θ) with p
    the teacher and q_θ the student; α = 0.1 is the paper's default. α = 0 is the reverse KL exactly;
    α = 1 gives 0.
    """
    _check_alpha(alpha, "skew_reverse_kl")
    return _token_divergence(partial(_skew_reverse_kl_rows, alpha=alpha), "skew_reverse_kl", student_logits,
                             teacher_logits, mask, temperature, scale_t2, num_tokens, chunk_size)


def total_variation(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None, *,
                    temperature: float = 1.0, scale_t2: bool = False, num_tokens: int | Tensor | None = None,
                    chunk_size: int | None = 256) -> Tensor:
    """Total variation distance per token, ``TV(p_T, p_S) = ½·Σ_v |p_T − p_S|``, in [0, 1].

    One of the step-wise decomposed divergences of f-distill (Wen et al., "f-Divergence Minimization for
    Sequence-Level Knowledge Distillation", ACL 2023, arXiv:2307.15190, the TVD variant), and a baseline
    in DistiLLM (Ko et al. 2024, arXiv:2402.03898). Symmetric; its (sub)gradient at equality is 0.
    """
    return _token_divergence(_tv_rows, "total_variation", student_logits, teacher_logits, mask,
                             temperature, scale_t2, num_tokens, chunk_size)


for _fn in (forward_kl, reverse_kl, generalized_jsd, skew_kl, skew_reverse_kl, total_variation):
    _fn.__doc__ = (_fn.__doc__ or "").rstrip() + "\n" + _SHARED_ARGS
del _fn


# -------------------------------------------------------------------------------- padded vocabularies


def truncate_to_shared_vocab(student_logits: Tensor, teacher_logits: Tensor, vocab_size: int | None = None,
                             *, max_padding: int = 1024) -> tuple[Tensor, Tensor]:
    """Cut both logits to the real vocabulary they share, dropping the embedding-padding rows.

    Models of one tokenizer often pad the output layer to a multiple of 64 or 128 (and different sizes
    pad differently: Qwen2.5-7B has 152,064 rows, Qwen2.5-0.5B 151,936, for 151,665 real tokens). The
    padding rows are never a real token, so comparing the first ``vocab_size`` entries is exact, and
    comparing to a padding row's (untrained) logit would not be.

    Args:
        student_logits: [..., V_S].
        teacher_logits: [..., V_T]; the leading dimensions must match the student's.
        vocab_size: the tokenizer's real size (``len(tokenizer)``); both sides are cut to it and must
            have at least that many rows. ``None``: cut to ``min(V_S, V_T)``, allowed only when the two
            differ by at most ``max_padding`` rows (more cannot be one tokenizer padded differently).
        max_padding: the largest size difference taken for padding when ``vocab_size`` is ``None``.
    Returns:
        ``(student [..., V], teacher [..., V])``: views, no copy.
    Raises:
        ShapeMismatchError: leading dimensions differ, a side is smaller than ``vocab_size``, or (without
            ``vocab_size``) the sizes differ by more than ``max_padding``.
    """
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ShapeMismatchError(
            f"truncate_to_shared_vocab: student {tuple(student_logits.shape)} and teacher "
            f"{tuple(teacher_logits.shape)} differ before the vocabulary dimension"
        )
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if vocab_size is None:
        if abs(v_s - v_t) > max_padding:
            raise ShapeMismatchError(
                f"truncate_to_shared_vocab: student vocabulary {v_s:,} and teacher {v_t:,} differ by "
                f"{abs(v_s - v_t):,} rows (> max_padding={max_padding:,}): not one tokenizer padded "
                "differently; pass vocab_size=len(tokenizer) if they do share a tokenizer, otherwise a "
                "cross-tokenizer method is needed"
            )
        vocab_size = min(v_s, v_t)
    elif vocab_size < 1:
        raise ValueError(f"truncate_to_shared_vocab: vocab_size must be >= 1, got {vocab_size}")
    if v_s < vocab_size or v_t < vocab_size:
        raise ShapeMismatchError(
            f"truncate_to_shared_vocab: the tokenizer has {vocab_size:,} tokens but the student has "
            f"{v_s:,} logits and the teacher {v_t:,}: a model with fewer logits than tokens was not "
            "trained with this tokenizer"
        )
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
