"""Token divergences against a teacher known only by its top-k log-probabilities (an offline logit cache).

Offline distillation stores, for every token the loss covers, the teacher's k most likely token ids and
their log-probabilities instead of the whole [V] distribution: "offline top-k teacher logits", as DistillKit
(arcee-ai) and Megatron-LM's offline-logits KD store them. Anshumann et al., "Sparse Logit Sampling:
Accelerating Knowledge Distillation in LLMs", ACL 2025, arXiv:2503.16870, prove (§3) that top-k caching
gives a *biased* estimate of the teacher's distribution (the tail is lost); what is done with the missing
tail is therefore an explicit choice here, never a silent one:

- ``tail="renormalize"``: the teacher's top-k probabilities renormalised to sum to 1, and the student's
  distribution restricted to the same k ids and renormalised (``log_softmax`` over the k gathered logits).
  The divergence is taken over k outcomes: it ignores how much mass either side puts outside the k ids.
- ``tail="bucket"``: a (k+1)-th outcome, "any other token", on both sides. The teacher's tail mass is
  ``1 − Σ top-k p_T`` (the cache stores it, computed in float32 from the full distribution; else it is
  ``log1p(−exp(logsumexp(top-k log p_T)))``, Mächler's ``log1mexp``), the student's is the mass of its
  softmax outside the k ids, computed as a log-sum-exp over the other logits (no ``1 − Σ`` cancellation).
  The divergence is taken over k + 1 outcomes. By the data-processing inequality this coarse-grained
  divergence is at most the dense one, is ≥ 0, and is 0 when the student equals the teacher.

- ``tail="sample"`` (forward KL only): the cache holds N i.i.d. draws from the teacher (Anshumann et al.'s
  "Random Sampling KD", the paper's proposal = the teacher itself), as distinct ids ``topk_ids``, their counts
  or frequencies ``weights`` and the teacher's log-probabilities ``topk_logprobs`` at them. Per token::

      KL̂ = Σ_j w_j · (log p_T(j) − log p_S(j)),   w_j = count_j / N,   p_S = softmax(z / τ) over all V

  Since E[count_v / N] = p_T(v), this is an unbiased estimate of KL(p_T ‖ p_S) = Σ_v p_T(v)(log p_T(v) −
  log p_S(v)), and its gradient with respect to the student logits, ``(p_S − p̂_T) / τ`` with p̂_T the
  frequencies, is unbiased for the dense ``(p_S − p_T) / τ``. (The paper trains on the KL from the
  frequencies themselves, Σ_j w_j (log w_j − log p_S(j)): the same gradient, but its value estimates
  nothing; keeping log p_T makes the value unbiased as well.) The student side is normalised over the whole
  vocabulary, never over the drawn ids. Its variance per token is Var_{p_T}(log p_T − log p_S) / N. A
  one-hot teacher gives N draws of one id: exact. The reverse KL, the JSD, the skew KLs and the TV need the
  teacher's probability of whatever the *student* favours, which teacher samples do not carry: they refuse
  ``tail="sample"`` in one line. ``topk_logprobs`` are the teacher's at the loss temperature τ (the draws
  were made from ``softmax(z_T / τ)``): they are used as they are, only the student is divided by τ.

With k = V (every id present) the top-k policies equal the dense divergence of :mod:`alambic.losses.sequence`
exactly (the bucket is empty on both sides, the renormalisation divides by 1): tested, values and
gradients. Every divergence of that module is offered (forward and reverse KL, generalised JSD, skew KL,
skew reverse KL, total variation): each is well defined on k or k + 1 outcomes.

One interface, the dense one's with the teacher logits replaced by the top-k::

    sparse_forward_kl(student_logits, topk_ids, topk_logprobs, mask=None, *, tail="bucket",
                      tail_logprob=None, weights=None, temperature=1.0, scale_t2=False, num_tokens=None,
                      chunk_size=256)

- ``student_logits``: [B, T, V] or [N, V] over the cache's vocabulary (cut padded rows first: a padding
  row's mass would land in the tail); computed in float32 (float64 stays).
- ``topk_ids``: [B, T, k] or [N, k] integer ids in [0, V), distinct within a row.
- ``topk_logprobs``: same shape, the teacher's log-probabilities at those ids (any float dtype; a 16-bit
  cache's values are widened first). Order does not matter.
- ``tail_logprob``: [B, T] or [N], the teacher's log tail mass (``bucket`` only; ``None``: from the top-k).
- ``weights``: [B, T, k] or [N, k], ``sample`` only (and required there): the draw counts (or frequencies)
  of the ids, ≥ 0; each row is divided by its sum. A padding entry has weight 0 and counts for nothing (a row
  may repeat a padding id).
- ``mask``, ``num_tokens``, ``scale_t2``, ``chunk_size``: as in :mod:`alambic.losses.sequence` (sum over
  outcomes and valid tokens, divided by the step's valid-token count; chunked exact gradient).
- ``temperature``: the loss temperature τ. With ``renormalize`` the cached log-probs are divided by τ and
  renormalised over the k ids, which is exactly the tempered teacher restricted to them. With ``bucket``
  only τ = 1 is allowed: the tail's mass at another temperature is not in the cache.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import Tensor

from alambic.errors import ShapeMismatchError
from alambic.losses.sequence import (
    RowFn,
    _compute_dtype,
    _forward_kl_rows,
    _jsd_rows,
    _reverse_kl_rows,
    _skew_kl_rows,
    _skew_reverse_kl_rows,
    _tv_rows,
    masked_token_sum,
)

__all__ = [
    "log1mexp",
    "sparse_forward_kl",
    "sparse_generalized_jsd",
    "sparse_reverse_kl",
    "sparse_skew_kl",
    "sparse_skew_reverse_kl",
    "sparse_total_variation",
]

TAIL_POLICIES = ("renormalize", "bucket", "sample")
_LOG_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x ≤ 0``, accurate at both ends; ``-inf`` (gradient 0) for ``x ≥ 0``.

    Mächler, "Accurately Computing log(1 − exp(−|a|))", CRAN Rmpfr vignette, 2012: ``log(−expm1(x))`` for
    ``x > −log 2`` and ``log1p(−exp(x))`` below. ``x ≥ 0`` (a top-k mass that rounds to 1 or above) means an
    empty tail; the ``where`` keeps the discarded branch's infinite derivative out of the gradient.
    """
    neg = x < 0
    safe = torch.where(neg, x, torch.full_like(x, -1.0))
    y = torch.where(safe > _LOG_HALF, torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe)))
    return torch.where(neg, y, torch.full_like(y, -math.inf))


