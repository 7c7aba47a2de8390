"""Policy-gradient and reasoning-distillation losses: GRPO / Dr. GRPO advantages, the clipped-ratio loss with
DAPO's decoupled clip, the TRRD teacher anchor, REDI, pi-Distill / OPSD and CurioSFT's tempered self-teacher.

Pure tensor functions of *per-token log-probabilities of sampled tokens* (``logp_BT``: ``log π(o_t | o_<t)``
for the token ``o_t`` actually in the completion, see :func:`sampled_token_logprobs`), rewards and masks;
shapes in the docstrings, no configs, no modules, no generation. Conventions shared by every function:

- ``mask_BT``: bool, True at the completion tokens that count (None: all). Masked positions are never read
  into a value or a gradient (``where``, not multiplication), so padding may hold anything, NaN included.
- Anchors and teachers (``old_logp``, ``teacher_logp`` of TRRD, the detached side of pi-Distill) are
  constants: they are detached here, whatever their ``requires_grad``.
- Losses are to be *minimised* (the negated objectives of the papers). Per-token quantities are computed in
  float32 (float64 stays float64), so bf16 log-probs lose nothing to a half-precision exp.

Which GRPO corrections are applied, and where. pi-Distill (arXiv:2602.04942) trains with GRPO "with the
DAPO / Dr. GRPO fixes" and no reference-model KL (seed notes; which fixes exactly is not spelled out there),
so the defaults here are the bias corrections of both papers, each switchable:

1. **No std normalisation of advantages** (Dr. GRPO): :func:`group_advantages` with ``scale_std=False``
   (the default) gives ``r_i − mean_j r_j``. ``scale_std=True`` gives GRPO's ``(r_i − mean)/(std + eps)``.
2. **No per-sequence length normalisation** (Dr. GRPO; DAPO's token-level loss): the default aggregation
   ``"token_mean"`` sums the per-token losses of all completions of the batch and divides by their total
   token count (DAPO, arXiv:2503.14476, §3.3 "token-level policy gradient loss"), so every token weighs the same
   whatever the length of its completion. ``"sequence_mean"`` is GRPO's ``1/G Σ_i 1/|o_i| Σ_t`` (the
   length bias Dr. GRPO removes). ``"constant"`` divides the sum by ``B × max_length``, a constant
   independent of the sampled lengths: Dr. GRPO's unbiased form, whose normaliser does not even depend on
   the batch's lengths.
3. **Decoupled clip** (DAPO "clip-higher", §3.1): ``clip(r, 1 − ε_low, 1 + ε_high)``; ``eps_high=None``
   is PPO's symmetric clip. DAPO uses ε_low = 0.2, ε_high = 0.28.
4. **No KL to a reference model** (DAPO §2.3, pi-Distill): none of these losses has one; add one yourself
   if a method wants it.

Not here: dynamic sampling (dropping groups whose rewards are all equal: their advantages are exactly 0,
so they add nothing but tokens to the ``"token_mean"`` normaliser; filter them in the method) and DAPO's
overlong reward shaping (a reward transform).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from alambic.errors import ShapeMismatchError

__all__ = [
    "PiDistillOutput",
    "PolicyLossOutput",
    "bisect_temperature",
    "clipped_policy_loss",
    "curio_sft_loss",
    "curio_target_entropy",
    "curio_temperature",
    "group_advantages",
    "length_normalized_logprob",
    "opsd_loss",
    "opsd_token_rewards",
    "pi_distill_loss",
    "redi_loss",
    "sampled_token_logprobs",
    "tempered_topk_entropy",
    "trrd_anchor_logprobs",
    "trrd_loss",
]

AGGREGATIONS = ("token_mean", "sequence_mean", "constant")


# ----------------------------------------------------------------------------------------------- helpers


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _mask(mask: Tensor | None, like: Tensor, what: str) -> Tensor:
    if like.dim() != 2:
        raise ShapeMismatchError(f"{what}: per-token log-probs must be [B, T], got {tuple(like.shape)}")
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    if mask.shape != like.shape:
        raise ShapeMismatchError(f"{what}: mask {tuple(mask.shape)} does not match log-probs {tuple(like.shape)}")
    return mask.bool()


def _same(a: Tensor, b: Tensor, what: str, names: str) -> None:
    if a.shape != b.shape:
        raise ShapeMismatchError(f"{what}: {names} have shapes {tuple(a.shape)} and {tuple(b.shape)}")


def _per_token_advantages(advantages: Tensor, like: Tensor, what: str) -> Tensor:
    """[B] (one advantage per completion) or [B, T] -> [B, T] float, detached."""
    adv = _f32(advantages.detach())
    if adv.dim() == 1 and adv.shape[0] == like.shape[0]:
        return adv[:, None].expand_as(like)
    if adv.shape == like.shape:
        return adv
    raise ShapeMismatchError(f"{what}: advantages {tuple(adv.shape)} must be [B] or [B, T] for log-probs "
                             f"{tuple(like.shape)}")


def _aggregate(per_token: Tensor, mask: Tensor, aggregation: str, num_tokens: float | Tensor | None,
               max_length: int | None, what: str) -> Tensor:
    """Reduce a [B, T] per-token loss (already 0 at masked positions) to a scalar; see the module docstring.

    ``num_tokens`` (``"token_mean"`` only): the divisor to use instead of this call's valid-token count (the
    count of the whole optimizer step under gradient accumulation, so the chunks' losses add up to the
    batch's). An empty mask gives 0 with a graph, never NaN.
    """
    if aggregation == "token_mean":
        denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=per_token.device)
        return per_token.sum() / denom.clamp_min(1).to(per_token.dtype)
    if aggregation == "sequence_mean":
        lengths = mask.sum(-1)
        rows = lengths > 0
        per_seq = per_token.sum(-1) / lengths.clamp_min(1).to(per_token.dtype)
        return per_seq.sum() / rows.sum().clamp_min(1).to(per_token.dtype)
    if aggregation == "constant":
        if max_length is None or max_length < 1:
            raise ValueError(f"{what}: aggregation 'constant' needs max_length >= 1 (the generation budget)")
        return per_token.sum() / (per_token.shape[0] * max_length)
    raise ValueError(f"{what}: aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def sampled_token_logprobs(logits_BTV: Tensor, tokens_BT: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(z / τ)[o_t]`` of the sampled tokens: [B, T, V] logits, [B, T] ids -> [B, T] float32.

    Align first: position ``t`` of a causal LM's logits scores token ``t + 1``. Computed as
    ``z[o] − logsumexp(z)`` so no [B, T, V] log-softmax is materialised beyond what ``logsumexp`` needs.
    Ids outside ``[0, V)`` (padding such as ``-100``) are read as 0; mask those positions.
    """
    if logits_BTV.shape[:-1] != tokens_BT.shape:
        raise ShapeMismatchError(f"sampled_token_logprobs: logits {tuple(logits_BTV.shape)} and tokens "
                                 f"{tuple(tokens_BT.shape)} do not align")
    z = _f32(logits_BTV)
    if temperature != 1.0:
        z = z / temperature
    ids = tokens_BT.long().clamp(0, z.shape[-1] - 1)
    return z.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(z, dim=-1)


