"""Verifiable tasks as text data: ``data: {name: arithmetic}`` and ``data: {name: tasks}`` (JSONL).

Each problem of :mod:`alambic.tasks` becomes a :class:`TaskExample`: a :class:`~alambic.data.text.TextExample`
whose prompt is the problem's prompt and whose completion is its worked solution (what SFT and the held-out
perplexity read), plus the reference ``answer`` and the ``checker`` spec a reward method (``grpo``, ``trrd``)
scores its sampled completions with. The sample id is the problem's position, so ``texts[id].answer`` is the
answer of every row the loader yields with that id.

- ``data: {name: arithmetic, n: 512, kinds: [add], digits: [1, 2], seed: 0}``: generated problems
  (:func:`~alambic.tasks.arithmetic.generate_arithmetic`; a list means equal weights, a mapping gives them);
- ``data: {name: tasks, path: problems.jsonl, checker: integer}``: rows ``{prompt, answer[, solution]}``
  with a user checker ``pkg.mod:fn`` (imported: name only code you trust); ``fields: [hint]`` carries more
  string columns of each row along (``TaskExample.fields``: privileged information for ``pi_distill``/``opsd``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from alambic.data.text import TextDataError, TextExample
from alambic.errors import AlambicError
from alambic.registry import DATASETS
from alambic.tasks import Problem
from alambic.tasks.arithmetic import ARITHMETIC_INSTRUCTION, KINDS, generate_arithmetic
from alambic.tasks.base import load_checker, read_problems_jsonl

__all__ = ["ArithmeticDataConfig", "TaskExample", "TasksDataConfig", "task_example"]


@dataclass(frozen=True)
class TaskExample(TextExample):
    """A text example that is a verifiable problem: ``answer`` for the checker named ``checker``; ``fields``:
    the row's other string columns that ``data.fields`` asked for (a ``hint``, ...)."""

    answer: str = ""
    checker: str = "integer"
    fields: Mapping[str, str] = field(default_factory=dict)


def task_example(problem: Problem, checker: str = "integer", fields: tuple[str, ...] = ()) -> TaskExample:
    """The problem as text: the prompt, then (the loss's part) its solution, or its bare answer without one."""
    return TaskExample(problem.prompt, problem.solution or problem.answer, problem.answer, checker,
                       {k: problem.meta[k] for k in fields})


class ArithmeticDataConfig(BaseModel):
    """Options of ``data: {name: arithmetic}``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n: int = Field(512, ge=1, description="problems generated (problem i depends only on (seed, i))")
    kinds: list[str] | dict[str, float] = Field(["add"], description="kinds (add, mul, word): a list (equal "
                                                "weights) or a weight table")
    digits: list[int] | dict[int, float] = Field([1, 2], description="operand digit counts: a list (equal "
                                                 "weights) or a weight table")
    seed: int = Field(0, ge=0, description="the generator's seed (not the split's: data.split_seed)")
    instruction: str = Field(ARITHMETIC_INSTRUCTION, description="text after each question ('': none)")
    max_length: int = Field(128, ge=2, description="tokens per example at most")

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, v):
        bad = [k for k in v if k not in KINDS]
        if bad or not v:
            raise ValueError(f"kinds must be among {', '.join(KINDS)}, got {list(v)}")
        return v

    @field_validator("digits")
    @classmethod
    def _digits(cls, v):
        if not v or any(isinstance(d, bool) or d < 1 for d in v):
            raise ValueError(f"digits must be integers >= 1, got {list(v)}")
        return v


class TasksDataConfig(BaseModel):
    """Options of ``data: {name: tasks}``: a JSONL of problems and the checker that scores completions."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: Path = Field(description="JSONL rows {prompt, answer[, solution][, id]}")
    checker: str = Field("integer", description="'integer' (the final-answer rule of alambic.tasks) or "
                         "'pkg.mod:fn' taking (completion, answer) -> reward (imported: trusted code only)")
    prompt_key: str = Field("prompt", description="the prompt's key")
    answer_key: str = Field("answer", description="the answer's key")
    solution_key: str | None = Field("solution", description="the worked solution's key (the completion SFT "
                                     "and perplexity read; without one, the bare answer)")
    max_length: int = Field(256, ge=2, description="tokens per example at most")
    fields: list[str] = Field([], description="more string keys every row holds, carried with the problem (e.g. "
                              "hint: privileged information for pi_distill and opsd)")


def _table(v) -> dict:
    return dict(v) if isinstance(v, dict) else {k: 1.0 for k in v}


@DATASETS.register("arithmetic", config=ArithmeticDataConfig, modality="text",
                   description="generated arithmetic problems with exact answers (a verifiable task: grpo, trrd)")
def read_arithmetic(cfg: ArithmeticDataConfig, tokenizer: Any) -> list[TaskExample]:
    try:
        problems = generate_arithmetic(cfg.n, cfg.seed, _table(cfg.kinds), _table(cfg.digits), cfg.instruction)
    except AlambicError as exc:
        raise TextDataError(f"data: {exc}") from None
    return [task_example(p) for p in problems]


@DATASETS.register("tasks", config=TasksDataConfig, modality="text",
                   description="a JSONL of (prompt, answer) problems with a checker (a verifiable task)")
def read_tasks(cfg: TasksDataConfig, tokenizer: Any) -> list[TaskExample]:
    load_checker(cfg.checker)  # fails now, with its one line, rather than at the first reward
    problems = read_problems_jsonl(cfg.path, cfg.prompt_key, cfg.answer_key, solution_key=cfg.solution_key,
                                   extra_keys=cfg.fields)
    return [task_example(p, cfg.checker, tuple(cfg.fields)) for p in problems]
