"""Sequence-level knowledge distillation: NLL on the teacher's generations.

Kim & Rush ("Sequence-Level Knowledge Distillation", 2016, arXiv 1606.07947, §3.2, Eq. 5) replace the
sequence-level distribution of the teacher by its mode (beam search output) and train the student with plain
NLL on those sequences: the knowledge moves through the *data*, not through the loss. Self-Data Distillation
(Thangarasa et al., 2024, arXiv 2410.09982) does the same with the original model's rewrites of an SFT set.

In alambic that is two steps:

1. ``alambic generate --teacher T --prompts train.jsonl --out gen.jsonl`` writes the teacher's completions
   (:mod:`alambic.generation.dataset`; ``--temperature 0`` for the greedy mode, ``--mode rewrite`` for
   Self-Data Distillation);
2. a recipe with ``data: {name: text, format: prompt_completion, path: gen.jsonl}`` and ``method: {name:
   seqkd}``: the mean NLL of the completion tokens (EOS included).

The teacher section stays (its tokenizer is the run's, a pruned student is cut from it, and the held-out
metrics compare with it) but the teacher is never run during training: the method asks for no teacher view.
"""

from __future__ import annotations

from alambic.data.text import TOKENS
from alambic.methods.base import Method, MethodConfig, MethodOutput
from alambic.methods.token_kd import TokenKD, token_nll
from alambic.registry import METHODS


class SeqKDConfig(MethodConfig):
    """No options: the loss is the NLL of the data, which ``alambic generate`` made the teacher's."""


@METHODS.register("seqkd")
class SeqKD(Method):
    """Mean NLL of the completion tokens of teacher-generated text (Kim & Rush 2016, Eq. 5)."""

    paper = 'Kim & Rush, "Sequence-Level Knowledge Distillation", 2016, arXiv:1606.07947'

    Config = SeqKDConfig
    needs_teacher = True  # for the tokenizer, a pruned student and the held-out comparison; never run in training
    uses_unlabeled = True
    modality = "text"
    upcasts_itself = True  # bf16 logits as they are: token_nll upcasts only the completion tokens
    student_views = (TOKENS,)
    teacher_views = ()  # the Trainer runs no teacher forward

    chunk_weight = TokenKD.chunk_weight  # a token mean: chunks weigh by their share of the step's tokens

    def __init__(self, config: SeqKDConfig | None = None):
        super().__init__(config)
        self.shared_vocab: int | None = None  # set by the language run: the tokenizer's real size

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        logits = student[TOKENS].logits
        s = logits[..., : self.shared_vocab] if self.shared_vocab is not None else logits
        nll = token_nll(s, batch.target)
        return MethodOutput(nll, {"nll": nll.detach()}, logits)

