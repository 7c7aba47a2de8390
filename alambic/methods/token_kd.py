"""Token-level knowledge distillation of a causal LM, teacher-forced on the completion tokens.

At every completion position the student's next-token distribution is pulled toward the teacher's by a
divergence of :mod:`alambic.losses.sequence`, optionally plus the NLL of the text itself::

    loss = kd_weight · D(p_T ‖ p_S) + nll_weight · NLL(target)

both averaged over the valid (completion) tokens of the whole optimizer step. The sequences come from the
data (teacher forcing): the word-level KD of Kim & Rush ("Sequence-Level Knowledge Distillation", 2016,
arXiv:1606.07947, §3.1), Hinton et al.'s soft targets ("Distilling the Knowledge in a Neural Network",
2015, arXiv:1503.02531) at each token, with the divergences GKD compares (Agarwal et al., "On-Policy
Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024, arXiv:2306.13649, §2):
forward KL, reverse KL and the generalised JSD(β), plus DistiLLM's skew KLs (arXiv:2402.03898) and TV.
Sequence-level KD (training on teacher generations) and on-policy GKD are other methods; this one is their
supervised, fixed-data baseline (GKD's λ = 0).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.text import TOKENS
from alambic.errors import AlambicError
from alambic.losses import sequence as seq
from alambic.losses import sparse_sequence as sparse_seq
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.registry import METHODS
from alambic.teachers.base import SparseLogits

DIVERGENCES = ("forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl", "total_variation")


class TokenKDConfig(MethodConfig):
    divergence: Literal["forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
                        "total_variation"] = Field(
        "forward_kl", description="per-token divergence between teacher and student (GKD §2: forward_kl, "
        "reverse_kl, generalized_jsd; DistiLLM: skew_kl, skew_reverse_kl; total_variation)")
    beta: float = Field(0.5, gt=0, lt=1, description="generalized_jsd's β in (0, 1) (0.5: symmetric JSD); "
                        "for β at 0 or 1 choose forward_kl or reverse_kl")
    alpha: float = Field(0.1, ge=0, le=1, description="skew_kl / skew_reverse_kl's mixing α (DistiLLM: 0.1)")
    temperature: float = Field(1.0, gt=0, description="loss temperature τ on both sides (GKD and DistiLLM use 1); "
                               "not a sampling temperature")
    scale_t2: bool = Field(False, description="multiply the divergence by τ² (Hinton et al. §2)")
    kd_weight: float = Field(1.0, ge=0, description="weight of the divergence (0: plain NLL fine-tuning)")
    nll_weight: float = Field(0.0, ge=0, description="weight of the NLL of the text's own next tokens")
    chunk_size: int | None = Field(256, ge=1, description="tokens per chunk of the divergence (peak memory "
                                   "O(chunk_size × V)); null: plain autograd")


@METHODS.register("token_kd")
class TokenKD(Method):
    """``kd_weight·D(p_T‖p_S) + nll_weight·NLL`` per completion token of a causal LM, teacher-forced.

    Positions whose target is ``IGNORE_INDEX`` (prompt tokens, padding, the last token) carry no loss.
    Logits are compared on the vocabulary teacher and student share (``shared_vocab``, set by the language
    run: the tokenizer's real size; padded output rows are dropped on both sides), so the NLL is over real
    tokens too. Both terms are means over the step's valid tokens; :meth:`chunk_weight` weighs gradient-
    accumulation chunks by their share of those tokens, so accumulated steps equal one big batch exactly.
    """

    paper = ('Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", '
             'ICLR 2024, arXiv:2306.13649 (divergences); Hinton et al. 2015, arXiv:1503.02531; Kim & Rush, '
             '"Sequence-Level Knowledge Distillation", 2016, arXiv:1606.07947')

    Config = TokenKDConfig
    needs_teacher = True
    uses_unlabeled = True
    modality = "text"
    upcasts_itself = True  # bf16 logits as they are: the losses upcast chunk by chunk (no [B, T, V] fp32 copy)
    student_views = (TOKENS,)
    teacher_views = (TOKENS,)

    def __init__(self, config: TokenKDConfig | None = None):
        super().__init__(config)
        self.shared_vocab: int | None = None  # the tokenizer's real size; None: min of both, see truncate_to_shared_vocab

    def chunk_weight(self, chunk: Batch, whole: Batch) -> float:
        """The chunk's share of the step's valid tokens (rows share when the step has none)."""
        total = int((whole.target != IGNORE_INDEX).sum())
        if total == 0:
            return len(chunk) / len(whole)
        return int((chunk.target != IGNORE_INDEX).sum()) / total

    def divergence(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
                   num_tokens: int | None = None, chunk_size: int | None | str = "config") -> torch.Tensor:
        """The configured divergence, mean over the ``mask`` tokens (or ``/ num_tokens``)."""
        cfg = self.config
        extra = {"beta": cfg.beta} if cfg.divergence == "generalized_jsd" else (
            {"alpha": cfg.alpha} if cfg.divergence in ("skew_kl", "skew_reverse_kl") else {})
        fn = getattr(seq, cfg.divergence)
        return fn(student_logits, teacher_logits, mask, temperature=cfg.temperature, scale_t2=cfg.scale_t2,
                  num_tokens=num_tokens, chunk_size=cfg.chunk_size if chunk_size == "config" else chunk_size,
                  **extra)

    def sparse_divergence(self, student_logits: torch.Tensor, sparse: SparseLogits, mask: torch.Tensor,
                          num_tokens: int | None = None) -> torch.Tensor:
        """The configured divergence against a cached teacher's top-k (``teacher.cache: topk``), with the
        cache's tail policy (:mod:`alambic.losses.sparse_sequence`); ``student_logits`` cut to its vocabulary.
        A sampled cache (tail ``sample``) gives the forward KL only, at the temperature it was drawn at."""
        cfg = self.config
        if sparse.tail == "sample":  # sampled teacher targets (RS-KD): an unbiased forward KL and nothing else
            if cfg.divergence != "forward_kl":
                raise AlambicError(f"token_kd: divergence {cfg.divergence} cannot be estimated from sampled teacher "
                                   "targets (cache tail 'sample' gives the forward KL only): use forward_kl, or a "
                                   "top-k cache (tail bucket or renormalize)")
            if cfg.temperature != sparse.temperature:
                raise AlambicError(f"token_kd: temperature {cfg.temperature:g} differs from the {sparse.temperature:g} "
                                   "the cached teacher tokens were drawn at (teacher.topk.temperature)")
            return sparse_seq.sparse_forward_kl(student_logits, sparse.ids, sparse.logprobs, mask & sparse.mask,
                                                tail="sample", weights=sparse.weights, temperature=cfg.temperature,
                                                scale_t2=cfg.scale_t2, num_tokens=num_tokens,
                                                chunk_size=cfg.chunk_size)
        extra = {"beta": cfg.beta} if cfg.divergence == "generalized_jsd" else (
            {"alpha": cfg.alpha} if cfg.divergence in ("skew_kl", "skew_reverse_kl") else {})
        fn = getattr(sparse_seq, f"sparse_{cfg.divergence}")
        return fn(student_logits, sparse.ids, sparse.logprobs, mask & sparse.mask, tail=sparse.tail,
                  tail_logprob=sparse.tail_logprob, temperature=cfg.temperature, scale_t2=cfg.scale_t2,
                  num_tokens=num_tokens, chunk_size=cfg.chunk_size, **extra)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        s_full = student[TOKENS].logits
        if teacher is None:
            raise AlambicError("token_kd needs a teacher")
        sparse = teacher[TOKENS].sparse  # a cached teacher's top-k (teacher.cache: topk), else dense logits
        if sparse is not None:
            s, t = s_full[..., :sparse.vocab_size], None
        else:
            s, t = seq.truncate_to_shared_vocab(s_full, teacher[TOKENS].logits, self.shared_vocab)
        target = batch.target
        mask = target != IGNORE_INDEX
        loss, terms = s.sum().float() * 0.0, {}  # float32 even for bf16 logits
        if cfg.kd_weight > 0:
            kd = cfg.kd_weight * (self.divergence(s, t, mask) if sparse is None
                                  else self.sparse_divergence(s, sparse, mask))
            loss, terms["kd"] = loss + kd, kd.detach()
        if cfg.nll_weight > 0:
            nll = cfg.nll_weight * token_nll(s, target)
            loss, terms["nll"] = loss + nll, nll.detach()
        return MethodOutput(loss, terms, s_full)


def token_nll(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean NLL of ``target`` [B, T] (``IGNORE_INDEX`` skipped) under ``logits`` [B, T, V], in float32; 0 with a
    gradient path when no target counts (never NaN)."""
    mask = target != IGNORE_INDEX
    count = int(mask.sum())
    picked = logits[mask].float()
    if count == 0:
        return logits.sum().float() * 0.0
    return F.cross_entropy(picked, target[mask], reduction="sum") / count
