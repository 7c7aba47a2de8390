"""Verifiable tasks: problems with a known answer and a checker that turns a completion into a reward in {0, 1}.

The reasoning and policy-distillation methods (GRPO, TRRD, pi-Distill, OPSD, REDI) learn from rewards that a
program computes, not from a learned reward model. A task is a list of :class:`Problem` (prompt, reference
answer, a stable id) and a :data:`Checker` ``(completion, answer) -> float``.

The default checker, :func:`integer_checker`, reads the final answer with one strict, documented rule
(:func:`extract_final_answer`) and compares it as an exact integer:

1. if the completion contains ``#### N`` (GSM8K's convention), the *last* such marker decides;
2. otherwise, if it contains ``\\boxed{N}`` (the MATH convention), the *last* box decides;
3. otherwise the *last number* in the completion decides.

``N`` is an integer written with an optional sign and optional thousands commas (``-1,234``); a number with a
non-zero fractional part (``12.5``) is not an integer and scores 0, while ``12.0`` reads as 12. A marker whose
content is not such a number (``#### twelve``, ``\\boxed{x+1}``) gives no answer (reward 0): the rule never
falls back to an earlier number, so a completion cannot earn the reward by mentioning the answer somewhere
before its final claim.

Problem ids are content hashes (:func:`problem_id`), stable across runs, machines and row order, so a
held-out split by id (:func:`split_by_id`) never puts the same problem on both sides.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from alambic.errors import AlambicError

__all__ = [
    "Checker",
    "Problem",
    "TaskError",
    "extract_final_answer",
    "group_rewards",
    "integer_checker",
    "load_checker",
    "problem_id",
    "read_problems_jsonl",
    "split_by_id",
]

Checker = Callable[[str, str], float]
"""``checker(completion, answer) -> reward``; the built-in checkers return exactly 0.0 or 1.0."""


class TaskError(AlambicError):
    """A task file, a checker or a task setting is unusable; the message names the file, line or key."""


@dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    ``id``: a stable identifier (the content hash of prompt and answer unless the source gives one);
    ``prompt``: the text the policy sees; ``answer``: the reference answer the checker compares with;
    ``solution``: an optional worked solution (a teacher trace for SFT, or the privileged information of
    pi-Distill / OPSD); ``meta``: free-form facts (kind, digits) for reports.
    """

    id: str
    prompt: str
    answer: str
    solution: str = ""
    meta: Mapping[str, Any] = field(default_factory=dict)


def problem_id(prompt: str, answer: str, prefix: str = "") -> str:
    """A stable id: ``prefix`` + the first 12 hex digits of SHA-1 over ``prompt``, NUL, ``answer`` (UTF-8)."""
    digest = hashlib.sha1(f"{prompt}\0{answer}".encode()).hexdigest()[:12]
    return f"{prefix}{digest}"


# -- the answer rule ---------------------------------------------------------------------------------------

_NUMBER = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(rf"(?<![\w.]){_NUMBER}(?![\w]|\.\d)")
_HASH_RE = re.compile(r"####[ \t]*([^\n]*)")
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_WHOLE_NUMBER_RE = re.compile(rf"\s*\$?\s*({_NUMBER})\s*\$?\s*\.?\s*")


def _as_integer(text: str) -> int | None:
    """``'1,234'`` -> 1234, ``'-7'`` -> -7, ``'12.0'`` -> 12; ``'12.5'`` or anything else -> None."""
    text = text.replace(",", "")
    whole, _, frac = text.partition(".")
    if frac and frac.strip("0"):
        return None
    try:
        return int(whole)
    except ValueError:
        return None


def extract_final_answer(completion: str) -> int | None:
    """The integer a completion claims as its final answer, by the module's rule (``####`` > ``\\boxed`` >
    last number), or None when it claims none or its claim is not an integer.

    A ``####`` or ``\\boxed{}`` content must be one number alone, on the marker's line for ``####``
    (surrounding spaces, ``$`` signs and a trailing full stop are allowed): ``#### 42.`` reads 42;
    ``#### 42 apples`` and ``####`` followed by a line break read nothing.
    """
    for regex in (_HASH_RE, _BOXED_RE):
        hits = regex.findall(completion)
        if hits:
            m = _WHOLE_NUMBER_RE.fullmatch(hits[-1])
            return _as_integer(m.group(1)) if m else None
    numbers = _NUMBER_RE.findall(completion)
    return _as_integer(numbers[-1]) if numbers else None