# ------------------------------------------------------------------------------------ advantages and ratio


def group_advantages(rewards_BG: Tensor, scale_std: bool = False, eps: float = 1e-6,
                     unbiased_std: bool = False) -> Tensor:
    """Group-relative advantages of G completions per prompt: [B, G] rewards -> [B, G] float32.

    GRPO (Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models",
    2024, arXiv:2402.03300, §4.1.2 outcome supervision): ``Â_i = (r_i − mean(r)) / std(r)``, the same for
    every token of completion i. Dr. GRPO (Liu et al., "Understanding R1-Zero-Like Training: A Critical
    Perspective", 2025, arXiv:2503.20783, the Dr. GRPO fix of GRPO's optimisation bias): drop the division
    by ``std``, which up-weights prompts
    whose rewards barely vary (too easy or too hard): ``Â_i = r_i − mean(r)`` (``scale_std=False``, the
    default, as pi-Distill uses). With ``scale_std=True`` the std is the population one (``unbiased_std``
    for Bessel's correction, as some implementations use) and ``eps`` keeps a constant group at 0
    advantage. Either way a group whose rewards are all equal gets advantages of exactly 0.
    """
    if rewards_BG.dim() != 2:
        raise ShapeMismatchError(f"group_advantages: rewards must be [B, G], got {tuple(rewards_BG.shape)}")
    r = _f32(rewards_BG.detach())
    centred = r - r.mean(dim=1, keepdim=True)
    if not scale_std:
        return centred
    if unbiased_std and r.shape[1] < 2:
        raise ValueError("group_advantages: an unbiased std needs G >= 2 completions per prompt")
    std = r.std(dim=1, keepdim=True, correction=1 if unbiased_std else 0)
    return centred / (std + eps)


