"""Verifiable tasks: generated arithmetic and JSONL (prompt, answer) sources, with checkers giving rewards in {0, 1}."""

from alambic.tasks.arithmetic import (
                                ARITHMETIC_INSTRUCTION,
                                arithmetic_problem,
                                generate_arithmetic,
)
from alambic.tasks.base import (
                                Checker,
                                Problem,
                                TaskError,
                                extract_final_answer,
                                group_rewards,
                                integer_checker,
                                load_checker,
                                problem_id,
                                read_problems_jsonl,
                                split_by_id,
)

__all__ = [
    "ARITHMETIC_INSTRUCTION", "Checker", "Problem", "TaskError", "arithmetic_problem", "extract_final_answer",
    "generate_arithmetic", "group_rewards", "integer_checker", "load_checker", "problem_id", "read_problems_jsonl",
    "split_by_id",
]
