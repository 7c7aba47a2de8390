"""REDI: reinforcement distillation from the teacher's correct *and* incorrect traces, offline.

Xu et al., "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM Reasoning", 2025,
arXiv:2505.24850. Rejection-sampling distillation throws the teacher's wrong traces away; REDI learns from
both kinds in two stages:

1. **SFT on the positive traces** (the correct ones): ``seqkd`` on the labelled file with ``data.keep:
   correct``;
2. **the REDI objective** (this method), from the stage-1 model, on positives y⁺ and negatives y⁻ together,
   reference-free (no frozen copy, unlike DPO)::

       L = −c⁺ · mean_{y⁺} log π(y⁺|x)/|y⁺|  +  α · mean_{y⁻} log π(y⁻|x)/|y⁻|

   (:func:`~alambic.losses.policy.redi_loss`). Length normalisation keeps long negatives from dominating;
   α < 1 (0.8 in the paper's recipe) pushes the negatives down more gently than the positives are pulled up,
   which the paper finds keeps training stable. α = 0 is length-normalised NLL on the positives.

The traces and their labels come from ``alambic generate --check integer:answer --label`` (every generation
kept, with ``"correct": true/false``, the answer check's verdict) read as ``data: {name: text, format:
prompt_completion, label_key: correct}``. Each row of a step is a positive or a negative by its label;
the means run over the step's positives and over its negatives (``mean_{y⁺}`` over the N⁺ positive rows of
the optimizer step, ``mean_{y⁻}`` over its N⁻ negatives; a step without negatives has no negative term, and
the other way round). :meth:`REDI.prepare` reads the labels once per step, before the batch is cut into
gradient-accumulation chunks or ranks, and counts N⁺ and N⁻ there, so chunks and ranks add up to exactly
the loss of the whole step.

Logged: the two weighted terms (``positive``, ``negative``) and, as monitors, ``pos_logp`` / ``neg_logp``
(the step's mean per-token log-likelihood of its positives / negatives: the first should rise, the second
fall; 0 for a side the step has none of) and ``pos_rows`` / ``neg_rows`` (how many of each).
Not implemented: the optional re-weighting of negatives by ``exp(γ · logp)`` of the authors' code (off there
by default).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from pydantic import Field

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.text import TOKENS
from alambic.errors import AlambicError
from alambic.losses.policy import (
    length_normalized_logprob,
    redi_loss,
    sampled_token_logprobs,
)
from alambic.methods.base import (
    Method,
    MethodConfig,
    MethodOutput,
    SetupInfo,
    StepContext,
)
from alambic.registry import METHODS

__all__ = ["REDI", "REDIConfig", "REDIError"]

LABEL, N_POS, N_NEG = "redi_correct", "redi_num_positive", "redi_num_negative"
_HOW = ("label every row: alambic generate --check ... --label writes 'correct', and data: {format: "
        "prompt_completion, label_key: correct} reads it")


class REDIError(AlambicError):
    """REDI's data cannot be trained on as it is (no labels, no negatives, no positives)."""

    exit_code = 2


class REDIConfig(MethodConfig):
    alpha: float = Field(0.8, ge=0, description="α, weight of the negative traces' length-normalised log-"
                         "likelihood (the paper's recipe: 0.8; 0 is length-normalised SFT on the positives)")
    pos_coef: float = Field(1.0, ge=0, description="weight of the positive traces' term (the paper: 1.0)")