@dataclass(frozen=True)
class PolicyLossOutput:
    """The loss of :func:`clipped_policy_loss` and what a method logs about it (all statistics detached,
    averaged over the valid tokens):

    - ``ratio_mean``: mean of ``r_t = π_θ / π_anchor``;
    - ``clip_low_fraction``: tokens whose gradient the lower clip removed (``Â < 0`` and ``r < 1 − ε_low``);
    - ``clip_high_fraction``: tokens whose gradient the upper clip removed (``Â > 0`` and ``r > 1 + ε_high``);
    - ``approx_kl``: ``mean (r − 1) − log r``, Schulman's k3 estimator of ``KL(π_anchor ‖ π_θ)`` on tokens
      sampled from the anchor (non-negative per token, 0 iff ``r = 1``).
    """

    loss: Tensor
    ratio_mean: Tensor
    clip_low_fraction: Tensor
    clip_high_fraction: Tensor
    approx_kl: Tensor

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The statistics as floats for a metrics line: ``{prefix}ratio``, ``{prefix}clip_low``, ..."""
        return {f"{prefix}ratio": float(self.ratio_mean), f"{prefix}clip_low": float(self.clip_low_fraction),
                f"{prefix}clip_high": float(self.clip_high_fraction), f"{prefix}approx_kl": float(self.approx_kl)}


def _check_eps(eps_low: float, eps_high: float | None, what: str) -> float:
    if not 0.0 <= eps_low <= 1.0:
        raise ValueError(f"{what}: eps_low must be in [0, 1], got {eps_low}")
    eps_high = eps_low if eps_high is None else eps_high
    if not eps_high >= 0.0:
        raise ValueError(f"{what}: eps_high must be >= 0, got {eps_high}")
    return eps_high


def clipped_policy_loss(logp_BT: Tensor, anchor_logp_BT: Tensor, advantages: Tensor, mask_BT: Tensor | None = None,
                        *, eps_low: float = 0.2, eps_high: float | None = None, aggregation: str = "token_mean",
                        num_tokens: float | Tensor | None = None, max_length: int | None = None) -> PolicyLossOutput:
    """The clipped-ratio policy loss: ``−agg_t min(r_t Â_t, clip(r_t, 1 − ε_low, 1 + ε_high) Â_t)``.

    PPO's clipped surrogate (Schulman et al., 2017, arXiv:1707.06347, Eq. 7) in GRPO's group form (Shao et
    al., 2024, arXiv:2402.03300, Eq. 3, without its KL term), with DAPO's decoupled bounds (Yu et al.,
    "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", 2025, arXiv:2503.14476, §3.1 and
    the objective of §3.3). ``r_t = exp(logp − anchor_logp)``; the anchor is π_old for GRPO/PPO, the
    TRRD mixture of :func:`trrd_anchor_logprobs`, or the detached teacher in pi-Distill's student term.

    Args:
        logp_BT: [B, T] log-probs of the sampled tokens under the policy being trained (with a graph).
        anchor_logp_BT: [B, T] log-probs under the anchor (detached here).
        advantages: [B] (one per completion, as GRPO) or [B, T] (per token, e.g. plus a dense reward).
        mask_BT: [B, T] bool completion mask (None: all tokens).
        eps_low, eps_high: the clip range; ``eps_high=None`` means ``eps_high = eps_low`` (PPO).
        aggregation: ``"token_mean"`` (DAPO, default), ``"sequence_mean"`` (GRPO) or ``"constant"``
            (Dr. GRPO, needs ``max_length``); see the module docstring. ``num_tokens``: the token-mean divisor
            of the whole optimizer step.
    Returns: :class:`PolicyLossOutput`.
    """
    what = "clipped_policy_loss"
    eps_high = _check_eps(eps_low, eps_high, what)
    _same(logp_BT, anchor_logp_BT, what, "log-probs and anchor log-probs")
    mask = _mask(mask_BT, logp_BT, what)
    adv = _per_token_advantages(advantages, logp_BT, what)
    log_ratio = torch.where(mask, _f32(logp_BT) - _f32(anchor_logp_BT.detach()), 0.0)
    ratio = log_ratio.exp()
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    per_token = torch.where(mask, -surrogate, 0.0)
    loss = _aggregate(per_token, mask, aggregation, num_tokens, max_length, what)
    with torch.no_grad():
        n = mask.sum().clamp_min(1)
        ratio_d, log_ratio_d = ratio.detach(), log_ratio.detach()
        low = mask & (adv < 0) & (ratio_d < 1.0 - eps_low)
        high = mask & (adv > 0) & (ratio_d > 1.0 + eps_high)
        stats = {
            "ratio_mean": torch.where(mask, ratio_d, 0.0).sum() / n,
            "clip_low_fraction": low.sum() / n,
            "clip_high_fraction": high.sum() / n,
            "approx_kl": torch.where(mask, ratio_d - 1.0 - log_ratio_d, 0.0).sum() / n,
        }
    return PolicyLossOutput(loss=loss, **stats)


# ------------------------------------------------------------------------------------------------- TRRD


def trrd_anchor_logprobs(old_logp_BT: Tensor, teacher_logp_BT: Tensor, alpha: float) -> Tensor:
    """TRRD's anchor ``log(π_old^α · π_T^(1−α)) = α·log π_old + (1 − α)·log π_T``: [B, T] -> [B, T], detached.

    Zhang et al., "Reinforcement-aware Knowledge Distillation for LLM Reasoning" (RLAD), 2026,
    arXiv:2602.22495, Trust Region Ratio Distillation: GRPO's ratio ``π_θ/π_old`` becomes
    ``π_θ / (π_old^α π_T^(1−α))``. The formula was checked against a secondary source only (seed notes);
    α = 1 is GRPO's anchor exactly (returned as is, so a ``-inf`` teacher log-prob cannot turn into NaN
    through ``0 · -inf``), α = 0 anchors the trust region on the teacher. The teacher gets no gradient.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"trrd_anchor_logprobs: alpha must be in [0, 1], got {alpha}")
    _same(old_logp_BT, teacher_logp_BT, "trrd_anchor_logprobs", "old and teacher log-probs")
    old, teacher = _f32(old_logp_BT.detach()), _f32(teacher_logp_BT.detach())
    if alpha == 1.0:
        return old
    if alpha == 0.0:
        return teacher
    return alpha * old + (1.0 - alpha) * teacher


