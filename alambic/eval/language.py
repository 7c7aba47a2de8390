"""Held-out evaluation of a causal LM and its teacher on completion tokens, in one pass over the batches.

Every figure is a token-weighted mean over the positions whose target is not ``IGNORE_INDEX`` (the causal
shift is already in the batch, :mod:`alambic.data.text`), so splitting the data into other batches changes
nothing:

- ``nll`` and ``perplexity = exp(nll)``: of the text's own next tokens, student and teacher;
- ``agreement``: the share of tokens at which the student's top-1 next token is the teacher's;
- ``forward_kl``: KL(p_T ‖ p_S) at temperature 1 (comparable across methods), and ``divergence``: the
  divergence a method trains with (its own settings), when one is given.

Logits are compared on the shared real vocabulary (``vocab_size``: padded output rows dropped).

The same figures one at a time, with simple signatures for your own loops (:func:`perplexity`,
:func:`agreement`, :func:`divergence`, :func:`tokens_per_second`): a model is a callable ids [B, T] ->
logits [B, T, V] or a ``transformers`` model (its output's ``.logits`` is used); a loader is a
:class:`~alambic.data.text.TextLoader` (its epoch 0) or any iterable of text :class:`Batch` es.
:func:`greedy_completions` turns prompt texts into the model's greedy continuations.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.text import TOKENS
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
            t = teacher(ids.to(_device(teacher))).to(s.device) if teacher is not None else None  # teacher.device
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


# -- one figure at a time --------------------------------------------------------------------------------------


def perplexity(model: Any, loader: Any) -> float:
    """``exp`` of the mean next-token NLL over the completion tokens of ``loader`` (every non-ignored target,
    pooled over all batches: a token-weighted mean, not a mean of per-batch perplexities)."""
    total, n = 0.0, 0
    for logits, _, batch, mask in _passes([model], loader):
        total += float(F.cross_entropy(logits[0][mask].float(), batch.target[mask], reduction="sum"))
        n += int(mask.sum())
    return _exp(total / n) if n else float("nan")


def agreement(student: Any, teacher: Any, loader: Any) -> float:
    """Share of completion tokens at which the student's top-1 next token is the teacher's (on the shared
    vocabulary: padded output rows are dropped first)."""
    same, n = 0, 0
    for (s, t), _, _, mask in _passes([student, teacher], loader):
        s, t = truncate_to_shared_vocab(s, t)
        same += int((s[mask].argmax(-1) == t[mask].argmax(-1)).sum())
        n += int(mask.sum())
    return same / n if n else float("nan")


def divergence(student: Any, teacher: Any, loader: Any, fn: Callable[..., Tensor] = forward_kl) -> float:
    """Token-mean held-out divergence ``fn(student_logits, teacher_logits, mask, num_tokens=...)`` over the
    completion tokens: any :mod:`alambic.losses.sequence` function (bind its own parameters with
    ``functools.partial``, e.g. ``partial(generalized_jsd, beta=0.1)``)."""
    total, n = 0.0, 0
    for (s, t), _, _, mask in _passes([student, teacher], loader):
        s, t = truncate_to_shared_vocab(s, t)
        total += float(fn(s, t, mask, num_tokens=1))
        n += int(mask.sum())
    return total / n if n else float("nan")


def tokens_per_second(model: Any, loader: Any) -> float:
    """Forward-pass throughput: real (non-padding) tokens of ``loader`` per second of the model's forward
    calls (no gradient). A measurement, not a guarantee: it depends on the machine and its load."""
    seconds, n = 0.0, 0
    for _, dt, batch, _ in _passes([model], loader):
        seconds += dt
        mask = batch.extras.get("attention_mask")
        n += int(mask.sum()) if mask is not None else batch.views[TOKENS].numel()
    return n / seconds if seconds > 0 else float("nan")


@torch.no_grad()
def greedy_completions(model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 30, *,
                       chat: bool = False) -> list[str]:
    """The greedy (``do_sample=False``) continuation of each prompt text by a ``transformers`` model, decoded
    without special tokens and without the prompt. ``chat=True`` wraps each prompt as a user message in the
    tokenizer's chat template (with the generation prompt). One prompt at a time: no padding to get wrong."""
    out = []
    with _eval(model):
        for prompt in prompts:
            if chat:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                    return_dict=True, return_tensors="pt")["input_ids"]
            else:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
            out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def _logits(model: Any, ids: Tensor) -> Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def _passes(models: Sequence[Any], loader: Any) -> Iterable[tuple[list[Tensor], float, Batch, Tensor]]:
    """For each batch with at least one completion token: the models' logits, the seconds their forward
    calls took, the batch and its completion mask; under no_grad, the models in eval mode (restored after)."""
    batches = loader.epoch(0) if hasattr(loader, "epoch") else loader
    with torch.no_grad(), _eval(*models):
        for batch in batches:
            mask = batch.target != IGNORE_INDEX
            if not bool(mask.any()):
                continue
            start = time.perf_counter()
            logits = [_logits(m, batch.views[TOKENS]) for m in models]
            yield logits, time.perf_counter() - start, batch, mask


class _eval:
    """Put the modules among ``models`` in eval mode for a block, then back in the mode they had."""

    def __init__(self, *models: Any):
        self.modes = [(m, m.training) for m in models if isinstance(m, nn.Module)]

    def __enter__(self):
        for m, _ in self.modes:
            m.eval()

    def __exit__(self, *exc):
        for m, was in self.modes:
            m.train(was)


def _device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (cpu for a module without one)."""
    return next((p.device for p in module.parameters()), torch.device("cpu"))
