"""Held-out evaluation of a causal LM and its teacher on completion tokens, in one pass over the batches.

Every figure is a token-weighted mean over the positions whose target is not ``IGNORE_INDEX`` (the causal
shift is already in the batch, :mod:`alambic.data.text`), so splitting the data into other batches changes
nothing:

- ``nll`` and ``perplexity = exp(nll)``: of the text's own next tokens, student and teacher;
- ``agreement``: the share of tokens at which the student's top-1 next token is the teacher's;
- ``forward_kl``: KL(p_T ‖ p_S) at temperature 1 (comparable across methods), and ``divergence``: the
  divergence a method trains with (its own settings), when one is given.

Logits are compared on the shared real vocabulary (``vocab_size``: padded output rows dropped).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.losses.sequence import forward_kl, truncate_to_shared_vocab

Divergence = Callable[[Tensor, Tensor, Tensor, int], Tensor]  # (student, teacher, mask, num_tokens) -> sum/num


@torch.no_grad()
def language_metrics(student: nn.Module, teacher: nn.Module | None, batches: Iterable[Batch], view: str,
                     vocab_size: int | None = None, divergence: Divergence | None = None,
                     teacher_metrics: bool = True) -> dict[str, Any]:
    """Token-weighted held-out metrics of ``student`` (and ``teacher``): modules mapping ids [B, T] to logits
    [B, T, V] (:class:`~alambic.models.causal_lm.CausalLMLogits`), run in eval mode and restored after.

    Returns ``{"tokens", "nll", "perplexity"}`` plus, with a teacher, ``"agreement"``, ``"forward_kl"``,
    ``"divergence"`` (with ``divergence``) and ``"teacher": {"nll", "perplexity"}`` (``teacher_metrics``).
    """
    modes = [(m, m.training) for m in (student, teacher) if m is not None]
    for m, _ in modes:
        m.eval()
    sums = {"tokens": 0, "nll": 0.0, "teacher_nll": 0.0, "agree": 0, "forward_kl": 0.0, "divergence": 0.0}
    try:
        for batch in batches:
            mask = batch.target != IGNORE_INDEX
            n = int(mask.sum())
            if n == 0:
                continue
            ids = batch.views[view]
            s = student(ids)
            t = teacher(ids) if teacher is not None else None
            if t is not None:
                s, t = truncate_to_shared_vocab(s, t, vocab_size)
            elif vocab_size is not None:
                s = s[..., :vocab_size]
            target = batch.target[mask]
            sums["tokens"] += n
            sums["nll"] += float(F.cross_entropy(s[mask].float(), target, reduction="sum"))
            if t is not None:
                if teacher_metrics:
                    sums["teacher_nll"] += float(F.cross_entropy(t[mask].float(), target, reduction="sum"))
                sums["agree"] += int((s[mask].argmax(-1) == t[mask].argmax(-1)).sum())
                sums["forward_kl"] += float(forward_kl(s, t, mask, num_tokens=1))
                if divergence is not None:
                    sums["divergence"] += float(divergence(s, t, mask, 1))
    finally:
        for m, was in modes:
            m.train(was)
    n = max(sums["tokens"], 1)
    nll = sums["nll"] / n
    out: dict[str, Any] = {"tokens": sums["tokens"], "nll": nll, "perplexity": _exp(nll)}
    if teacher is not None:
        out.update(agreement=sums["agree"] / n, forward_kl=sums["forward_kl"] / n)
        if divergence is not None:
            out["divergence"] = sums["divergence"] / n
        if teacher_metrics:
            t_nll = sums["teacher_nll"] / n
            out["teacher"] = {"nll": t_nll, "perplexity": _exp(t_nll)}
    return out


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")