def integer_checker(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer (:func:`extract_final_answer`) equals the integer ``answer``,
    else 0.0. ``answer`` must itself read as an integer (a :class:`TaskError` otherwise: a task bug)."""
    expected = _as_integer(answer.strip())
    if expected is None:
        raise TaskError(f"integer_checker: the reference answer {answer!r} is not an integer")
    got = extract_final_answer(completion)
    return 1.0 if got is not None and got == expected else 0.0


def group_rewards(problems: Sequence[Problem], completions: Sequence[Sequence[str]],
                  checker: Checker = integer_checker) -> Tensor:
    """Rewards of G completions per problem: [B] problems, B lists of G strings -> float32 [B, G].

    Every list must hold the same number G of completions (the group of GRPO); a checker returning a
    non-finite value is an error, not a silent NaN in the advantages.
    """
    if len(problems) != len(completions):
        raise TaskError(f"group_rewards: {len(problems)} problems but {len(completions)} completion groups")
    sizes = {len(c) for c in completions}
    if len(sizes) > 1:
        raise TaskError(f"group_rewards: completion groups of different sizes {sorted(sizes)}")
    out = torch.zeros(len(problems), sizes.pop() if sizes else 0, dtype=torch.float32)
    for i, (problem, group) in enumerate(zip(problems, completions)):
        for j, text in enumerate(group):
            r = float(checker(text, problem.answer))
            if not math.isfinite(r):
                raise TaskError(f"group_rewards: the checker returned {r} for problem {problem.id}")
            out[i, j] = r
    return out


# -- JSONL tasks with a user checker -----------------------------------------------------------------------


def load_checker(spec: str) -> Checker:
    """The checker named ``'package.module:function'``, or ``'integer'`` for :func:`integer_checker`.

    A user checker is code: naming it imports that module and calls the function on every completion, so
    name only code you trust (as with a ``module:`` model factory). The function must accept two
    positional arguments ``(completion: str, answer: str)`` and return a number (1 = correct).
    """
    if spec == "integer":
        return integer_checker
    from alambic.models.zoo import (
        import_object,  # the project's one 'pkg.mod:name' importer
    )

    try:
        fn = import_object(spec)
    except AlambicError as exc:
        raise TaskError(f"checker {exc}") from None
    if not callable(fn):
        raise TaskError(f"checker '{spec}' is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind("completion", "answer")
    except TypeError:
        raise TaskError(f"checker '{spec}' must accept (completion, answer)") from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    return fn


def read_problems_jsonl(path: str | Path, prompt_key: str = "prompt", answer_key: str = "answer",
                        id_key: str | None = None, solution_key: str | None = None,
                        extra_keys: Sequence[str] = ()) -> list[Problem]:
    """Problems of a JSONL file whose rows hold ``{prompt_key: str, answer_key: str | int}``.

    The id is the row's ``id_key`` field when given, else :func:`problem_id` of prompt and answer. Two rows
    with the same id are an error (one problem on both sides of a held-out split would inflate accuracy).
    Each of ``extra_keys`` (e.g. ``hint``: privileged information for pi-Distill / OPSD) must be a string in
    every row (it may be empty) and is kept in the problem's ``meta``.
    """
    from alambic.data.text import TextDataError, _jsonl_rows

    path = Path(path)
    out: list[Problem] = []
    seen: dict[str, int] = {}
    try:
        rows = list(_jsonl_rows(path))
    except TextDataError as exc:
        raise TaskError(str(exc)) from None
    for line_no, row in rows:
        prompt, answer = row.get(prompt_key), row.get(answer_key)
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(prompt, str) or not isinstance(answer, str) or not prompt:
            raise TaskError(f"{path}:{line_no}: expected a non-empty string '{prompt_key}' and a string or "
                            f"integer '{answer_key}'")
        pid = row.get(id_key) if id_key else problem_id(prompt, answer)
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise TaskError(f"{path}:{line_no}: '{id_key}' must be a string or an integer")
        pid = str(pid)
        if pid in seen:
            raise TaskError(f"{path}:{line_no}: problem id '{pid}' repeats line {seen[pid]}")
        seen[pid] = line_no
        solution = row.get(solution_key, "") if solution_key else ""
        if not isinstance(solution, str):
            raise TaskError(f"{path}:{line_no}: '{solution_key}' must be a string")
        meta: dict[str, Any] = {"line": line_no}
        for key in extra_keys:
            if key not in row:
                raise TaskError(f"{path}:{line_no}: the row has no '{key}' (data.fields asks every row for it)")
            if not isinstance(row[key], str):
                raise TaskError(f"{path}:{line_no}: '{key}' must be a string, got {type(row[key]).__name__}")
            meta[key] = row[key]
        out.append(Problem(pid, prompt, answer, solution, meta))
    return out


def split_by_id(problems: Sequence[Problem], test_fraction: float, salt: str = "") -> tuple[list[Problem], list[Problem]]:
    """(train, test): a problem is in test when the hash of ``salt + id`` falls below ``test_fraction``.

    The side a problem lands on depends on its id only, not on the order or number of the other problems,
    so growing a generated task never moves an old problem across the split.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise TaskError(f"test_fraction must be in [0, 1], got {test_fraction}")
    train, test = [], []
    for p in problems:
        u = int(hashlib.sha1(f"{salt}{p.id}".encode()).hexdigest()[:15], 16) / 16**15
        (test if u < test_fraction else train).append(p)
    return train, test