@METHODS.register("redi")
class REDI(Method):
    """``−c⁺·mean log π(y⁺)/|y⁺| + α·mean log π(y⁻)/|y⁻|`` over a step's correct and incorrect traces (REDI)."""

    paper = ('Xu et al., "Harnessing Negative Signals: Reinforcement Distillation from Teacher Data for LLM '
             'Reasoning", 2025, arXiv:2505.24850')

    Config = REDIConfig
    needs_teacher = True  # for the tokenizer, a pruned student and the held-out comparison; never run in training
    uses_unlabeled = True
    modality = "text"
    student_views = (TOKENS,)
    teacher_views: tuple[str, ...] = ()  # offline: the teacher's traces are the data

    def __init__(self, config: REDIConfig | None = None):
        super().__init__(config)
        self.shared_vocab: int | None = None  # set by the language run: the tokenizer's real size
        self.texts: list[Any] | None = None  # the run's examples by sample id (LabeledExample: .correct)

    def setup(self, student, teacher, info: SetupInfo) -> None:
        """Refuse data that REDI cannot learn from: rows without labels, or a training split with no positive
        (no negative) trace while the positive (negative) term has a weight."""
        if not self.texts or not all(hasattr(t, "correct") for t in self.texts):
            raise REDIError(f"redi trains on correct and incorrect traces, the data has no labels: {_HOW}")
        ids = getattr(info.loader, "index", None)
        labels = [bool(self.texts[i].correct) for i in (ids.tolist() if ids is not None else range(len(self.texts)))]
        cfg = self.config
        if cfg.alpha > 0 and all(labels):
            raise REDIError("redi: the training split has no incorrect trace (correct: false) to push down; for "
                            "SFT on correct traces alone use method seqkd with data.keep: correct")
        if cfg.pos_coef > 0 and not any(labels):
            raise REDIError("redi: the training split has no correct trace (correct: true) to learn from: "
                            "generate more traces, or set method.pos_coef: 0")

    def labels(self, batch: Batch) -> torch.Tensor:
        """[B] bool: whether each row's trace is correct, read by its sample id."""
        if self.texts is None:
            raise REDIError(f"redi reads each row's label by its sample id: set method.texts ({_HOW})")
        out = []
        for i in batch.index.tolist():
            correct = getattr(self.texts[i], "correct", None)
            if not isinstance(correct, bool):
                raise REDIError(f"redi: sample {i} has no label (correct: true or false); {_HOW}")
            out.append(correct)
        return torch.tensor(out, dtype=torch.bool, device=batch.index.device)

    def prepare(self, batch: Batch, ctx: StepContext) -> Batch:
        """The step's batch with each row's label and the step's positive and negative counts in ``extras``."""
        label = self.labels(batch)
        n = len(label)
        counts = {N_POS: label.sum().float(), N_NEG: (~label).sum().float()}
        return replace(batch, extras={**batch.extras, LABEL: label,
                                      **{k: v.expand(n).clone() for k, v in counts.items()}})

    def chunk_weight(self, chunk: Batch, whole: Batch) -> float:
        """1: each chunk's loss is already divided by the whole step's counts N⁺ and N⁻ (see :meth:`forward`)."""
        return 1.0

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        cfg = self.config
        if LABEL not in batch.extras:  # a hand-written loop that skipped prepare(): this batch is the step
            batch = self.prepare(batch, ctx)
        logits = student[TOKENS].logits
        s = logits[..., : self.shared_vocab] if self.shared_vocab is not None else logits
        mask = batch.target != IGNORE_INDEX
        logp = sampled_token_logprobs(s, batch.target.clamp_min(0))  # [B, T] log π(y_t | x, y_<t), float32
        pos = batch.extras[LABEL].bool()
        neg = ~pos
        n_pos, n_neg = float(batch.extras[N_POS][0]), float(batch.extras[N_NEG][0])
        k_pos, k_neg = int(pos.sum()), int(neg.sum())
        # redi_loss averages over the rows it is given: rescaled from this chunk's k rows to the step's N
        positive = redi_loss(logp[pos], mask[pos], None, None, alpha=cfg.alpha, pos_coef=cfg.pos_coef)
        negative = redi_loss(None, None, logp[neg], mask[neg], alpha=cfg.alpha, pos_coef=cfg.pos_coef)
        positive = positive * (k_pos / n_pos) if k_pos else positive
        negative = negative * (k_neg / n_neg) if k_neg else negative
        with torch.no_grad():
            norm = length_normalized_logprob(logp.detach(), mask)  # [B]
            pos_logp = norm[pos].sum() / max(n_pos, 1.0)
            neg_logp = norm[neg].sum() / max(n_neg, 1.0)
        monitors = {"pos_logp": pos_logp, "neg_logp": neg_logp, "pos_rows": pos.sum().float(),
                    "neg_rows": neg.sum().float()}
        return MethodOutput(positive + negative, {"positive": positive.detach(), "negative": negative.detach()},
                            logits, monitors=monitors)
