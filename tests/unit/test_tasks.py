"""Verifiable tasks (``alambic.tasks``): the final-answer rule, rewards on hand-made completions, the seeded
arithmetic generator (stable problems and ids, the difficulty mix, correct answers), JSONL sources and user
checkers, and the held-out split by id."""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from collections import Counter

import pytest
import torch

from alambic.tasks import (
    Problem,
    TaskError,
    extract_final_answer,
    generate_arithmetic,
    group_rewards,
    integer_checker,
    load_checker,
    problem_id,
    read_problems_jsonl,
    split_by_id,
)

# -- the answer rule -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, expected", [
    ("#### 42", 42),
    ("We add them.\n#### 1,234", 1234),
    ("first 7 then #### 42", 42),
    ("#### 3\nlater\n#### 4", 4),                         # the last marker decides
    ("#### 5\nand then 6", 5),                            # #### beats a later bare number
    (r"so \boxed{17}", 17),
    (r"\boxed{1} and \boxed{-2}", -2),
    (r"\boxed{9} then #### 8", 8),                        # #### beats \boxed
    ("The answer is 12.", 12),
    ("I think 3, no wait, 5", 5),                         # last number
    ("12.0", 12),
    ("#### $42$.", 42),
    ("-7", -7),
])
def test_extract_final_answer(completion, expected):
    assert extract_final_answer(completion) == expected


@pytest.mark.parametrize("completion", [
    "",
    "no digits here",
    "#### forty-two",                 # a marker without a number: no fallback to earlier numbers
    "42 is my guess\n#### forty-two",
    "#### 42 apples",                 # a marker must hold one number alone
    "####\n42",                       # ... on its own line
    r"\boxed{x+1}",
    "12.5",                           # not an integer
    "abc12",                          # digits glued to a word are not a number
])
def test_extract_final_answer_none(completion):
    assert extract_final_answer(completion) is None


def test_integer_checker_rewards_are_exactly_zero_or_one():
    assert integer_checker("so 2 + 2 = 4\n#### 4", "4") == 1.0
    assert integer_checker("so 2 + 2 = 4\n#### 5", "4") == 0.0
    assert integer_checker("4 apples", "4") == 1.0
    assert integer_checker("the answer is 40", "4") == 0.0
    assert integer_checker("#### 1,302", "1302") == 1.0
    assert integer_checker("", "4") == 0.0
    with pytest.raises(TaskError, match="not an integer"):
        integer_checker("#### 4", "four")


def test_group_rewards_shape_and_values():
    problems = [Problem("a", "1+1?", "2"), Problem("b", "2*3?", "6")]
    completions = [["#### 2", "#### 3", "2"], ["6", "#### 7", r"\boxed{6}"]]
    r = group_rewards(problems, completions)
    assert r.dtype == torch.float32
    assert torch.equal(r, torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]))
    with pytest.raises(TaskError, match="different sizes"):
        group_rewards(problems, [["#### 2"], ["6", "7"]])
    with pytest.raises(TaskError, match="returned nan"):
        group_rewards(problems[:1], [["x"]], checker=lambda c, a: float("nan"))


# -- the arithmetic generator --------------------------------------------------------------------------------

def test_generated_answers_are_correct_and_the_solutions_check():
    problems = generate_arithmetic(300, seed=3)
    kinds = Counter(p.meta["kind"] for p in problems)
    assert set(kinds) == {"add", "mul", "word"}
    for p in problems:
        assert p.id.startswith(p.meta["kind"] + "-")
        assert p.id == problem_id(p.prompt, p.answer, prefix=p.meta["kind"] + "-")
        assert integer_checker(p.solution, p.answer) == 1.0          # the worked solution is a positive trace
        if p.meta["kind"] in ("add", "mul"):
            expr = p.prompt.split("What is ", 1)[1].split("?", 1)[0]
            a, op, b = expr.split()
            assert int(p.answer) == (int(a) + int(b) if op == "+" else int(a) * int(b))
            assert len(a) == p.meta["digits"]
        assert int(p.answer) >= 0


def test_generator_is_seeded_and_prefix_stable():
    a = generate_arithmetic(50, seed=7)
    assert a == generate_arithmetic(50, seed=7)
    assert generate_arithmetic(80, seed=7)[:50] == a               # asking for more only appends
    assert [p.id for p in generate_arithmetic(50, seed=8)] != [p.id for p in a]


def test_generator_follows_the_difficulty_mix():
    only = generate_arithmetic(40, seed=0, kinds={"mul": 1.0}, digits={3: 1.0})
    assert {(p.meta["kind"], p.meta["digits"]) for p in only} == {("mul", 3)}
    mix = generate_arithmetic(3000, seed=1, kinds={"add": 3.0, "word": 1.0}, digits={1: 1.0, 2: 1.0})
    share = Counter(p.meta["kind"] for p in mix)["add"] / len(mix)
    assert abs(share - 0.75) < 0.03
    with pytest.raises(TaskError, match="unknown key 'div'"):
        generate_arithmetic(3, kinds={"div": 1.0})
    with pytest.raises(TaskError, match="sum to 0"):
        generate_arithmetic(3, digits={2: 0.0})