def _student_tail(z: Tensor, ids: Tensor) -> Tensor:
    """log of the student's unnormalised mass outside ``ids``: logsumexp of the other logits, [n, V] -> [n].

    Rows with no other id (k = V) give ``-inf`` with a zero gradient (not the NaN of a logsumexp of -inf)."""
    rest = z.scatter(-1, ids, -math.inf)
    empty = torch.isneginf(rest).all(-1)
    rest = torch.where(empty[:, None], torch.zeros_like(rest), rest)
    return torch.where(empty, torch.full_like(empty, -math.inf, dtype=z.dtype), torch.logsumexp(rest, -1))


def _sparse_rows(row_fn: RowFn, tail: str, temperature: float, student: Tensor,
                 teacher: tuple[Tensor, ...]) -> Tensor:
    """Student logits [n, V] and teacher (ids [n, k], log-probs [n, k][, tail [n]]) -> [n] divergence."""
    ids, log_t, *rest = teacher
    dtype = _compute_dtype(student)
    z = student.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    ids = ids.long()
    log_t = log_t.to(dtype)
    z_k = z.gather(-1, ids)
    if tail == "renormalize":
        if temperature != 1.0:
            log_t = log_t / temperature
        log_t = log_t - torch.logsumexp(log_t, -1, keepdim=True)
        log_s = z_k - torch.logsumexp(z_k, -1, keepdim=True)
        return row_fn(log_s, log_t)
    lse = torch.logsumexp(z, -1, keepdim=True)
    log_s_tail = _student_tail(z, ids)[:, None] - lse
    if rest:
        log_t_tail = rest[0].to(dtype)[:, None]
    elif ids.shape[-1] == z.shape[-1]:  # every id present: the tail is empty by definition, not by rounding
        log_t_tail = torch.full_like(log_t[:, :1], -math.inf)
    else:
        log_t_tail = log1mexp(torch.logsumexp(log_t, -1, keepdim=True))
    return row_fn(torch.cat([z_k - lse, log_s_tail], -1), torch.cat([log_t, log_t_tail], -1))