def trrd_loss(logp_BT: Tensor, old_logp_BT: Tensor, teacher_logp_BT: Tensor, advantages: Tensor,
              mask_BT: Tensor | None = None, *, alpha: float = 0.5, **clip_kwargs) -> PolicyLossOutput:
    """TRRD: :func:`clipped_policy_loss` with the anchor of :func:`trrd_anchor_logprobs`.

    ``J = E[min(r Â, clip(r, 1 − ε, 1 + ε) Â)]`` with ``log r = log π_θ − α log π_old − (1 − α) log π_T``
    (RLAD, arXiv:2602.22495). The paper's optional ``−β·KL(π_θ ‖ π_ref)`` is not included. ``clip_kwargs``:
    ``eps_low``, ``eps_high``, ``aggregation``, ``num_tokens``, ``max_length``.
    """
    anchor = trrd_anchor_logprobs(old_logp_BT, teacher_logp_BT, alpha)
    return clipped_policy_loss(logp_BT, anchor, advantages, mask_BT, **clip_kwargs)


# ------------------------------------------------------------------------------------------------- REDI


def length_normalized_logprob(logp_BT: Tensor, mask_BT: Tensor | None = None) -> Tensor:
    """``log π(y|x) / |y|`` per sequence: [B, T] token log-probs -> [B]; the length is clamped to >= 1, so an
    empty sequence gives 0 instead of NaN."""
    mask = _mask(mask_BT, logp_BT, "length_normalized_logprob")
    lp = torch.where(mask, _f32(logp_BT), 0.0)
    return lp.sum(-1) / mask.sum(-1).clamp_min(1).to(lp.dtype)