def test_problem_ids_are_stable_content_hashes():
    # pinned values: ids and generated problems must not change across runs, machines or Python versions
    assert problem_id("What is 1 + 1?", "2") == "96f85e03577c"
    first = generate_arithmetic(1, seed=0)[0]
    assert (first.id, first.prompt.splitlines()[0], first.answer) == ("mul-af1312935c14", "What is 1916 * 54?", "103464")
    assert problem_id("p", "a") == hashlib.sha1(b"p\0a").hexdigest()[:12]
    assert problem_id("p", "a") != problem_id("p", "b")


def test_split_by_id_is_order_free_and_keeps_duplicates_together():
    problems = generate_arithmetic(400, seed=2, digits={1: 1.0})    # one-digit problems repeat
    train, test = split_by_id(problems, 0.25)
    assert len(train) + len(test) == len(problems)
    assert not {p.id for p in train} & {p.id for p in test}
    assert 0.15 < len(test) / len(problems) < 0.35
    _, test_r = split_by_id(list(reversed(problems)), 0.25)
    assert {p.id for p in test_r} == {p.id for p in test}
    assert split_by_id(problems, 0.0)[1] == [] and split_by_id(problems, 1.0)[0] == []


# -- JSONL sources and user checkers -------------------------------------------------------------------------

def test_read_problems_jsonl(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "2+2?", "answer": 4, "why": "2+2=4\n#### 4"}, {"prompt": "3*3?", "answer": "9"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    problems = read_problems_jsonl(path, solution_key="why")
    assert [p.answer for p in problems] == ["4", "9"]
    assert problems[0].id == problem_id("2+2?", "4") and problems[0].solution.endswith("#### 4")
    assert problems[1].solution == ""
    with_ids = tmp_path / "ids.jsonl"
    with_ids.write_text(json.dumps({"q": "x", "a": "1", "id": 17}) + "\n")
    assert read_problems_jsonl(with_ids, "q", "a", id_key="id")[0].id == "17"


def test_read_problems_jsonl_carries_the_extra_string_fields_asked_for(tmp_path):
    path = tmp_path / "hints.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "answer": 4, "hint": "double 2", "note": "n"}) + "\n"
                    + json.dumps({"prompt": "3+3?", "answer": 6, "hint": ""}) + "\n")
    problems = read_problems_jsonl(path, extra_keys=["hint"])
    assert [p.meta["hint"] for p in problems] == ["double 2", ""] and "note" not in problems[0].meta
    with pytest.raises(TaskError, match=r"hints.jsonl:2: the row has no 'note'"):
        read_problems_jsonl(path, extra_keys=["hint", "note"])
    path.write_text(json.dumps({"prompt": "2+2?", "answer": 4, "hint": 4}) + "\n")
    with pytest.raises(TaskError, match=r"hints.jsonl:1: 'hint' must be a string, got int"):
        read_problems_jsonl(path, extra_keys=["hint"])


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a", "answer": "1"}\n{"prompt": "a", "answer": "1"}\n', "repeats line 1"),
    ('{"prompt": "a"}\n', "expected a non-empty string 'prompt'"),
    ('{"prompt": "", "answer": "1"}\n', "non-empty"),
    ('not json\n', "invalid JSON"),
    ('', "no rows"),
])
def test_read_problems_jsonl_errors(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(TaskError, match=message):
        read_problems_jsonl(path)


def test_load_checker_imports_a_user_function(tmp_path, monkeypatch):
    pkg = tmp_path / "mycheckers.py"
    pkg.write_text(textwrap.dedent("""
        def exact(completion, answer):
            return float(completion.strip() == answer)

        def wrong_arity(completion):
            return 1.0

        NOT_A_FUNCTION = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        fn = load_checker("mycheckers:exact")
        assert fn(" yes ", "yes") == 1.0 and fn("no", "yes") == 0.0
        problems = [Problem("p", "?", "yes")]
        assert torch.equal(group_rewards(problems, [["yes", "no"]], fn), torch.tensor([[1.0, 0.0]]))
        assert load_checker("integer") is integer_checker
        with pytest.raises(TaskError, match="must accept"):
            load_checker("mycheckers:wrong_arity")
        with pytest.raises(TaskError, match="not a function"):
            load_checker("mycheckers:NOT_A_FUNCTION")
        with pytest.raises(TaskError, match="no attribute"):
            load_checker("mycheckers:missing")
        with pytest.raises(TaskError, match="cannot import"):
            load_checker("no_such_module_xyz:fn")
        with pytest.raises(TaskError, match="expected"):
            load_checker("mycheckers")
    finally:
        sys.modules.pop("mycheckers", None)
