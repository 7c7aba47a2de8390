"""Every registered method trains: each has a tiny recipe that lowers its loss and beats chance (self-supervised
methods: a finite, moving loss and a linear probe of the representation above chance)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from alambic.errors import AlambicError
from alambic.recipe import load_recipe
from alambic.registry import METHODS
from alambic.run import run
from tests.conftest import tiny_recipe

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny"
RECIPES = sorted(p for p in TINY.glob("*.yaml"))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path | str]:
    root = tmp_path_factory.mktemp("tiny-teachers")
    specs = {"runs/tiny-teacher": {"arch": "mlp", "hidden": [64]},
             "runs/tiny-cnn-teacher": {"arch": "cnn", "channels": [8, 16]}}
    out = {}
    for key, student in specs.items():
        out[key] = root / Path(key).name
        run(load_recipe(tiny_recipe(student=student, train={"epochs": 3, "lr": 0.01})), out[key], progress=False)
    if any(yaml.safe_load(p.read_text())["data"]["name"] == "glyph_outlines" for p in RECIPES):
        # the image teacher of the cross-modal recipes (ppkt, slidr): a CNN on the glyph images whose outlines
        # the students see; it needs the fonts (none installed: those recipes skip)
        glyphs = {"name": "glyphs", "size": 16, "classes": "digits", "max_fonts": 40}
        try:
            run(load_recipe(tiny_recipe(data=glyphs, student={"arch": "cnn", "channels": [8, 16]},
                                        train={"epochs": 20, "lr": 0.01})), root / "tiny-glyph-teacher", progress=False)
            out["runs/tiny-glyph-teacher"] = root / "tiny-glyph-teacher"
        except AlambicError as exc:  # no usable font, or too few font designs to hold one out
            out["runs/tiny-glyph-teacher"] = f"no glyph teacher ({exc})"
    if importlib.util.find_spec("transformers") is not None:  # the tiny llama of the language recipes
        from alambic.models.causal_lm import write_tiny_lm

        out["runs/tiny-lm"] = write_tiny_lm(root / "tiny-lm")
        if any(yaml.safe_load(p.read_text())["data"]["name"] == "arithmetic" for p in RECIPES):
            from alambic.tasks.tiny_lm import (
                write_tiny_arithmetic_lm,  # the char llama of grpo/trrd
            )

            out["runs/tiny-arith-lm"] = write_tiny_arithmetic_lm(root / "tiny-arith-lm")
        if any((yaml.safe_load(p.read_text()).get("teacher") or {}).get("hf") == "runs/tiny-arith-lm-300"
               for p in RECIPES):  # redi's teacher: trained long enough to answer both right and wrong
            from alambic.tasks.tiny_lm import write_tiny_arithmetic_lm

            out["runs/tiny-arith-lm-300"] = write_tiny_arithmetic_lm(root / "tiny-arith-lm-300", steps=300)
    return out


def _point_at(spec: dict, teachers: dict[str, Path | str]) -> dict:
    if "run" in spec:
        if isinstance(teachers.get(spec["run"]), str):  # a teacher that could not be built here: why
            from alambic.data.glyphs import INSTALL_LINE

            pytest.skip(f"{teachers[spec['run']]}; the glyph fonts: {INSTALL_LINE}")
        if spec["run"] not in teachers:
            raise AssertionError("tiny recipes use runs/tiny-teacher, runs/tiny-cnn-teacher or runs/tiny-glyph-teacher, "
                                 f"not {spec['run']}")
        spec = {**spec, "run": str(teachers[spec["run"]])}
    return spec


def _generated(lm: Path) -> Path:
    """The tiny llama's generations of its corpus, as the seqkd recipe's comment makes them (once per module)."""
    out = lm / "generated.jsonl"
    if not out.exists():
        from alambic.cli import main

        assert main(["generate", "--teacher", str(lm), "--prompts", str(lm / "corpus.txt"), "--format", "plain",
                     "--prompt-words", "2", "--max-new-tokens", "16", "--temperature", "0.8", "--threads", "1",
                     "--out", str(out)]) == 0
    return out


def _labelled(lm: Path) -> Path:
    """The char llama's answers to one-digit additions, labelled by the integer checker, as the redi recipe's
    comment makes them (once per module)."""
    out = lm / "labelled.jsonl"
    if not out.exists():
        from alambic.cli import main
        from alambic.tasks.tiny_lm import write_arithmetic_prompts

        prompts = write_arithmetic_prompts(lm / "prompts.jsonl")
        assert main(["generate", "--teacher", str(lm), "--prompts", str(prompts), "--check", "integer:answer",
                     "--label", "--max-new-tokens", "24", "--temperature", "0.5", "--threads", "1", "--quiet",
                     "--out", str(out)]) == 0
    return out


def test_every_registered_method_has_a_tiny_recipe():
    covered = {yaml.safe_load(p.read_text())["method"]["name"] for p in RECIPES}
    assert set(METHODS.names()) <= covered, f"methods without a tiny recipe: {set(METHODS.names()) - covered}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_tiny_recipe_learns(path, teachers, tmp_path):
    data = yaml.safe_load(path.read_text())
    if "teacher" in data:
        data["teacher"] = _point_at(data["teacher"], teachers)
    if "teachers" in data:
        data["teachers"] = [_point_at(t, teachers) for t in data["teachers"]]
    if data["data"]["name"] == "text":  # a language recipe: the tiny llama and its corpus, written above
        if "runs/tiny-lm" not in teachers:
            pytest.skip("language recipes need the text extra")
        lm = teachers["runs/tiny-lm"]
        source = lm / "corpus.txt"
        if Path(data["data"]["path"]).name == "labelled.jsonl":  # redi: the char llama's labelled traces
            lm = teachers[data["teacher"]["hf"]]
            source = _labelled(lm)
        data["teacher"] = {**data["teacher"], "hf": str(lm)}
        if Path(data["data"]["path"]).name == "generated.jsonl":  # seqkd: the teacher's generations, made first
            source = _generated(lm)
        data["data"] = {**data["data"], "path": str(source)}
    if data["data"]["name"] == "arithmetic":  # a verifiable task: the tiny char llama that can write digits
        if "runs/tiny-arith-lm" not in teachers:
            pytest.skip("language recipes need the text extra")
        data["teacher"] = {**data["teacher"], "hf": str(teachers["runs/tiny-arith-lm"])}
    summary = run(load_recipe(data), tmp_path / path.stem, progress=False)
    lines = [json.loads(x) for x in (tmp_path / path.stem / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["split"] == "train"]
    chance = 1 / 10  # digits
    method_cls = METHODS.get(data["method"]["name"]).obj
    if getattr(method_cls, "policy_gradient", False):
        # a policy-gradient loss has no reason to fall: with advantages centred per group its value hovers around 0
        # whatever the policy does. What must hold: finite losses, rewards in [0, 1], and a learning signal that
        # reached the policy (some group with unequal rewards: non-zero advantages and a non-zero loss)
        monitors = [r["monitors"] for r in lines if r["split"] == "train"]
        assert len(losses) >= 2 and all(map(math.isfinite, losses)), f"training loss is not finite: {losses}"
        assert all(0.0 <= m["reward"] <= 1.0 for m in monitors), monitors
        assert any(m["adv_abs"] > 0 for m in monitors) and any(x != 0 for x in losses), monitors
        assert summary["kind"] == "language" and math.isfinite(summary["test"]["perplexity"])
        return
    if method_cls.self_supervised:
        # no classifier and no labels: a self-distillation loss need not fall (DINO's sharpening target moves),
        # so it must be finite and move, and the frozen representation must carry the classes (linear probe)
        assert len(losses) >= 2 and all(map(math.isfinite, losses)), f"training loss is not finite: {losses}"
        assert losses[-1] != losses[0], f"training loss did not change: {losses}"
        assert summary["kind"] == "representation"
    else:
        assert len(losses) >= 2 and losses[-1] < losses[0], f"training loss did not go down: {losses}"
    if summary.get("kind") == "language":  # the student follows the teacher's next token on held-out text
        assert summary["test"]["agreement"] > 0.5 and summary["test"]["perplexity"] < summary["teacher"]["vocab_size"]
        return
    assert summary["test"]["accuracy"] > 1.5 * chance  # self-supervised: the linear probe's test accuracy
