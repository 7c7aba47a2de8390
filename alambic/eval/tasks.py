"""Held-out accuracy of a causal LM on verifiable tasks: greedy completions scored by the task's checker.

A reasoning run (``data: {name: arithmetic}`` or ``{name: tasks}``, :mod:`alambic.data.tasks`) is judged by
what its policy *answers*, not by its perplexity of the reference solutions: every held-out problem's prompt
is completed greedily (temperature 0, so the figure is a function of the weights alone), at most
``max_new_tokens`` tokens, stopping at EOS; the completion (special tokens skipped) is scored by the
problem's checker against its answer (:func:`alambic.tasks.base.load_checker`: ``integer`` by default, 1.0 for
a right final answer). ``accuracy`` is the mean reward over the problems. Because methods are compared "at
equal generated tokens" (issue 12), the mean and total number of generated tokens are reported beside it,
and the share of completions that ended with EOS within the budget (``finished``).

Prompts are batched with left padding (:func:`alambic.generation.sampling.sample`); each row's completion
equals the one it gets alone, so the batch size changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from alambic.generation.sampling import sample
from alambic.tasks.base import load_checker

__all__ = ["is_task_data", "task_accuracy"]


def is_task_data(texts: Sequence[Any]) -> bool:
    """Whether the run's examples are verifiable problems (each carries an ``answer`` and a ``checker``)."""
    return bool(texts) and all(hasattr(t, "answer") and hasattr(t, "checker") for t in texts)


@torch.no_grad()
def task_accuracy(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], texts: Sequence[Any], *,
                  max_new_tokens: int, batch_size: int = 16, vocab_size: int | None = None,
                  samples: int = 4) -> dict[str, Any]:
    """Greedy accuracy of ``model`` on ``prompts`` (token ids, one per problem), scored against ``texts``
    (the matching :class:`~alambic.data.tasks.TaskExample` s: ``answer`` and ``checker``).

    Returns ``{"problems", "accuracy", "correct", "tokens", "mean_tokens", "finished", "samples"}``:
    ``correct`` sums the rewards (a checker may give partial credit), ``tokens`` counts generated tokens
    (the EOS included), ``samples`` holds the first ``samples`` problems as ``{prompt, completion, answer,
    reward}`` for the report."""
    if len(prompts) != len(texts):
        raise ValueError(f"task_accuracy: {len(prompts)} prompts for {len(texts)} problems")
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if isinstance(eos, int) else 0)
    checkers: dict[str, Any] = {}
    rewards: list[float] = []
    tokens = finished = 0
    shown: list[dict[str, Any]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start: start + batch_size]]
        out = sample(model, chunk, max_new_tokens=max_new_tokens, temperature=0.0, eos_id=eos, pad_id=pad,
                     vocab_size=vocab_size)
        tokens += int(out.mask.sum())
        finished += int(out.finished.sum())
        for b, ids in enumerate(chunk):
            t = texts[start + b]
            completion = tokenizer.decode(out.ids[b][out.mask[b]].tolist(), skip_special_tokens=True)
            if t.checker not in checkers:
                checkers[t.checker] = load_checker(t.checker)
            r = float(checkers[t.checker](completion, t.answer))
            rewards.append(r)
            if len(shown) < samples:
                shown.append({"prompt": tokenizer.decode(ids, skip_special_tokens=True), "completion": completion,
                              "answer": t.answer, "reward": r})
    n = len(rewards)
    return {"problems": n, "accuracy": sum(rewards) / n if n else None, "correct": sum(rewards),
            "tokens": tokens, "mean_tokens": tokens / n if n else None, "finished": finished / n if n else None,
            "samples": shown}
