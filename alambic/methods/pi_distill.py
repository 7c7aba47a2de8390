"""pi-Distill: one model trained as a teacher that sees privileged information and as a student that does not.

Penaloza et al., "Privileged Information Distillation for Language Models", 2026, arXiv:2602.04942, Eqs. (2)-(5).
With π^T = π_θ(·|s, I) (the prompt with the privileged information I, :mod:`alambic.methods.privileged`) and
π^S = π_θ(·|s) (the plain prompt), both with the same weights θ, and completions o sampled once from the teacher:

    J_T = E_{o∼π^T}[R] − β KL(π^T ‖ sg π^S)                      (teacher: GRPO in the PI context)
    J_S = E_{o∼π^T}[π^S / sg π^T · R] − β KL(sg π^T ‖ π^S)         (student: importance-weighted teacher samples)
    J   = α J_T + (1 − α) J_S

so α = 1 trains the PI-conditioned teacher only (GRPO on its own samples, pulled towards what the student can
express), α = 0 the student only (off-policy from the teacher's samples, pulled towards the teacher), and
α = 0.5 both (the paper's α ∈ {0, 0.5, 1}). The stop-gradients are where the paper puts them: J_T's terms
differentiate the teacher forward only, J_S's the student forward only (the two are forwards of one network on
two views, so the shared weights receive both). The per-token estimators (clipped ratios, k3 for the KL values,
the score function for J_T's KL) are :func:`~alambic.losses.policy.pi_distill_loss`'s.

As in :mod:`alambic.methods.grpo`: G completions per prompt keyed by (seed, step, sample id, g), drawn here from
the teacher context; rewards from the task's checker; Dr. GRPO advantages ``r − mean`` (no std division);
DAPO's token-level mean and decoupled clip; no reference-model KL; one update per sampled batch, so the
teacher's π_old is its own detached forward (J_T's ratio is 1 in value). Monitors: GRPO's reward statistics,
``kl`` (k3 estimate of KL(π^T ‖ π^S) on the teacher's samples: 0 with empty PI), and for each trained side
``teacher_*`` / ``student_*`` ratio, clip fractions and approximate KL; terms ``teacher`` (α·J_T's policy
part), ``student`` ((1 − α)·J_S's) and ``kl`` (β·kl), which add up to the loss.
"""

from __future__ import annotations

from pydantic import Field

from alambic.data.batch import Batch
from alambic.data.text import TOKENS
from alambic.losses.policy import pi_distill_loss
from alambic.methods.base import MethodOutput, SetupInfo, StepContext
from alambic.methods.gkd import prompt_rows
from alambic.methods.grpo import ADVANTAGES, GRPO
from alambic.methods.privileged import (
    PRIVILEGED,
    PrivilegedConfig,
    PrivilegedContexts,
    context_logprobs,
    with_privileged_view,
)
from alambic.registry import METHODS

__all__ = ["PiDistill", "PiDistillConfig"]


class PiDistillConfig(PrivilegedConfig):
    alpha: float = Field(0.5, ge=0, le=1, description="α of J = α·J_T + (1 − α)·J_S: 1 trains the teacher (with "
                         "PI) only, 0 the student (without) only; the paper uses 0, 0.5 and 1")


@METHODS.register("pi_distill")
class PiDistill(GRPO):
    """pi-Distill (arXiv:2602.04942): α·J_T + (1 − α)·J_S on completions the model samples with privileged information in its prompt."""

    paper = ('Penaloza et al., "Privileged Information Distillation for Language Models", 2026, arXiv:2602.04942 '
             '(pi-Distill, Eqs. 2-5)')
    Config = PiDistillConfig
    needs_teacher = False  # the teacher is the student itself, given the privileged context

    def setup(self, student, teacher, info: SetupInfo) -> None:
        super().setup(student, teacher, info)
        cfg = self.config
        self.contexts = PrivilegedContexts(self.texts, self.tokenizer, cfg.privileged, cfg.template, self._name())
        # from now on every step's batch carries the privileged view (prepare adds it; the loader's probe batch,
        # which setup is sized on, does not)
        self.student_views = (TOKENS, PRIVILEGED)

    def _name(self) -> str:
        return "pi_distill"

    def prepare(self, batch: Batch, ctx: StepContext) -> Batch:
        """G completions per prompt sampled from the teacher context; rows hold the student's prompt (view
        ``tokens``) and the teacher's (view ``privileged_tokens``) before the same completion."""
        plain, ids = prompt_rows(batch), batch.index.tolist()
        priv = self.contexts.prompts(plain, ids)
        comp, rewards = self.sample_group(priv, ids, ctx)
        out = self.group_batch(plain, batch.index, comp, rewards)
        return with_privileged_view(out, priv, comp, self.config.group_size, self.pad_id)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        logp_s, logp_t, mask = context_logprobs(student, batch, self.shared_vocab, cfg.sampling_temperature)
        out = pi_distill_loss(logp_t, logp_s, logp_t.detach(), batch.extras[ADVANTAGES], mask, alpha=cfg.alpha,
                              beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                              aggregation=cfg.aggregation, max_length=cfg.max_new_tokens)
        monitors = self.step_monitors(batch, mask)
        monitors["kl"] = out.kl
        terms = {"kl": cfg.beta * out.kl}
        for side, part, weight in (("teacher", out.teacher, cfg.alpha), ("student", out.student, 1.0 - cfg.alpha)):
            if part is not None:
                terms[side] = weight * part.loss.detach()
                monitors.update({f"{side}_{k}": v for k, v in
                                 (("ratio", part.ratio_mean), ("clip_low", part.clip_low_fraction),
                                  ("clip_high", part.clip_high_fraction), ("approx_kl", part.approx_kl))})
        return MethodOutput(out.loss, terms, student[TOKENS].logits, monitors=monitors)
