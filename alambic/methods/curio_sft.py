"""CurioSFT: supervised fine-tuning that keeps the model curious, by self-distillation from a tempered copy.

Wang et al., "Learning While Staying Curious: Entropy-Preserving Supervised Fine-Tuning via Adaptive
Self-Distillation for Large Reasoning Models", 2026, arXiv:2602.02244. Plain SFT on expert demonstrations makes
a model over-confident (its token entropy collapses), which leaves a later RL stage little to explore. CurioSFT
adds to the NLL of each expert token ``y_t`` a pull towards a *temperature-scaled copy of the model itself*
(self-exploratory distillation, the "k2" estimator on the expert token, as in the authors' code)::

    ℓ_t = −log p_θ(y_t)  +  kd_coef · ½ (log p_θ(y_t) − log p_ref^{τ_t}(y_t))²,     p_ref^τ = softmax(z_ref / τ)

(:func:`~alambic.losses.policy.curio_sft_loss`), averaged over the completion tokens of the step. The per-token
temperature ``τ_t ∈ [τ_min, τ_max]`` is chosen by entropy-guided temperature selection
(:func:`~alambic.losses.policy.curio_temperature`): bisection (20 halvings) on τ until the top-512 entropy of
``softmax(z_ref/τ)`` reaches ``H* = H + 0.5·σ(2(H − 1.2))`` (more added at uncertain, "reasoning" tokens than at
confident, "factual" ones); near-deterministic tokens (``H ≤ 0.03``) get τ_min. Defaults are the authors'
(seed notes: ``compute_tau_from_logits``): τ ∈ [1.1, 1.5], top-k 512, gain 0.5, slope 2, centre 1.2.

**The self-copy.** The reference is a copy of the student made in :meth:`CurioSFT.setup` (a submodule of the
method without gradients, in eval mode, checkpointed with the method's state so a resumed run continues from
the very same copy). It is re-synced before optimizer step ``s`` whenever ``s`` is a positive multiple of
``sync_every``, i.e. after every ``sync_every`` updates of the student, as ``θ_ref ← (1 − sync_mix)·θ_ref +
sync_mix·θ`` (authors' code: every 5 steps, mix 0.99; ``sync_mix: 1`` makes it an exact copy). The re-sync
happens in :meth:`CurioSFT.prepare`, once per step, before any forward pass. The reference never receives a
gradient: it runs under ``no_grad`` (under the student's own autocast dtype, so with bf16 both sides round alike).

Logged: the terms ``nll`` and ``kd`` (the weighted self-distillation term) and, as monitors, ``tau`` (the mean
temperature of the completion tokens), ``entropy`` (the student's mean next-token entropy there, full vocabulary:
what CurioSFT sets out to preserve) and ``ref_entropy`` (the copy's top-k entropy at τ = 1, which picks τ).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.text import TOKENS
from alambic.errors import AlambicError
from alambic.losses.policy import (
    curio_sft_loss,
    curio_temperature,
    tempered_topk_entropy,
)
from alambic.methods.base import (
    Method,
    MethodConfig,
    MethodOutput,
    SetupInfo,
    StepContext,
)
from alambic.methods.token_kd import TokenKD
from alambic.registry import METHODS

__all__ = ["CurioSFT", "CurioSFTConfig"]


class CurioSFTConfig(MethodConfig):
    kd_coef: float = Field(1.0, ge=0, description="weight of the self-distillation term ½(log p_θ − log p_ref^τ)² "
                           "(authors' code: 1; 0 is plain SFT)")
    sync_every: int = Field(5, ge=1, description="re-sync the self-copy after every N optimizer steps (authors' "
                            "code: 5)")
    sync_mix: float = Field(0.99, ge=0, le=1, description="at a re-sync θ_ref ← (1 − mix)·θ_ref + mix·θ (authors' "
                            "code: 0.99; 1: an exact copy; 0: the copy stays the initial model)")
    tau_min: float = Field(1.1, gt=0, description="lowest temperature of the copy (authors' code: 1.1)")
    tau_max: float = Field(1.5, gt=0, description="highest temperature of the copy (authors' code: 1.5)")
    top_k: int = Field(512, ge=1, description="the entropy that picks τ is over the copy's top-k logits (512)")
    iters: int = Field(20, ge=1, description="bisection halvings of [τ_min, τ_max] (20)")
    gain: float = Field(0.5, ge=0, description="target entropy H* = H + gain·σ(slope·(H − center)) (0.5)")
    slope: float = Field(2.0, description="slope of that sigmoid (2)")
    center: float = Field(1.2, description="entropy (nats) at the sigmoid's midpoint (1.2)")
    entropy_floor: float = Field(0.03, ge=0, description="tokens whose entropy is at most this get τ_min (0.03)")

    @model_validator(mode="after")
    def _tau_range(self) -> CurioSFTConfig:
        if self.tau_min > self.tau_max:
            raise ValueError(f"tau_min ({self.tau_min}) must not exceed tau_max ({self.tau_max})")
        return self


@METHODS.register("curio_sft")
class CurioSFT(Method):
    """NLL of the expert tokens plus ``kd_coef·½(log p_θ − log p_ref^τ)²`` to a re-synced, tempered self-copy."""

    paper = ('Wang et al., "Learning While Staying Curious: Entropy-Preserving Supervised Fine-Tuning via '
             'Adaptive Self-Distillation for Large Reasoning Models", 2026, arXiv:2602.02244')

    Config = CurioSFTConfig
    needs_teacher = True  # for the tokenizer, a pruned student and the held-out comparison; never run in training
    uses_unlabeled = True
    modality = "text"
    upcasts_itself = True  # bf16 logits as they are: the copy then runs under the same autocast dtype
    student_views = (TOKENS,)
    teacher_views: tuple[str, ...] = ()  # the teacher is the student's own copy, run by the method

    chunk_weight = TokenKD.chunk_weight  # a token mean: chunks weigh by their share of the step's tokens

    def __init__(self, config: CurioSFTConfig | None = None):
        super().__init__(config)
        self.shared_vocab: int | None = None  # set by the language run: the tokenizer's real size
        self.ref: torch.nn.Module | None = None  # the self-copy, built in setup (then a checkpointed submodule)
        self._student: tuple[Any, ...] = ()  # a reference to the student, not a submodule

    def setup(self, student, teacher, info: SetupInfo) -> None:
        self._student = (info.student,)
        self.ref = copy.deepcopy(info.student)
        self.ref.requires_grad_(False)
        self.ref.eval()

    def train(self, mode: bool = True) -> CurioSFT:
        """Train mode for the method, never for the copy (a reference: no dropout, fixed statistics)."""
        super().train(mode)
        if self.ref is not None:
            self.ref.eval()
        return self

    def _net(self) -> torch.nn.Module:
        if not self._student or self.ref is None:
            raise AlambicError("curio_sft: the self-copy is made in setup(): call it before training")
        return self._student[0]

    @torch.no_grad()
    def sync(self) -> None:
        """``θ_ref ← (1 − sync_mix)·θ_ref + sync_mix·θ`` for every parameter and floating buffer (others copied)."""
        student, mix = self._net(), self.config.sync_mix
        for mine, theirs in ((self.ref.named_parameters(), dict(student.named_parameters())),
                             (self.ref.named_buffers(), dict(student.named_buffers()))):
            for name, r in mine:
                s = theirs[name].detach()
                if hasattr(s, "full_tensor"):
                    raise AlambicError("curio_sft keeps a full copy of the student: train.shard: fsdp is not "
                                       "supported")
                if mix == 1.0 or not r.is_floating_point():
                    r.copy_(s)
                elif mix > 0.0:
                    r.lerp_(s.to(r.dtype), mix)

    def prepare(self, batch: Batch, ctx: StepContext) -> Batch:
        """Re-sync the copy before step ``ctx.step`` when that step is a positive multiple of ``sync_every``."""
        self._net()
        if ctx.step > 0 and ctx.step % self.config.sync_every == 0:
            self.sync()
        return batch

    def reference_logits(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The copy's logits [B, T, V] for token ids [B, T], without gradient, under ``dtype`` autocast when
        the student's logits are half precision."""
        with torch.no_grad():
            if dtype in (torch.bfloat16, torch.float16):
                with torch.autocast(device_type=ids.device.type, dtype=dtype):
                    return self.ref(ids)
            return self.ref(ids)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        self._net()
        logits = student[TOKENS].logits
        ref = self.reference_logits(batch.views[TOKENS], logits.dtype)
        vocab = self.shared_vocab
        s, r = (logits[..., :vocab], ref[..., :vocab]) if vocab is not None else (logits, ref)
        mask = batch.target != IGNORE_INDEX
        tau = torch.ones(mask.shape, dtype=torch.float32, device=mask.device)
        r_tokens = r[mask]  # [N, V]: temperatures only where the loss reads them
        tau[mask] = curio_temperature(r_tokens, cfg.tau_min, cfg.tau_max, cfg.top_k, cfg.iters, cfg.gain,
                                      cfg.slope, cfg.center, cfg.entropy_floor)
        loss, t = curio_sft_loss(s, r, batch.target.clamp_min(0), mask, tau_BT=tau, kd_coef=cfg.kd_coef)
        with torch.no_grad():
            n = max(int(mask.sum()), 1)
            lp = F.log_softmax(s[mask].float(), dim=-1)
            entropy = -(lp.exp() * lp).sum() / n
            ref_entropy = tempered_topk_entropy(r_tokens, 1.0, cfg.top_k).sum() / n
        terms = {"nll": t["nll"], "kd": cfg.kd_coef * t["kd"]}
        monitors = {"tau": t["tau"], "entropy": entropy, "ref_entropy": ref_entropy}
        return MethodOutput(loss, terms, logits, monitors=monitors)
