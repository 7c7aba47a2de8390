"""The privileged context of pi-Distill and OPSD: the same model, its prompt with privileged information (PI) added.

Penaloza et al., "Privileged Information Distillation for Language Models", 2026, arXiv:2602.04942, §3: one model
with shared weights θ is the teacher π^T(·|s, I) when its context holds the privileged information I and the
student π^S(·|s) without it. The paper puts I in the system prompt; alambic's verifiable tasks have plain-text
prompts, so the teacher's prompt is ``template.format(prompt=..., privileged=I)`` (default
``"Hint: {privileged}\\n{prompt}"``: the information first, as a system prompt would be). I is, per
``privileged``:

- ``answer``: the task's reference answer (what the checker compares with);
- ``solution``: the worked solution (the example's completion: arithmetic's ``a + b = c\\n#### c``, a JSONL
  task's ``solution`` column, or its bare answer without one);
- any other name: a string column a JSONL task carries (``data: {name: tasks, fields: [hint]}``).

**Empty PI.** A row whose I is empty (or only whitespace) is not templated: its teacher context is the
student's prompt, token for token, so teacher ≡ student on it and both KL terms vanish (the paper's
property: with no PI the two policies coincide).

The two contexts share the sampled completion; a training batch carries both as views of the same rows:
``tokens`` (the student's prompt + completion, with ``target``) and ``privileged_tokens`` (the teacher's
prompt + the same completion, its next-token targets in ``extras["privileged_target"]``). Both are forwards of
the student network (the Trainer runs every view the method names), so the teacher side is differentiable
where pi-Distill needs it and is detached where the paper puts a stop-gradient. :func:`context_logprobs`
scores the completion tokens under both and aligns them on the student layout.
"""

from __future__ import annotations

import string
from typing import Any

import torch
from pydantic import Field, field_validator

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.text import TOKENS, TokenizedExample, collate
from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses.policy import sampled_token_logprobs
from alambic.methods.grpo import GRPOConfig

__all__ = [
    "PRIVILEGED", "PRIVILEGED_TARGET", "PrivilegedConfig", "PrivilegedContexts", "context_logprobs",
    "privileged_text", "with_privileged_view",
]

PRIVILEGED = "privileged_tokens"  # the view: the teacher's prompt (with PI) + the completion
PRIVILEGED_TARGET = "privileged_target"  # extras: that view's next-token targets (IGNORE_INDEX off the completion)
BUILT_IN = ("answer", "solution")
DEFAULT_TEMPLATE = "Hint: {privileged}\n{prompt}"


class PrivilegedConfig(GRPOConfig):
    """GRPO's sampling and clipping options, plus where the privileged information comes from and where it goes."""

    privileged: str = Field("answer", min_length=1, description="the privileged information: answer (the task's "
                            "reference answer), solution (its worked solution) or the name of a string field the "
                            "task's rows carry (data.fields, e.g. hint)")
    template: str = Field(DEFAULT_TEMPLATE, description="the teacher's prompt: a format string with {privileged} "
                          "and {prompt} (an empty privileged text leaves the prompt as it is)")
    beta: float = Field(0.1, ge=0, description="β, the weight of the KL to the other context (the paper sweeps "
                        "it; 0.1 is alambic's default)")

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        try:
            names = [name for _, name, _, _ in string.Formatter().parse(v) if name is not None]
        except ValueError as exc:
            raise ValueError(f"not a format string ({exc}); write literal braces as {{{{ and }}}}") from None
        if sorted(names) != ["privileged", "prompt"]:
            raise ValueError("must hold {privileged} and {prompt} once each and no other field, got "
                             f"{['{' + n + '}' for n in names]}")
        return v


def privileged_text(example: Any, source: str) -> str:
    """The privileged information of a task example (:class:`~alambic.data.tasks.TaskExample`) by ``source``:
    ``answer``, ``solution`` (its completion) or one of its ``fields``."""
    if source == "answer":
        return example.answer
    if source == "solution":
        return example.completion
    return example.fields[source]