def redi_loss(pos_logp_BT: Tensor | None, pos_mask_BT: Tensor | None, neg_logp_BT: Tensor | None,
              neg_mask_BT: Tensor | None, alpha: float = 0.8, pos_coef: float = 1.0) -> Tensor:
    """REDI's reference-free objective on positive (correct) and negative (incorrect) teacher traces.

    Xu et al., "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning",
    2025, arXiv:2505.24850, stage 2 (the REDI objective)::

        L = −mean_i log π(y⁺_i|x_i)/|y⁺_i|  +  α · mean_j log π(y⁻_j|x_j)/|y⁻_j|

    Length normalisation keeps long negative traces from dominating; α < 1 (0.8 in the paper's recipe)
    pushes down the negatives more gently than the positives are pulled up, which the paper finds is what
    keeps training stable. α = 0 is length-normalised NLL on the positives (stage 1's SFT, up to the
    normalisation). The gradient with respect to one token log-prob of negative j is ``+α / (|y⁻_j| B⁻)``.
    The optional negative re-weighting of the authors' code is not implemented (off by default there).

    Args: pos_logp_BT [B⁺, T⁺], neg_logp_BT [B⁻, T⁻] token log-probs of the traces under the student, with
    their masks; either side may be None or have B = 0 (its term is then 0). Returns: scalar.
    """
    if not alpha >= 0.0:
        raise ValueError(f"redi_loss: alpha must be >= 0, got {alpha}")
    terms = []
    for logp, mask, coef in ((pos_logp_BT, pos_mask_BT, -pos_coef), (neg_logp_BT, neg_mask_BT, alpha)):
        if logp is None or logp.shape[0] == 0 or coef == 0.0:
            continue
        terms.append(coef * length_normalized_logprob(logp, mask).mean())
    if not terms:
        ref = pos_logp_BT if pos_logp_BT is not None else neg_logp_BT
        if ref is None:
            raise ValueError("redi_loss: no positive and no negative traces")
        return torch.where(torch.zeros_like(ref, dtype=torch.bool), _f32(ref), 0.0).sum()  # 0, with a graph
    return torch.stack(terms).sum()


# ----------------------------------------------------------------------------------- pi-Distill and OPSD


def _kl_k3(log_q_over_p: Tensor) -> Tensor:
    """Schulman's k3 ``exp(d) − 1 − d`` with ``d = log q − log p`` on samples of p: unbiased for KL(p ‖ q)."""
    return log_q_over_p.exp() - 1.0 - log_q_over_p


@dataclass(frozen=True)
class PiDistillOutput:
    """:func:`pi_distill_loss`: the loss and its terms (detached values, for logging).

    ``teacher``, ``student``: the two clipped policy terms (their :class:`PolicyLossOutput`, None when the
    α weight of that side is 0); ``kl``: the k3 estimate of ``KL(π^T ‖ π^S)`` on the teacher's samples, the
    quantity both KL terms penalise (0 with empty PI)."""

    loss: Tensor
    teacher: PolicyLossOutput | None
    student: PolicyLossOutput | None
    kl: Tensor


