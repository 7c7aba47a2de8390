"""A language run end to end on a tiny llama written by the test: the CLI, the run directory, resume after a
kill, one-line refusals of recipe mistakes and of another tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from alambic.cli import main  # noqa: E402
from alambic.models.causal_lm import write_tiny_lm  # noqa: E402
from alambic.recipe import load_recipe  # noqa: E402
from alambic.run import run  # noqa: E402
from tests.invariants.test_training import KillAt  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "token_kd.yaml"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-lm", steps=20)


def recipe_data(tiny_lm: Path, **train) -> dict:
    data = yaml.safe_load(TINY.read_text())
    data["teacher"]["hf"] = str(tiny_lm)
    data["data"]["path"] = str(tiny_lm / "corpus.txt")
    data["train"].update(train)
    return data


def test_the_cli_distils_a_tiny_llama_into_a_finished_run_directory(tiny_lm, tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_data(tiny_lm)))
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--quiet", "method.nll_weight=0.1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["kind"] == "language" and summary["method"] == "token_kd"
    for split in ("test", "val"):
        assert summary[split]["tokens"] > 0 and summary[split]["perplexity"] > 1
        assert 0 <= summary[split]["agreement"] <= 1 and summary[split]["forward_kl"] >= 0
    assert summary["teacher"]["test"]["perplexity"] > 1 and summary["teacher"]["layers"] == 4
    assert summary["student"]["layers"] == 2 and summary["student"]["params"] < summary["teacher"]["params"]
    assert summary["train"]["tokens"] > summary["train"]["loss_tokens"] > 0 and summary["train"]["tokens_per_s"] > 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"] and set(train[0]["terms"]) == {"kd", "nll"}
    assert any(r["split"] == "val" and "perplexity" in r for r in lines)
    report = (out / "report.md").read_text()
    assert "## Greedy generations" in report and report.count("**Prompt:**") == 2
    assert len(summary["generations"]) == 2 and all(g["prompt"] for g in summary["generations"])
    # the student is a transformers directory: it loads and computes the logits the run evaluated
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "student")
    assert model.config.num_hidden_layers == 2
    finished = json.loads((out / "finished.json").read_text())["files"]
    assert "student/model.safetensors" in finished and "report.md" in finished
    assert "test perplexity" in capsys.readouterr().out
    # a finished run is not redone
    assert main(["run", str(path), "--out", str(out), "--quiet", "--resume", "method.nll_weight=0.1"]) == 0


def test_a_text_run_killed_mid_training_resumes_bit_identically(tiny_lm, tmp_path):
    recipe = load_recipe(recipe_data(tiny_lm, epochs=2, checkpoint_every=5))  # 12 steps per epoch
    run(recipe, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "killed", progress=False, callbacks=[KillAt(17)])
    summary = run(recipe, tmp_path / "killed", resume=True, progress=False)
    assert summary["train"]["resumed_from_step"] == 15
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "student" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _cli_error(capsys, tmp_path, data, *overrides) -> tuple[int, str]:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["run", str(path), "--out", str(tmp_path / "bad-run"), "--quiet", *overrides])
    return code, capsys.readouterr().err.strip()


def test_a_recipe_mistake_is_one_line_naming_the_key_path(tiny_lm, tmp_path, capsys):
    code, err = _cli_error(capsys, tmp_path, recipe_data(tiny_lm), "method.divergence=jsd")
    assert code == 2 and "\n" not in err and err.startswith("error: method.divergence:")
    code, err = _cli_error(capsys, tmp_path, recipe_data(tiny_lm), "method.beta=1.0")
    assert code == 2 and "\n" not in err and err.startswith("error: method.beta:")
    code, err = _cli_error(capsys, tmp_path, recipe_data(tiny_lm), "student={arch: mlp}")
    assert code == 2 and "\n" not in err and "student.arch: a language method needs a causal LM" in err
    code, err = _cli_error(capsys, tmp_path, recipe_data(tiny_lm), "teacher.gguf_file=x.gguf", "teacher.hf=null",
                           "teacher.run=somewhere")
    assert code == 2 and err.startswith("error: teacher:")
    missing = recipe_data(tiny_lm)
    missing["data"]["path"] = str(tmp_path / "nowhere.txt")
    code, err = _cli_error(capsys, tmp_path, missing)
    assert code == 2 and "\n" not in err and "nowhere.txt" in err


def test_a_student_with_another_tokenizer_is_refused_in_one_line(tiny_lm, tmp_path, capsys):
    from transformers import AutoTokenizer

    other = tmp_path / "other-lm"
    write_tiny_lm(other, steps=0)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["zebra"])
    tok.save_pretrained(other)
    data = recipe_data(tiny_lm)
    data["student"] = {"arch": "hf", "hf": str(other)}
    code, err = _cli_error(capsys, tmp_path, data)
    assert code == 2 and "\n" not in err and "different tokenizers" in err