def _sampled_forward_kl_rows(temperature: float, student: Tensor, teacher: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Student logits [n, V], teacher (ids [n, k], log p_T [n, k], weights [n, k]) -> [n] the sampled estimate
    ``Σ_j w_j (log p_T(j) − log p_S(j))`` with w normalised per row and p_S over the whole vocabulary."""
    ids, log_t, w = teacher
    dtype = _compute_dtype(student)
    z = student.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    log_s = z.gather(-1, ids.long()) - torch.logsumexp(z, -1, keepdim=True)
    w = w.to(dtype)
    w = w / w.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
    # the where wraps the log-ratio: a padding entry (w = 0) adds 0 to the value and to the gradient
    return (w * torch.where(w > 0, log_t.to(dtype) - log_s, 0.0)).sum(-1)


def _sparse_divergence(row_fn: RowFn, what: str, student_logits: Tensor, topk_ids: Tensor,
                       topk_logprobs: Tensor, mask: Tensor | None, tail: str, tail_logprob: Tensor | None,
                       temperature: float, scale_t2: bool, num_tokens: int | Tensor | None,
                       chunk_size: int | None, weights: Tensor | None = None) -> Tensor:
    if tail not in TAIL_POLICIES:
        raise ValueError(f"{what}: tail must be one of {', '.join(TAIL_POLICIES)}, got {tail!r}")
    if tail == "sample" and row_fn is not _forward_kl_rows:
        raise ValueError(f"{what}: tail='sample' (sampled teacher targets) estimates the forward KL only: "
                         f"{what.removeprefix('sparse_')} needs the teacher's probabilities where the student puts its "
                         "mass, which teacher samples do not give; use sparse_forward_kl, or a top-k cache "
                         "(tail='bucket' or 'renormalize')")
    if (weights is None) != (tail != "sample"):
        raise ValueError(f"{what}: weights (the draw counts) go with tail='sample' and it needs them; got "
                         f"tail={tail!r} and weights={'None' if weights is None else 'a tensor'}")
    if student_logits.dim() < 2 or topk_ids.shape != topk_logprobs.shape \
            or topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ShapeMismatchError(
            f"{what}: needs student logits [B, T, V] (or [N, V]) and top-k ids and log-probs [B, T, k] (or "
            f"[N, k]), got student {tuple(student_logits.shape)}, ids {tuple(topk_ids.shape)} and log-probs "
            f"{tuple(topk_logprobs.shape)}"
        )
    v, k = student_logits.shape[-1], topk_ids.shape[-1]
    if not 1 <= k <= v:
        raise ShapeMismatchError(f"{what}: k = {k} top-k entries for a vocabulary of {v}")
    if not student_logits.is_floating_point() or not topk_logprobs.is_floating_point():
        raise TypeError(f"{what}: logits and log-probs must be floating point, got {student_logits.dtype} and "
                        f"{topk_logprobs.dtype}")
    if topk_ids.is_floating_point() or topk_ids.dtype == torch.bool:
        raise TypeError(f"{what}: topk_ids must be integer, got {topk_ids.dtype}")
    if temperature <= 0:
        raise ValueError(f"{what}: temperature must be > 0, got {temperature}")
    if tail == "bucket" and temperature != 1.0:
        raise ValueError(f"{what}: tail='bucket' needs temperature=1 (the tail's mass at temperature {temperature} "
                         "is not in the cache); use tail='renormalize'")
    if tail_logprob is not None and (tail != "bucket" or tail_logprob.shape != topk_ids.shape[:-1]):
        raise ShapeMismatchError(f"{what}: tail_logprob goes with tail='bucket' and has shape "
                                 f"{tuple(topk_ids.shape[:-1])}, got {tuple(tail_logprob.shape)} with tail={tail!r}")
    teacher: tuple[Tensor, ...] = (topk_ids.detach().reshape(-1, k), topk_logprobs.detach().reshape(-1, k))
    if weights is not None:
        if weights.shape != topk_ids.shape:
            raise ShapeMismatchError(f"{what}: weights must have the ids' shape {tuple(topk_ids.shape)}, got "
                                     f"{tuple(weights.shape)}")
        if not bool((weights.detach() >= 0).all()):
            raise ValueError(f"{what}: weights (draw counts or frequencies) must be >= 0")
        teacher = (*teacher, weights.detach().reshape(-1, k))
        return masked_token_sum(partial(_sampled_forward_kl_rows, temperature), what, student_logits, teacher,
                                mask, temperature, scale_t2, num_tokens, chunk_size)
    if tail_logprob is not None:
        teacher = (*teacher, tail_logprob.detach().reshape(-1))
    return masked_token_sum(partial(_sparse_rows, row_fn, tail, temperature), what, student_logits, teacher, mask,
                            temperature, scale_t2, num_tokens, chunk_size)


_SHARED_ARGS = """
    Args:
        student_logits: [B, T, V] or [N, V] over the cache's vocabulary, any float dtype.
        topk_ids: [B, T, k] or [N, k] integer teacher ids (distinct in a row), any integer dtype.
        topk_logprobs: same shape: the teacher's log-probabilities at ``topk_ids``; a constant.
        mask: [B, T] or [N] bool, True at the tokens that count; ``None``: all.
        tail: ``"bucket"`` (a (k+1)-th "other tokens" outcome on both sides), ``"renormalize"`` (both
            sides restricted to the k ids and renormalised) or ``"sample"`` (sampled teacher targets with
            ``weights``: forward KL only, refused by the others).
        tail_logprob: [B, T] or [N] the teacher's log tail mass (``bucket``); ``None``: from the top-k.
        weights: [B, T, k] or [N, k] draw counts or frequencies (``sample`` only, required there).
        temperature: loss temperature τ (``bucket``: 1 only; ``sample``: the temperature the draws and
            log-probs were made at).
        scale_t2: multiply by τ² (default off).
        num_tokens: normaliser: the valid-token count of the whole optimizer step; default this call's.
        chunk_size: tokens per chunk (peak memory O(chunk_size × V)); ``None``: unchunked autograd.
    Returns:
        scalar, float32 (float64 for float64 logits): Σ_tokens Σ_outcomes (...) / num_tokens.
"""


def sparse_forward_kl(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor | None = None,
                      *, tail: str = "bucket", tail_logprob: Tensor | None = None, weights: Tensor | None = None,
                      temperature: float = 1.0, scale_t2: bool = False, num_tokens: int | Tensor | None = None,
                      chunk_size: int | None = 256) -> Tensor:
    """Forward KL ``KL(p_T ‖ p_S)`` on the teacher's top-k (plus the tail bucket, or renormalised), or its
    unbiased estimate from sampled teacher targets (``tail="sample"``, ``weights`` = draw counts).

    The objective of offline top-k distillation (Anshumann et al. 2025, arXiv:2503.16870, §2–3, the
    "Top-K" baseline whose bias they analyse) and of their Random Sampling KD (``sample``: ``Σ_j w_j (log
    p_T(j) − log p_S(j))``, w the draw frequencies; see the module docstring for why it is unbiased in value
    and gradient); dense counterpart :func:`alambic.losses.forward_kl`.
    """
    return _sparse_divergence(_forward_kl_rows, "sparse_forward_kl", student_logits, topk_ids, topk_logprobs,
                              mask, tail, tail_logprob, temperature, scale_t2, num_tokens, chunk_size, weights)


def sparse_reverse_kl(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor | None = None,
                      *, tail: str = "bucket", tail_logprob: Tensor | None = None, temperature: float = 1.0,
                      scale_t2: bool = False, num_tokens: int | Tensor | None = None,
                      chunk_size: int | None = 256) -> Tensor:
    """Reverse KL ``KL(p_S ‖ p_T)`` on the k (or k + 1) outcomes; dense counterpart
    :func:`alambic.losses.reverse_kl` (MiniLLM, arXiv:2306.08543). With ``bucket`` a student that puts mass
    in the tail pays for it against the teacher's tail mass (infinite if the teacher's tail is empty)."""
    return _sparse_divergence(_reverse_kl_rows, "sparse_reverse_kl", student_logits, topk_ids, topk_logprobs,
                              mask, tail, tail_logprob, temperature, scale_t2, num_tokens, chunk_size)


def sparse_generalized_jsd(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
                           mask: Tensor | None = None, *, beta: float = 0.5, tail: str = "bucket",
                           tail_logprob: Tensor | None = None, temperature: float = 1.0, scale_t2: bool = False,
                           num_tokens: int | Tensor | None = None, chunk_size: int | None = 256) -> Tensor:
    """GKD's generalised JSD(β), 0 < β < 1 (Agarwal et al. 2024, arXiv:2306.13649, §2) on the k (or k + 1)
    outcomes; dense counterpart :func:`alambic.losses.generalized_jsd` (same refusal of β at 0 or 1)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"sparse_generalized_jsd: beta must be in (0, 1), got {beta}; for beta=0 use "
                         "sparse_forward_kl and for beta=1 sparse_reverse_kl")
    return _sparse_divergence(partial(_jsd_rows, beta=beta), "sparse_generalized_jsd", student_logits, topk_ids,
                              topk_logprobs, mask, tail, tail_logprob, temperature, scale_t2, num_tokens, chunk_size)


