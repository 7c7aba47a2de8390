"""GRPO / TRRD language runs end to end on a tiny random char llama and a JSONL task whose checker rewards
vary for any model: resume after a kill is bit-identical, TRRD with alpha = 1 is GRPO exactly, task data
mistakes are one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

from alambic.cli import main
from alambic.recipe import load_recipe
from alambic.run import run
from alambic.tasks.tiny_lm import write_tiny_arithmetic_lm
from tests.invariants.test_training import KillAt

PARITY = "tests.unit.test_grpo:parity_reward"


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return write_tiny_arithmetic_lm(tmp_path_factory.mktemp("lm") / "arith-lm", steps=0)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("task") / "problems.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": a + b}) + "\n"
                            for a in range(1, 7) for b in range(1, 7)))
    return path


def recipe(lm: Path, task: Path, method: dict, **train) -> dict:
    return {"name": "reasoning", "seed": 0,
            "data": {"name": "tasks", "path": str(task), "checker": PARITY, "max_length": 32,
                     "val_fraction": 0.1, "test_fraction": 0.1},
            "teacher": {"hf": str(lm)}, "student": {"arch": "prune", "keep": [0, 3]},
            "method": {"group_size": 3, "max_new_tokens": 6, **method},
            "train": {"epochs": 1, "steps": 6, "batch_size": 4, "lr": 0.01, "log_every": 1, **train},
            "eval": {"num_prompts": 1, "max_new_tokens": 4}}


def _weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "student" / "model.safetensors"))


def _train_lines(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def test_a_killed_grpo_run_resumes_bit_identically(lm, task, tmp_path):
    r = load_recipe(recipe(lm, task, {"name": "grpo"}, checkpoint_every=2))
    run(r, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(r, tmp_path / "killed", progress=False, callbacks=[KillAt(3)])
    summary = run(r, tmp_path / "killed", resume=True, progress=False)
    assert summary["train"]["resumed_from_step"] == 2
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight, killed = _train_lines(tmp_path / "straight"), _train_lines(tmp_path / "killed")
    assert [x["loss"] for x in straight] == [x["loss"] for x in killed]
    assert [x["monitors"]["reward"] for x in straight] == [x["monitors"]["reward"] for x in killed]
    assert any(x["monitors"]["adv_abs"] > 0 for x in straight)  # the steps did learn something


def test_trrd_alpha_one_is_grpo_end_to_end(lm, task, tmp_path):
    run(load_recipe(recipe(lm, task, {"name": "grpo"}, steps=1)), tmp_path / "grpo", progress=False)
    run(load_recipe(recipe(lm, task, {"name": "trrd", "alpha": 1.0}, steps=1)), tmp_path / "trrd", progress=False)
    g, t = _train_lines(tmp_path / "grpo"), _train_lines(tmp_path / "trrd")
    # (the value may be 0 with a non-zero gradient: advantages sum to 0 per group, and equal lengths weigh them
    # equally; the gradient -sum A grad log pi is not 0, so the weights must have moved)
    assert g[0]["loss"] == t[0]["loss"] and g[0]["monitors"]["adv_abs"] > 0
    a, b = _weights(tmp_path / "grpo"), _weights(tmp_path / "trrd")
    start = _weights_of(lm, keep=[0, 3])
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], start[k]) for k in a)


def _weights_of(lm: Path, keep: list[int]) -> dict:
    """The pruned student's initial weights, named as its saved state dict."""
    from alambic.models.causal_lm import load_causal_lm, prune_layers

    return {k: v for k, v in prune_layers(load_causal_lm(str(lm), None, "float32"), keep).state_dict().items()}


def _cli_error(capsys, tmp_path, data, *overrides) -> tuple[int, str]:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["run", str(path), "--out", str(tmp_path / "bad-run"), "--quiet", *overrides])
    return code, capsys.readouterr().err.strip()


def test_task_data_and_method_mistakes_are_one_line(lm, task, tmp_path, capsys):
    arith = recipe(lm, task, {"name": "grpo"})
    arith["data"] = {"name": "arithmetic", "n": 16, "kinds": ["add"], "digits": [1]}
    code, err = _cli_error(capsys, tmp_path, arith, "data.kinds=[div]")
    assert code == 2 and "\n" not in err and err.startswith("error: data.kinds")
    code, err = _cli_error(capsys, tmp_path, arith, "data.digits=[0]")
    assert code == 2 and "\n" not in err and err.startswith("error: data.digits")
    code, err = _cli_error(capsys, tmp_path, arith, "method.group_size=1")
    assert code == 2 and "\n" not in err and err.startswith("error: method.group_size")
    code, err = _cli_error(capsys, tmp_path, recipe(lm, task, {"name": "grpo"}), "data.checker=nowhere.mod:fn")
    assert code != 0 and "\n" not in err and "nowhere" in err


def test_the_summary_and_report_hold_held_out_accuracy_of_greedy_answers(lm, task, tmp_path):
    """The test split's problems answered greedily by the trained student and by the teacher, scored by the task's
    checker: the summary's figure is what alambic.eval.tasks gives on the saved student, and the report shows it
    with completions and their rewards."""
    import transformers

    from alambic.data.text_build import build_text_data
    from alambic.eval.tasks import task_accuracy

    r = load_recipe(recipe(lm, task, {"name": "grpo"}, steps=2) | {"eval": {"num_prompts": 0,
                                                                              "task_max_new_tokens": 5}})
    summary = run(r, tmp_path / "run", progress=False)
    got, teacher = summary["test"]["task"], summary["teacher"]["test"]["task"]
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "run" / "student")
    data = build_text_data(r.data, tok)
    ids = data.splits["test"]
    assert got["problems"] == len(ids) == teacher["problems"] and len(got["samples"]) == min(4, len(ids))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student").eval()
    again = task_accuracy(model, tok, [data.examples[i].ids[: data.examples[i].completion_start] for i in ids],
                          [data.texts[i] for i in ids], max_new_tokens=5)
    assert again["accuracy"] == got["accuracy"] and again["tokens"] == got["tokens"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Held-out task accuracy" in report and f"reward {got['samples'][0]['reward']:g}" in report
