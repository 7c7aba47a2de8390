"""pi-Distill / OPSD language runs end to end on a tiny random char llama and a JSONL task with a ``hint`` column
(the privileged information): a killed run resumes bit-identically, OPSD with empty hints trains GRPO's weights
exactly, and privileged-information mistakes are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from alambic.recipe import load_recipe
from alambic.run import run
from alambic.tasks.tiny_lm import write_tiny_arithmetic_lm
from tests.conftest import KillAt
from tests.integration.test_reasoning_run import (
    _cli_error,
    _train_lines,
    _weights,
    recipe,
)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return write_tiny_arithmetic_lm(tmp_path_factory.mktemp("lm") / "arith-lm", steps=0)


def _task(path: Path, hint) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": a + b, "hint": hint(a, b)}) + "\n"
                            for a in range(1, 7) for b in range(1, 7)))
    return path


@pytest.fixture(scope="module")
def hinted(tmp_path_factory) -> Path:
    return _task(tmp_path_factory.mktemp("task") / "hinted.jsonl", lambda a, b: f"{a}+{b} is {a + b}")


@pytest.fixture(scope="module")
def unhinted(tmp_path_factory) -> Path:
    return _task(tmp_path_factory.mktemp("task") / "unhinted.jsonl", lambda a, b: "")


def privileged_recipe(lm: Path, task: Path, method: dict, **train) -> dict:
    r = recipe(lm, task, {"privileged": "hint", "beta": 0.5, **method}, **train)
    r["data"]["fields"] = ["hint"]
    return r


@pytest.mark.parametrize("method", [{"name": "pi_distill", "alpha": 0.5}, {"name": "opsd"}], ids=["pi_distill", "opsd"])
def test_a_killed_run_resumes_bit_identically(lm, hinted, tmp_path, method):
    r = load_recipe(privileged_recipe(lm, hinted, method, checkpoint_every=2))
    run(r, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(r, tmp_path / "killed", progress=False, callbacks=[KillAt(3)])
    summary = run(r, tmp_path / "killed", resume=True, progress=False)
    assert summary["train"]["resumed_from_step"] == 2
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight, killed = _train_lines(tmp_path / "straight"), _train_lines(tmp_path / "killed")
    assert [x["loss"] for x in straight] == [x["loss"] for x in killed]
    assert [x["monitors"] for x in straight] == [x["monitors"] for x in killed]  # rewards, ratios, KL terms
    assert all(x["monitors"]["kl"] != 0 for x in straight)  # the hint changes how the model sees the completion


def test_opsd_with_empty_hints_is_grpo_end_to_end(lm, unhinted, tmp_path):
    run(load_recipe(privileged_recipe(lm, unhinted, {"name": "opsd"}, steps=2)), tmp_path / "opsd", progress=False)
    run(load_recipe(recipe(lm, unhinted, {"name": "grpo"}, steps=2)), tmp_path / "grpo", progress=False)
    o, g = _train_lines(tmp_path / "opsd"), _train_lines(tmp_path / "grpo")
    assert all(x["monitors"]["kl"] == 0.0 and x["monitors"]["kl_reward"] == 0.0 for x in o)
    assert [x["loss"] for x in o] == [x["loss"] for x in g] and any(x["monitors"]["adv_abs"] > 0 for x in g)
    a, b = _weights(tmp_path / "opsd"), _weights(tmp_path / "grpo")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_privileged_information_mistakes_are_one_line(lm, hinted, tmp_path, capsys):
    no_field = privileged_recipe(lm, hinted, {"name": "pi_distill"})
    del no_field["data"]["fields"]
    code, err = _cli_error(capsys, tmp_path, no_field)
    assert code != 0 and "\n" not in err and "method.privileged 'hint'" in err and "data.fields" in err
    code, err = _cli_error(capsys, tmp_path, privileged_recipe(lm, hinted, {"name": "opsd"}), "data.fields=[tip]")
    assert code != 0 and "\n" not in err and "hinted.jsonl:1" in err and "'tip'" in err
    code, err = _cli_error(capsys, tmp_path, privileged_recipe(lm, hinted, {"name": "opsd"}),
                           "method.template={privileged}")
    assert code == 2 and "\n" not in err and err.startswith("error: method.template")
    code, err = _cli_error(capsys, tmp_path, privileged_recipe(lm, hinted, {"name": "pi_distill"}), "method.alpha=2")
    assert code == 2 and "\n" not in err and err.startswith("error: method.alpha")