def pi_distill_loss(teacher_logp_BT: Tensor, student_logp_BT: Tensor, teacher_old_logp_BT: Tensor,
                    advantages: Tensor, mask_BT: Tensor | None = None, *, alpha: float = 0.5, beta: float = 0.0,
                    eps_low: float = 0.2, eps_high: float | None = None, aggregation: str = "token_mean",
                    num_tokens: float | Tensor | None = None, max_length: int | None = None) -> PiDistillOutput:
    """pi-Distill: one model, teacher with privileged information (PI), student without; ``J = α J_T + (1 − α) J_S``.

    Penaloza et al., "Privileged Information Distillation for Language Models", 2026, arXiv:2602.04942,
    Eqs. (2)–(5) as quoted in the seed notes; completions ``o`` are sampled from the teacher (context with PI):

    - ``J_T = E_{o∼π^T}[R] − β KL(π^T ‖ sg π^S)``: GRPO on the teacher's own samples, pulled towards what
      the student can express. Gradient only through the teacher forward (``teacher_logp``).
    - ``J_S = E_{o∼π^T}[π^S / sg(π^T) · R] − β KL(sg π^T ‖ π^S)``: the student learns from the teacher's
      samples by importance weighting, plus a KL towards the (constant) teacher. Gradient only through
      the student forward (``student_logp``).

    How the expectations become per-token losses (choices of this implementation, stated because the
    paper's equations are sequence-level):

    - Both reward terms use the clipped per-token ratio of :func:`clipped_policy_loss` with the group
      advantages ``Â`` of the teacher's samples: ``π^T/π^T_old`` for J_T, ``π^S/sg π^T`` for J_S
      (``eps_low=1, eps_high=inf`` gives the unclipped ratio of the equations exactly).
    - ``KL(sg π^T ‖ π^S)`` (J_S): k3 ``exp(d) − 1 − d``, ``d = log π^S − sg log π^T``, on the teacher's
      tokens, differentiated directly: unbiased for the value and for the gradient (the sampling
      distribution does not depend on the student), and exactly 0 with zero gradient per token when the
      two log-probs agree.
    - ``KL(π^T ‖ sg π^S)`` (J_T): the samples come from π^T itself, so the gradient is the score function
      ``E[(log π^T − log π^S) ∇ log π^T]`` per token (no reward-to-go); the term's value is the k3 estimate.
    - Estimators assume the samples come from the current teacher (``teacher_old_logp == teacher_logp`` on
      the first update of a batch), as GRPO's own KL term does.

    With empty PI the two contexts are identical, ``teacher_logp == student_logp``, and both KL terms are 0
    in value and gradient. α = 1 trains the teacher only, α = 0 the student only (the paper's α ∈ {0, 0.5, 1});
    a side whose weight is 0 is not computed, so its input gets no gradient at all.

    Args:
        teacher_logp_BT: [B, T] log-probs of the sampled tokens given the PI context (with a graph).
        student_logp_BT: [B, T] the same tokens given the context without PI (with a graph).
        teacher_old_logp_BT: [B, T] the teacher context under the policy that sampled (π_old), detached.
        advantages: [B] or [B, T] (e.g. :func:`group_advantages` of the teacher samples' rewards).
        alpha: the mix α in [0, 1]; beta: the KL weight β >= 0.
    """
    what = "pi_distill_loss"
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{what}: alpha must be in [0, 1], got {alpha}")
    if not beta >= 0.0:
        raise ValueError(f"{what}: beta must be >= 0, got {beta}")
    _same(teacher_logp_BT, student_logp_BT, what, "teacher and student log-probs")
    mask = _mask(mask_BT, teacher_logp_BT, what)
    clip = {"eps_low": eps_low, "eps_high": eps_high, "aggregation": aggregation, "num_tokens": num_tokens,
            "max_length": max_length}
    agg = {"aggregation": aggregation, "num_tokens": num_tokens, "max_length": max_length, "what": what}
    lt, ls = _f32(teacher_logp_BT), _f32(student_logp_BT)
    d_teacher = torch.where(mask, ls.detach() - lt, 0.0)     # log π^S − log π^T, graph through the teacher
    d_student = torch.where(mask, ls - lt.detach(), 0.0)     # the same, graph through the student
    with torch.no_grad():
        kl_value = _aggregate(torch.where(mask, _kl_k3(d_teacher.detach()), 0.0), mask, **agg)
    loss = torch.zeros((), dtype=lt.dtype, device=lt.device)
    teacher_out = student_out = None
    if alpha > 0.0:
        teacher_out = clipped_policy_loss(teacher_logp_BT, teacher_old_logp_BT, advantages, mask, **clip)
        term = teacher_out.loss
        if beta > 0.0:
            # value k3, gradient (log π^T − log π^S) ∇ log π^T (score function)
            score = (-d_teacher.detach()) * (lt - lt.detach())
            kl_t = torch.where(mask, _kl_k3(d_teacher.detach()) + score, 0.0)
            term = term + beta * _aggregate(kl_t, mask, **agg)
        loss = loss + alpha * term
    if alpha < 1.0:
        student_out = clipped_policy_loss(student_logp_BT, teacher_logp_BT.detach(), advantages, mask, **clip)
        term = student_out.loss
        if beta > 0.0:
            term = term + beta * _aggregate(torch.where(mask, _kl_k3(d_student), 0.0), mask, **agg)
        loss = loss + (1.0 - alpha) * term
    return PiDistillOutput(loss=loss, teacher=teacher_out, student=student_out, kl=kl_value)


def opsd_token_rewards(student_logp_BT: Tensor, teacher_logp_BT: Tensor, mask_BT: Tensor | None = None,
                       beta: float = 1.0) -> Tensor:
    """OPSD's dense per-token reward ``−β (log π^S(o_t) − log π^T(o_t))``: [B, T] -> [B, T], detached, 0 where masked.

    Penaloza et al., 2026, arXiv:2602.04942, On-Policy Self-Distillation:
    ``J = E_{o∼π^S}[R] − β KL(π^S ‖ sg π^T)`` on the student's own samples, the teacher being the same
    model given the privileged information. The reverse KL's single-sample estimate at token t is
    ``log π^S − log π^T``; as a reward it is penalised per token (no reward-to-go). 0 everywhere when the
    PI is empty (identical contexts).
    """
    _same(student_logp_BT, teacher_logp_BT, "opsd_token_rewards", "student and teacher log-probs")
    mask = _mask(mask_BT, student_logp_BT, "opsd_token_rewards")
    diff = _f32(student_logp_BT.detach()) - _f32(teacher_logp_BT.detach())
    return torch.where(mask, -beta * diff, 0.0)


