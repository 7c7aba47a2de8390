"""Generated arithmetic problems with exact integer answers: the offline verifiable task of issue 12.

Three kinds, each with a worked solution that ends in ``#### N`` (a teacher trace for SFT, or the
privileged information of pi-Distill / OPSD):

- ``add``: ``a + b`` with ``a``, ``b`` of ``d`` digits each;
- ``mul``: ``a × b`` with ``a`` of ``d`` digits and ``b`` of ``max(1, d // 2)`` digits (one digit: 2..9) (so products stay
  within what a small model can carry);
- ``word``: a one-sentence story (buy more, give away, equal boxes) over numbers of ``d`` digits.

The *difficulty mix* is two weight tables: over kinds and over digit counts ``d``. Problem ``i`` of a seed
is drawn from its own generator seeded by ``(seed, i)``, so problem ``i`` is the same whatever ``n`` is
(asking for more problems only appends) and on every machine (Python's ``random.Random`` with a string
seed is specified to be stable across versions and platforms). Ids are content hashes prefixed by the
kind, ``add-3f2a...``: the same problem drawn twice gets the same id, and :func:`~alambic.tasks.base.split_by_id`
keeps both copies on one side of a held-out split.
"""

from __future__ import annotations

import random
from collections.abc import Mapping

from alambic.tasks.base import Problem, TaskError, problem_id

__all__ = ["ARITHMETIC_INSTRUCTION", "arithmetic_problem", "generate_arithmetic"]

ARITHMETIC_INSTRUCTION = "Give the final answer as an integer on the last line, after '####'."

KINDS = ("add", "mul", "word")

_NAMES = ("Ada", "Bruno", "Chen", "Dara", "Emil", "Farah", "Goran", "Hana", "Ivo", "Jun")
_ITEMS = ("apples", "marbles", "stamps", "pencils", "shells", "coins", "stickers", "books")


def _operand(rng: random.Random, digits: int) -> int:
    """A uniformly drawn integer with exactly ``digits`` digits (1 digit: 1..9, no zero operand)."""
    low = 10 ** (digits - 1) if digits > 1 else 1
    return rng.randint(low, 10**digits - 1)


def _multiplier(rng: random.Random, digits: int) -> int:
    """Like :func:`_operand`, but a one-digit multiplier is 2..9 (a factor of 1 makes no problem)."""
    return rng.randint(2, 9) if digits == 1 else _operand(rng, digits)


def _weighted(rng: random.Random, weights: Mapping, what: str):
    keys = list(weights)
    return rng.choices(keys, weights=[float(weights[k]) for k in keys], k=1)[0]


def _check_weights(weights: Mapping, allowed, what: str) -> None:
    if not weights:
        raise TaskError(f"{what}: empty weight table")
    for key, w in weights.items():
        if key not in allowed:
            raise TaskError(f"{what}: unknown key {key!r} (allowed: {', '.join(map(str, allowed))})")
        if not float(w) >= 0.0:
            raise TaskError(f"{what}: weight of {key!r} must be >= 0, got {w}")
    if sum(float(w) for w in weights.values()) <= 0.0:
        raise TaskError(f"{what}: the weights sum to 0")


def arithmetic_problem(kind: str, digits: int, rng: random.Random, instruction: str = ARITHMETIC_INSTRUCTION) -> Problem:
    """One problem of ``kind`` with ``digits``-digit operands drawn from ``rng``."""
    if digits < 1:
        raise TaskError(f"digits must be >= 1, got {digits}")
    if kind == "add":
        a, b = _operand(rng, digits), _operand(rng, digits)
        question, answer = f"What is {a} + {b}?", a + b
        solution = f"{a} + {b} = {answer}"
    elif kind == "mul":
        a, b = _operand(rng, digits), _multiplier(rng, max(1, digits // 2))
        question, answer = f"What is {a} * {b}?", a * b
        solution = f"{a} * {b} = {answer}"
    elif kind == "word":
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        story = rng.randrange(3)
        a, b = _operand(rng, digits), _operand(rng, digits)
        if story == 0:
            question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
            answer, solution = a + b, f"{a} + {b} = {a + b}"
        elif story == 1:
            a, b = max(a, b), min(a, b)
            question = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
            answer, solution = a - b, f"{a} - {b} = {a - b}"
        else:
            b = _multiplier(rng, max(1, digits // 2))
            question = f"{name} fills {b} boxes with {a} {item} each. How many {item} is that in total?"
            answer, solution = a * b, f"{b} * {a} = {a * b}"
    else:
        raise TaskError(f"unknown arithmetic kind {kind!r} (known: {', '.join(KINDS)})")
    prompt = f"{question}\n{instruction}" if instruction else question
    return Problem(id=problem_id(prompt, str(answer), prefix=f"{kind}-"), prompt=prompt, answer=str(answer),
                   solution=f"{solution}\n#### {answer}", meta={"kind": kind, "digits": digits})


def generate_arithmetic(n: int, seed: int = 0, kinds: Mapping[str, float] | None = None,
                        digits: Mapping[int, float] | None = None,
                        instruction: str = ARITHMETIC_INSTRUCTION) -> list[Problem]:
    """``n`` problems with the difficulty mix ``kinds`` × ``digits`` (weight tables, normalised here).

    Defaults: kinds ``{add: 1, mul: 1, word: 1}``; digits ``{1: 1, 2: 2, 3: 2, 4: 1}``. Problem ``i``
    depends only on ``(seed, i)`` and the two tables.
    """
    kinds = dict(kinds) if kinds is not None else {"add": 1.0, "mul": 1.0, "word": 1.0}
    digits = dict(digits) if digits is not None else {1: 1.0, 2: 2.0, 3: 2.0, 4: 1.0}
    _check_weights(kinds, KINDS, "kinds")
    bad = [d for d in digits if not isinstance(d, int) or isinstance(d, bool) or d < 1]
    if bad:
        raise TaskError(f"digits: keys must be integers >= 1, got {bad}")
    _check_weights(digits, sorted(digits), "digits")
    if n < 0:
        raise TaskError(f"n must be >= 0, got {n}")
    out = []
    for i in range(n):
        rng = random.Random(f"alambic-arithmetic:{seed}:{i}")
        kind = _weighted(rng, kinds, "kinds")
        d = _weighted(rng, digits, "digits")
        out.append(arithmetic_problem(kind, d, rng, instruction))
    return out