class PrivilegedContexts:
    """The teacher's prompt ids of each sample id, built once from the run's task examples and kept.

    ``texts``: the run's examples by sample id; ``tokenizer``: the run's. The prompt text is tokenised as the
    data tokenises prompts (BOS first unless the text already starts with it) and is not truncated.
    """

    def __init__(self, texts: list[Any], tokenizer: Any, source: str, template: str, method: str):
        missing = [i for i, t in enumerate(texts) if source not in BUILT_IN and source not in getattr(t, "fields", {})]
        if missing:
            raise AlambicError(f"{method}: method.privileged '{source}' is neither answer, solution nor a field of "
                               f"the task's rows (example {missing[0]} has none): add it to data.fields of a "
                               "tasks JSONL")
        self.texts, self.tokenizer, self.source, self.template = texts, tokenizer, source, template
        self._ids: dict[int, list[int] | None] = {}

    def text(self, sample_id: int) -> str | None:
        """The teacher's prompt text of a sample, or None when its privileged information is empty."""
        t = self.texts[sample_id]
        info = privileged_text(t, self.source)
        if not info.strip():
            return None
        return self.template.format(prompt=t.prompt, privileged=info)

    def prompts(self, plain: list[list[int]], ids: list[int]) -> list[list[int]]:
        """The teacher's prompt ids of each row: its privileged prompt, or (empty PI) its own ``plain`` prompt."""
        out = []
        for p, i in zip(plain, ids):
            if i not in self._ids:
                text = self.text(i)
                self._ids[i] = None if text is None else self._encode(text)
            out.append(list(p) if self._ids[i] is None else self._ids[i])
        return out

    def _encode(self, text: str) -> list[int]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        bos = self.tokenizer.bos_token_id
        return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def with_privileged_view(batch: Batch, prompts: list[list[int]], comp: Any, group_size: int, pad: int) -> Batch:
    """``batch`` (GRPO's rows: student prompt + completion, group by group) plus the view :data:`PRIVILEGED`:
    each row's teacher prompt (``prompts``, one per group) + the same completion, and its targets in
    ``extras[PRIVILEGED_TARGET]``."""
    rows = [p for p in prompts for _ in range(group_size)]
    priv = collate([TokenizedExample(tuple(p + comp.row(r, with_eos=True)), len(p)) for r, p in enumerate(rows)],
                   batch.index.tolist(), pad)
    device = batch.index.device
    return Batch(views={**batch.views, PRIVILEGED: priv.views[TOKENS].to(device)}, index=batch.index,
                 target=batch.target, labeled=batch.labeled,
                 extras={**batch.extras, PRIVILEGED_TARGET: priv.target.to(device)})


def context_logprobs(student: Any, batch: Batch, vocab: int | None,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs of the completion tokens in both contexts, on the student layout: (student [B, T], teacher
    [B, T], mask [B, T]), each with the graph of its own forward (``student``: the outputs of the two views).

    The completion holds the same tokens in both views at other positions (the prompts differ in length); the
    teacher's log-probs are moved to the student's positions, keeping their graph.
    """
    mask = batch.target != IGNORE_INDEX
    priv_target = batch.extras[PRIVILEGED_TARGET]
    priv_mask = priv_target != IGNORE_INDEX
    if not torch.equal(mask.sum(1), priv_mask.sum(1)):
        raise ShapeMismatchError("privileged view: its completions do not have the student view's token counts")
    s, t = student[TOKENS].logits, student[PRIVILEGED].logits
    if vocab is not None:  # the sampling drew among these only
        s, t = s[..., :vocab], t[..., :vocab]
    logp = sampled_token_logprobs(s, batch.target.clamp_min(0), temperature)
    priv_logp = sampled_token_logprobs(t, priv_target.clamp_min(0), temperature)
    teacher = torch.zeros_like(logp).masked_scatter(mask, priv_logp[priv_mask])
    if not torch.equal(torch.zeros_like(batch.target).masked_scatter(mask, priv_target[priv_mask]),
                       torch.where(mask, batch.target, 0)):
        raise ShapeMismatchError("privileged view: its completion tokens differ from the student view's")
    return logp, teacher, mask