def opsd_loss(student_logp_BT: Tensor, student_old_logp_BT: Tensor, teacher_logp_BT: Tensor, advantages: Tensor,
              mask_BT: Tensor | None = None, *, beta: float = 1.0, **clip_kwargs) -> PolicyLossOutput:
    """OPSD: :func:`clipped_policy_loss` on the student's samples with per-token advantages
    ``Â_i + r^KL_t`` (the group advantage of the outcome plus :func:`opsd_token_rewards`).

    The KL reward is added after the group normalisation of the outcome rewards, so it is neither centred
    nor scaled by the group. ``student_old_logp`` is the sampling policy (no PI) for the ratio;
    ``teacher_logp`` (the PI context) is a constant. ``clip_kwargs`` as in :func:`trrd_loss`.
    """
    dense = opsd_token_rewards(student_logp_BT, teacher_logp_BT, mask_BT, beta)
    adv = _per_token_advantages(advantages, student_logp_BT, "opsd_loss") + dense
    return clipped_policy_loss(student_logp_BT, student_old_logp_BT, adv, mask_BT, **clip_kwargs)


# --------------------------------------------------------------------------------------------- CurioSFT


def tempered_topk_entropy(logits: Tensor, tau: Tensor | float, top_k: int = 512) -> Tensor:
    """Entropy of ``softmax(z_topk / τ)`` over the ``top_k`` largest logits, renormalised: [..., V] -> [...].

    ``tau``: a float or a tensor of shape [...] (one temperature per row). The top-k set does not depend on
    τ > 0. Entries of ``-inf`` (masked vocabulary) contribute 0. Non-decreasing in τ.
    """
    z = _f32(logits)
    k = min(top_k, z.shape[-1])
    zk = z.topk(k, dim=-1).values if k < z.shape[-1] else z
    return _entropy_rows(zk, tau)


def _entropy_rows(zk: Tensor, tau: Tensor | float) -> Tensor:
    t = torch.as_tensor(tau, dtype=zk.dtype, device=zk.device)
    t = t[..., None] if t.dim() > 0 else t
    lp = F.log_softmax(zk / t, dim=-1)
    p = lp.exp()
    return -(p * torch.where(p > 0, lp, 0.0)).sum(-1)


def curio_target_entropy(entropy: Tensor, gain: float = 0.5, slope: float = 2.0, center: float = 1.2) -> Tensor:
    """CurioSFT's target ``H* = H + gain · σ(slope · (H − center))``: more entropy added at uncertain
    (reasoning) tokens than at confident (factual) ones. Defaults 0.5, 2, 1.2 as in the authors' code."""
    return entropy + gain * torch.sigmoid(slope * (entropy - center))


def bisect_temperature(logits: Tensor, target: Tensor, tau_min: float = 1.1, tau_max: float = 1.5,
                       top_k: int = 512, iters: int = 20) -> Tensor:
    """The τ in [τ_min, τ_max] at which :func:`tempered_topk_entropy` equals ``target``, by bisection.

    [..., V] logits and [...] targets -> [...] τ, no gradient. Entropy is non-decreasing in τ, so
    bisection converges; a target below ``H(τ_min)`` gives exactly τ_min, above ``H(τ_max)`` exactly τ_max
    (the target is clamped to what the interval can reach). After ``iters`` halvings τ is within
    ``(τ_max − τ_min) / 2^(iters+1)`` of the solution.
    """
    if not 0.0 < tau_min <= tau_max:
        raise ValueError(f"bisect_temperature: need 0 < tau_min <= tau_max, got {tau_min}, {tau_max}")
    with torch.no_grad():
        z = _f32(logits.detach())
        k = min(top_k, z.shape[-1])
        zk = z.topk(k, dim=-1).values if k < z.shape[-1] else z
        target = _f32(target.detach()).to(zk.device)
        lo = torch.full(zk.shape[:-1], tau_min, dtype=zk.dtype, device=zk.device)
        hi = torch.full_like(lo, tau_max)
        h_lo, h_hi = _entropy_rows(zk, lo), _entropy_rows(zk, hi)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            up = _entropy_rows(zk, mid) < target
            lo, hi = torch.where(up, mid, lo), torch.where(up, hi, mid)
        tau = 0.5 * (lo + hi)
        tau = torch.where(target <= h_lo, tau_min, tau)
        return torch.where(target >= h_hi, tau_max, tau)


