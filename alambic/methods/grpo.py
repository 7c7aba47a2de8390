"""GRPO and TRRD: group-relative policy optimisation on a verifiable task, and its teacher-anchored variant.

GRPO (Shao et al., "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language Models", 2024,
arXiv:2402.03300, §4.1, Eq. 3): per prompt q, G completions o_1..o_G are sampled from the policy, scored by a
checker (rewards r_i), and every token of o_i gets the group-relative advantage Â_i; the loss is the clipped
ratio surrogate. Defaults and where they come from:

- advantages ``r_i − mean_j r_j`` without the std division (Dr. GRPO, Liu et al., "Understanding R1-Zero-Like
  Training: A Critical Perspective", 2025, arXiv:2503.20783); ``scale_std: true`` is GRPO's;
- token-level aggregation: the step's per-token losses summed and divided by its token count (DAPO, Yu et al.,
  2025, arXiv:2503.14476, §3.3), so no length normalisation per sequence (Dr. GRPO's second fix);
  ``aggregation: sequence_mean`` is GRPO's, ``constant`` Dr. GRPO's ``B × max_new_tokens`` divisor;
- clip ``[1 − eps_low, 1 + eps_high]`` (DAPO's decoupled clip; ``eps_high: null`` is PPO's symmetric one);
- no KL to a reference model (DAPO §2.3).

**The old policy.** One optimizer update per sampled batch (GRPO's μ = 1, the setting Dr. GRPO trains with):
the completions are drawn in :meth:`GRPO.prepare` from the weights the step then differentiates, so π_old is
π_θ itself at the time of the loss and its log-probs are the very forward's, detached. No frozen copy exists
(nothing to re-sync, nothing extra in the checkpoint) and no second forward pass adds rounding noise: the
GRPO ratio is exactly 1 in value and its gradient is ``∇ log π_θ · Â`` (clip fractions are 0 by
construction). Several updates per batch (μ > 1) would need sampling-time log-probs kept across updates:
a different loop, not written.

**Draws.** Completion g of the problem with sample id i at step s is
:func:`~alambic.generation.sampling.sample`'s row keyed by (seed, s, ``i · 2^16 + g``): a pure function of
(seed, step, sample id, g), independent of the batch it sits in and of G (raising G appends draws). So a
resumed run draws what the uninterrupted one drew.

TRRD (Zhang et al., "Reinforcement-aware Knowledge Distillation for LLM Reasoning" (RLAD), 2026,
arXiv:2602.22495, Trust Region Ratio Distillation): the ratio's anchor is ``π_old^α · π_T^(1−α)`` with the run's
teacher π_T scoring the same sampled tokens at the same temperature; α = 1 is GRPO exactly, and with π_old ≡ π_θ
the ratio is ``(π_θ / π_T)^(1−α)``: the clip now bounds how far the student may move away from the teacher
per token while the advantage pushes it towards reward.

Rewards come from the task's checker (``data: {name: arithmetic}`` or ``{name: tasks}``,
:mod:`alambic.data.tasks`) on the decoded completion (special tokens skipped). Monitors: ``reward`` (the
step's mean), ``reward_std`` (within groups), ``zero_var`` (share of groups whose rewards are all equal: no
gradient), ``adv_abs``, ``gen_len``, ``ratio``, ``clip_low``, ``clip_high``, ``approx_kl`` (k3 estimate of
KL(anchor ‖ π_θ) on the sampled tokens) and, for TRRD, ``kl_teacher`` (mean ``log π_θ − log π_T``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.text import ATTENTION_MASK, TOKENS, TokenizedExample, collate
from alambic.errors import AlambicError
from alambic.generation.sampling import sample
from alambic.losses.policy import (
    clipped_policy_loss,
    group_advantages,
    sampled_token_logprobs,
    trrd_anchor_logprobs,
)
from alambic.methods.base import (
    Method,
    MethodConfig,
    MethodOutput,
    SetupInfo,
    StepContext,
)
from alambic.methods.gkd import prompt_rows
from alambic.registry import METHODS
from alambic.tasks.base import Problem, group_rewards, load_checker

__all__ = ["GRPO", "TRRD", "GRPOConfig", "TRRDConfig", "group_sample_id"]

MAX_GROUP = 2**16
ADVANTAGES, REWARDS = "advantages", "rewards"
_STEP_STATS = ("reward", "reward_std", "zero_var", "gen_len")  # one value per step, repeated on every row


def group_sample_id(sample_id: int, g: int) -> int:
    """The sampling key of completion ``g`` of sample ``sample_id``: ``sample_id · 2^16 + g``."""
    return int(sample_id) * MAX_GROUP + int(g)


class GRPOConfig(MethodConfig):
    group_size: int = Field(4, ge=2, lt=MAX_GROUP, description="G, completions sampled per prompt (GRPO)")
    sampling_temperature: float = Field(1.0, gt=0, description="temperature of the policy's sampling and of its "
                                        "log-probs in the ratio (> 0: a greedy group has nothing to compare)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus of the sampling")
    max_new_tokens: int = Field(32, ge=1, description="longest sampled completion")
    scale_std: bool = Field(False, description="divide advantages by the group's std (GRPO); false: Dr. GRPO")
    eps_low: float = Field(0.2, ge=0, le=1, description="lower clip: ratio >= 1 - eps_low")
    eps_high: float | None = Field(None, ge=0, description="upper clip: ratio <= 1 + eps_high (DAPO: 0.28); "
                                   "null: eps_low (PPO)")
    aggregation: Literal["token_mean", "sequence_mean", "constant"] = Field(
        "token_mean", description="token_mean (DAPO, default), sequence_mean (GRPO), constant (Dr. GRPO)")
    seed: int | None = Field(None, ge=0, description="keys the draws with (seed, step, sample id, g); None: the "
                             "recipe's seed")


class TRRDConfig(GRPOConfig):
    alpha: float = Field(0.5, ge=0, le=1, description="α of TRRD's anchor π_old^α · π_T^(1−α) (1: GRPO)")


@METHODS.register("grpo")
class GRPO(Method):
    """GRPO with the Dr. GRPO / DAPO corrections on a verifiable task; see the module docstring."""

    paper = ('Shao et al., "DeepSeekMath", 2024, arXiv:2402.03300; Liu et al., "Understanding R1-Zero-Like '
             'Training" (Dr. GRPO), 2025, arXiv:2503.20783; Yu et al., "DAPO", 2025, arXiv:2503.14476')
    Config = GRPOConfig
    needs_teacher = False
    uses_unlabeled = True
    modality = "text"
    policy_gradient = True  # a policy loss: its value need not fall while the policy improves (tests read this)
    student_views = (TOKENS,)
    teacher_views: tuple[str, ...] = ()

    def __init__(self, config: GRPOConfig | None = None):
        super().__init__(config)
        self.shared_vocab: int | None = None  # set by the language run
        self.run_seed = 0  # the recipe's seed, set by the language run; config.seed overrides it
        self.texts: list[Any] | None = None  # the run's examples by sample id (TaskExample: answer, checker)
        self._student: tuple = ()
        self.tokenizer: Any = None
        self.eos_id: int | None = None
        self.pad_id = 0
        self._checkers: dict[str, Any] = {}
        self.last_samples: list[dict[str, Any]] = []  # the last step's first completions, for a report

    @property
    def seed(self) -> int:
        return self.config.seed if self.config.seed is not None else self.run_seed

    def setup(self, student, teacher, info: SetupInfo) -> None:
        self._student = (getattr(info.student, "lm", info.student),)
        self.tokenizer = getattr(info.teacher, "tokenizer", None)
        if self.tokenizer is None:
            raise AlambicError(f"{self._name()} decodes completions for its checker: it needs the run's tokenizer "
                               "(teacher.hf)")
        eos = self.tokenizer.eos_token_id
        self.eos_id = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else (self.eos_id if self.eos_id is not None else 0))
        if not self.texts or not all(hasattr(t, "answer") for t in self.texts):
            raise AlambicError(f"{self._name()} rewards completions with a task's checker: use data.name "
                               "arithmetic or tasks (a verifiable task), not plain text")

    def _name(self) -> str:
        return type(self).__name__.lower()

    def _checker(self, spec: str):
        if spec not in self._checkers:
            self._checkers[spec] = load_checker(spec)
        return self._checkers[spec]

    def chunk_weight(self, chunk: Batch, whole: Batch) -> float:
        """Token share of the step for ``token_mean``; rows share for the per-row normalisers."""
        total = int((whole.target != IGNORE_INDEX).sum())
        if self.config.aggregation != "token_mean" or total == 0:
            return len(chunk) / len(whole)
        return int((chunk.target != IGNORE_INDEX).sum()) / total

    # -- sampling and rewards -----------------------------------------------------------------------------

    def prepare(self, batch: Batch, ctx: StepContext) -> Batch:
        """The batch's B prompts, each followed by G sampled completions ([B·G] rows, group by group), with
        their rewards and group advantages in ``extras``."""
        prompts = prompt_rows(batch)
        comp, rewards = self.sample_group(prompts, batch.index.tolist(), ctx)
        return self.group_batch(prompts, batch.index, comp, rewards)

    def sample_group(self, prompts: list[list[int]], ids: list[int], ctx: StepContext) -> tuple[Any, torch.Tensor]:
        """G completions of each of the B ``prompts`` (sample ids ``ids``), drawn by the policy with the keys
        (seed, step, id, g), and their [B, G] checker rewards. Returns (:class:`Completions` of the B·G rows,
        group by group, rewards)."""
        if not self._student:
            raise AlambicError(f"{self._name()}: prepare() before setup(): the method does not know the student")
        cfg, G = self.config, self.config.group_size
        rows = [p for p in prompts for _ in range(G)]
        keys = [group_sample_id(i, g) for i in ids for g in range(G)]
        comp = sample(self._student[0], rows, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.sampling_temperature, top_p=cfg.top_p, seed=self.seed, step=ctx.step,
                      sample_ids=keys, eos_id=self.eos_id, pad_id=self.pad_id, vocab_size=self.shared_vocab)
        texts = [self.tokenizer.decode(comp.row(r), skip_special_tokens=True) for r in range(len(rows))]
        rewards = self.rewards(ids, [texts[b * G:(b + 1) * G] for b in range(len(ids))])
        self.last_samples = [{"id": ids[b], "completion": texts[b * G], "reward": float(rewards[b, 0])}
                             for b in range(min(4, len(ids)))]
        return comp, rewards

    def group_batch(self, prompts: list[list[int]], index: torch.Tensor, comp: Any, rewards: torch.Tensor) -> Batch:
        """The [B·G] training rows ``prompts[b] + completion`` (whichever context drew the completions), with
        the rewards, group advantages and the step's statistics in ``extras``, on ``index``'s device."""
        G, ids = self.config.group_size, index.tolist()
        adv = group_advantages(rewards, scale_std=self.config.scale_std)
        rows = [p for p in prompts for _ in range(G)]
        out = collate([TokenizedExample(tuple(p + comp.row(r, with_eos=True)), len(p)) for r, p in enumerate(rows)],
                      [i for i in ids for _ in range(G)], self.pad_id)
        n = len(rows)
        stats = {"reward": rewards.mean(), "reward_std": rewards.std(1, correction=0).mean(),
                 "zero_var": (rewards.amax(1) == rewards.amin(1)).float().mean(),
                 "gen_len": comp.lengths.float().mean().cpu()}
        device = index.device
        extras = {ATTENTION_MASK: out.extras[ATTENTION_MASK], ADVANTAGES: adv.reshape(n),
                  REWARDS: rewards.reshape(n), **{k: v.expand(n).clone() for k, v in stats.items()}}
        return Batch(views={TOKENS: out.views[TOKENS].to(device)}, index=out.index.to(device),
                     target=out.target.to(device), extras={k: v.to(device) for k, v in extras.items()})

    def rewards(self, sample_ids: list[int], completions: list[list[str]]) -> torch.Tensor:
        """[B, G] checker rewards of each sample's completions against its answer."""
        out = []
        for i, group in zip(sample_ids, completions):
            t = self.texts[i]
            out.append(group_rewards([Problem(str(i), t.prompt, t.answer)], [group], self._checker(t.checker)))
        return torch.cat(out) if out else torch.zeros(0, self.config.group_size)

    # -- the loss -----------------------------------------------------------------------------------------

    def anchor(self, old_logp, teacher, tokens, mask) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The ratio's denominator: π_old's log-probs (GRPO)."""
        return old_logp, {}

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        logits = student[TOKENS].logits
        if self.shared_vocab is not None:
            logits = logits[..., : self.shared_vocab]  # the sampling drew among these only
        mask = batch.target != IGNORE_INDEX
        tokens = batch.target.clamp_min(0)
        logp = sampled_token_logprobs(logits, tokens, cfg.sampling_temperature)
        anchor, extra = self.anchor(logp.detach(), teacher, tokens, mask)
        out = clipped_policy_loss(logp, anchor, batch.extras[ADVANTAGES], mask, eps_low=cfg.eps_low,
                                  eps_high=cfg.eps_high, aggregation=cfg.aggregation, max_length=cfg.max_new_tokens)
        monitors = self.step_monitors(batch, mask)
        monitors.update(ratio=out.ratio_mean, clip_low=out.clip_low_fraction, clip_high=out.clip_high_fraction,
                        approx_kl=out.approx_kl, **extra)
        return MethodOutput(out.loss, {"policy": out.loss.detach()}, student[TOKENS].logits, monitors=monitors)

    def step_monitors(self, batch: Batch, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's reward statistics (set by :meth:`group_batch`) and ``adv_abs``, the mean |advantage| of
        the rows with a completion token (``mask`` [B, T])."""
        rows = mask.any(1)
        adv = batch.extras[ADVANTAGES]
        monitors = {k: batch.extras[k].float().mean() for k in _STEP_STATS}
        monitors["adv_abs"] = adv.abs()[rows].mean() if bool(rows.any()) else adv.new_zeros(())
        return monitors


@METHODS.register("trrd")
class TRRD(GRPO):
    """TRRD (RLAD, arXiv:2602.22495): GRPO whose ratio is anchored on π_old^α · π_T^(1−α), π_T the run's teacher."""

    paper = ('Zhang et al., "Reinforcement-aware Knowledge Distillation for LLM Reasoning" (RLAD, Trust Region '
             'Ratio Distillation), 2026, arXiv:2602.22495')
    Config = TRRDConfig
    needs_teacher = True
    teacher_views = (TOKENS,)

    def anchor(self, old_logp, teacher, tokens, mask):
        if teacher is None or TOKENS not in teacher:
            raise AlambicError("trrd anchors its ratio on the teacher: it needs a live teacher (teacher.hf)")
        t = teacher[TOKENS].logits
        vocab = self.shared_vocab or t.shape[-1]
        t_logp = sampled_token_logprobs(t[..., :vocab], tokens, self.config.sampling_temperature)
        n = mask.sum().clamp_min(1)
        kl_teacher = torch.where(mask, old_logp - t_logp, 0.0).sum() / n
        return trrd_anchor_logprobs(old_logp, t_logp, self.config.alpha), {"kl_teacher": kl_teacher}
