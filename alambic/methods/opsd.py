"""OPSD: on-policy self-distillation, with the model given privileged information as its own teacher.

Penaloza et al., "Privileged Information Distillation for Language Models", 2026, arXiv:2602.04942, On-Policy
Self-Distillation: the student π^S = π_θ(·|s) samples its own completions and is trained by RL on

    J = E_{o∼π^S}[R] − β KL(π^S ‖ sg π^T),        π^T = π_θ(·|s, I)  (the same weights, PI in the prompt)

with the reverse KL as a dense per-token reward: token t of a completion gets ``−β (log π^S(o_t) − log π^T(o_t))``
(the single-sample estimate of the per-token reverse KL, :func:`~alambic.losses.policy.opsd_token_rewards`),
added to the group advantage of the outcome reward after its group normalisation. The teacher's log-probs are
a constant (the paper's stop-gradient): the privileged view is a forward of the student network whose output
is detached. With empty privileged information the two contexts are the same tokens, the dense reward is 0 and
OPSD is GRPO.

The rest is :mod:`alambic.methods.grpo`'s: G completions per prompt keyed by (seed, step, sample id, g), drawn
from the student context; checker rewards; Dr. GRPO advantages; DAPO's token-level mean and decoupled clip; no
reference-model KL; one update per sampled batch. Monitors: GRPO's (reward statistics, ``adv_abs``, ``ratio``,
clip fractions, ``approx_kl``), ``kl`` (mean ``log π^S − log π^T`` over the sampled tokens: the reverse-KL
estimate, 0 with empty PI) and ``kl_reward`` (mean dense reward, ``−β · kl``).
"""

from __future__ import annotations

import torch

from alambic.data.batch import Batch
from alambic.data.text import TOKENS
from alambic.losses.policy import opsd_loss, opsd_token_rewards
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

__all__ = ["OPSD", "OPSDConfig"]


class OPSDConfig(PrivilegedConfig):
    pass


@METHODS.register("opsd")
class OPSD(GRPO):
    """OPSD (arXiv:2602.04942): GRPO on the student's own samples with −β·(log π^S − log π^T) per token as a dense reward, π^T the same model given privileged information."""

    paper = ('Penaloza et al., "Privileged Information Distillation for Language Models", 2026, arXiv:2602.04942 '
             '(On-Policy Self-Distillation)')
    Config = OPSDConfig
    needs_teacher = False  # the teacher is the student itself, given the privileged context

    def setup(self, student, teacher, info: SetupInfo) -> None:
        super().setup(student, teacher, info)
        cfg = self.config
        self.contexts = PrivilegedContexts(self.texts, self.tokenizer, cfg.privileged, cfg.template, self._name())
        self.student_views = (TOKENS, PRIVILEGED)  # prepare adds the privileged view to every step's batch

    def prepare(self, batch: Batch, ctx: StepContext) -> Batch:
        """G completions per prompt sampled from the student context, each also placed after the teacher's
        prompt (view ``privileged_tokens``) for the teacher's log-probs."""
        plain, ids = prompt_rows(batch), batch.index.tolist()
        comp, rewards = self.sample_group(plain, ids, ctx)
        out = self.group_batch(plain, batch.index, comp, rewards)
        return with_privileged_view(out, self.contexts.prompts(plain, ids), comp, self.config.group_size,
                                    self.pad_id)

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        logp, logp_t, mask = context_logprobs(student, batch, self.shared_vocab, cfg.sampling_temperature)
        logp_t = logp_t.detach()  # sg π^T
        out = opsd_loss(logp, logp.detach(), logp_t, batch.extras[ADVANTAGES], mask, beta=cfg.beta,
                        eps_low=cfg.eps_low, eps_high=cfg.eps_high, aggregation=cfg.aggregation,
                        max_length=cfg.max_new_tokens)
        n = mask.sum().clamp_min(1)
        kl = torch.where(mask, logp.detach() - logp_t, 0.0).sum() / n
        dense = opsd_token_rewards(logp, logp_t, mask, cfg.beta).sum() / n
        monitors = self.step_monitors(batch, mask)
        monitors.update(ratio=out.ratio_mean, clip_low=out.clip_low_fraction, clip_high=out.clip_high_fraction,
                        approx_kl=out.approx_kl, kl=kl, kl_reward=dense)
        return MethodOutput(out.loss, {"policy": out.loss.detach()}, student[TOKENS].logits, monitors=monitors)