def curio_temperature(logits: Tensor, tau_min: float = 1.1, tau_max: float = 1.5, top_k: int = 512,
                      iters: int = 20, gain: float = 0.5, slope: float = 2.0, center: float = 1.2,
                      entropy_floor: float = 0.03) -> Tensor:
    """CurioSFT's per-token temperature (entropy-guided temperature selection): [..., V] -> [...].

    Wang et al., "Learning While Staying Curious: Entropy-Preserving Supervised Fine-Tuning via Adaptive
    Self-Distillation for Large Reasoning Models", 2026, arXiv:2602.02244 (defaults from the authors' code,
    ``compute_tau_from_logits``, per the seed notes): ``H`` is the top-k entropy of ``softmax(z)``, the
    target :func:`curio_target_entropy`, τ found by :func:`bisect_temperature` in [τ_min, τ_max];
    near-deterministic tokens (``H <= entropy_floor``) get τ_min. No gradient.

    Monotonicity, as tested: for one logit vector τ is non-decreasing in the target entropy, and across
    the sharper and flatter versions ``s·z`` of one logit vector the *tempered entropy reached* is
    non-decreasing in the token's entropy; τ itself is not always (it can fall by ~1e-3 as H grows, because
    a flatter distribution needs less temperature for the same entropy gain), so the seed notes' property
    "a higher-entropy token never gets a lower τ" does not hold for τ.
    """
    with torch.no_grad():
        h = tempered_topk_entropy(logits.detach(), 1.0, top_k)
        tau = bisect_temperature(logits, curio_target_entropy(h, gain, slope, center), tau_min, tau_max,
                                 top_k, iters)
        return torch.where(h <= entropy_floor, tau_min, tau)


def curio_sft_loss(logits_BTV: Tensor, ref_logits_BTV: Tensor, targets_BT: Tensor, mask_BT: Tensor | None = None,
                   tau_BT: Tensor | None = None, kd_coef: float = 1.0, num_tokens: float | Tensor | None = None,
                   **tau_kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """CurioSFT: SFT plus the squared log-ratio to a temperature-scaled self-copy, on the expert tokens.

    Wang et al., 2026, arXiv:2602.02244 (self-exploratory distillation; "k2" on the sampled token)::

        ℓ_t = −log p_θ(y_t) + kd_coef · ½ (log p_θ(y_t) − log p_ref^{τ_t}(y_t))²,   p_ref^τ = softmax(z_ref / τ)

    averaged over the valid tokens (or divided by ``num_tokens``). ``ref_logits`` come from the reference
    copy (periodically re-synced in the method) and are a constant; ``τ_t`` is :func:`curio_temperature`
    of the reference logits unless ``tau_BT`` is given (``tau_kwargs`` go to it). With τ = 1 and
    ``ref = actor`` the KD term is exactly 0.

    Args: logits_BTV, ref_logits_BTV: [B, T, V] aligned with targets_BT [B, T] (expert tokens).
    Returns: (loss, {"nll", "kd", "tau"}: detached token means).
    """
    _same(logits_BTV, ref_logits_BTV, "curio_sft_loss", "student and reference logits")
    mask = _mask(mask_BT, targets_BT, "curio_sft_loss")
    ref = ref_logits_BTV.detach()
    tau = curio_temperature(ref, **tau_kwargs) if tau_BT is None else _f32(tau_BT.detach())
    _same(tau, targets_BT, "curio_sft_loss", "temperatures and targets")
    logp = sampled_token_logprobs(logits_BTV, targets_BT)
    z_ref = _f32(ref) / tau[..., None]
    ids = targets_BT.long().clamp(0, z_ref.shape[-1] - 1)
    ref_logp = z_ref.gather(-1, ids[..., None]).squeeze(-1) - torch.logsumexp(z_ref, dim=-1)
    nll = torch.where(mask, -logp, 0.0)
    kd = torch.where(mask, 0.5 * (logp - ref_logp) ** 2, 0.0)
    denom = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=logp.device)
    denom = denom.clamp_min(1).to(logp.dtype)
    loss = (nll + kd_coef * kd).sum() / denom
    n = mask.sum().clamp_min(1)
    terms = {"nll": nll.detach().sum() / n, "kd": kd.detach().sum() / n,
             "tau": torch.where(mask, tau, 0.0).sum() / n}
    return loss, terms