def sparse_skew_kl(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor, mask: Tensor | None = None,
                   *, alpha: float = 0.1, tail: str = "bucket", tail_logprob: Tensor | None = None,
                   temperature: float = 1.0, scale_t2: bool = False, num_tokens: int | Tensor | None = None,
                   chunk_size: int | None = 256) -> Tensor:
    """DistiLLM's α-skew KL ``KL(p_T ‖ α·p_T + (1 − α)·p_S)`` (Ko et al. 2024, arXiv:2402.03898, §3.1) on the
    k (or k + 1) outcomes; dense counterpart :func:`alambic.losses.skew_kl`."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"sparse_skew_kl: alpha must be in [0, 1], got {alpha}")
    return _sparse_divergence(partial(_skew_kl_rows, alpha=alpha), "sparse_skew_kl", student_logits, topk_ids,
                              topk_logprobs, mask, tail, tail_logprob, temperature, scale_t2, num_tokens, chunk_size)


def sparse_skew_reverse_kl(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
                           mask: Tensor | None = None, *, alpha: float = 0.1, tail: str = "bucket",
                           tail_logprob: Tensor | None = None, temperature: float = 1.0, scale_t2: bool = False,
                           num_tokens: int | Tensor | None = None, chunk_size: int | None = 256) -> Tensor:
    """DistiLLM's α-skew reverse KL ``KL(p_S ‖ α·p_S + (1 − α)·p_T)`` (arXiv:2402.03898, §3.1) on the k (or
    k + 1) outcomes; dense counterpart :func:`alambic.losses.skew_reverse_kl`."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"sparse_skew_reverse_kl: alpha must be in [0, 1], got {alpha}")
    return _sparse_divergence(partial(_skew_reverse_kl_rows, alpha=alpha), "sparse_skew_reverse_kl", student_logits,
                              topk_ids, topk_logprobs, mask, tail, tail_logprob, temperature, scale_t2, num_tokens,
                              chunk_size)


def sparse_total_variation(student_logits: Tensor, topk_ids: Tensor, topk_logprobs: Tensor,
                           mask: Tensor | None = None, *, tail: str = "bucket", tail_logprob: Tensor | None = None,
                           temperature: float = 1.0, scale_t2: bool = False, num_tokens: int | Tensor | None = None,
                           chunk_size: int | None = 256) -> Tensor:
    """Total variation ``½·Σ|p_T − p_S|`` on the k (or k + 1) outcomes (f-distill's TVD, arXiv:2307.15190);
    dense counterpart :func:`alambic.losses.total_variation`."""
    return _sparse_divergence(_tv_rows, "sparse_total_variation", student_logits, topk_ids, topk_logprobs, mask,
                              tail, tail_logprob, temperature, scale_t2, num_tokens, chunk_size)


for _fn in (sparse_forward_kl, sparse_reverse_kl, sparse_generalized_jsd, sparse_skew_kl, sparse_skew_reverse_kl,
            sparse_total_variation):
    _fn.__doc__ = (_fn.__doc__ or "").rstrip() + "\n" + _SHARED_ARGS
del _fn
