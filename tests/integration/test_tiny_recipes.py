"""Every registered method trains: each has a tiny recipe that lowers its loss and beats chance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from alambic.recipe import load_recipe
from alambic.registry import METHODS
from alambic.run import run
from tests.conftest import tiny_recipe

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny"
RECIPES = sorted(p for p in TINY.glob("*.yaml"))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-teachers")
    specs = {"runs/tiny-teacher": {"arch": "mlp", "hidden": [64]},
             "runs/tiny-cnn-teacher": {"arch": "cnn", "channels": [8, 16]}}
    out = {}
    for key, student in specs.items():
        out[key] = root / Path(key).name
        run(load_recipe(tiny_recipe(student=student, train={"epochs": 3, "lr": 0.01})), out[key], progress=False)
    return out


def _point_at(spec: dict, teachers: dict[str, Path]) -> dict:
    if "run" in spec:
        if spec["run"] not in teachers:
            raise AssertionError(f"tiny recipes use runs/tiny-teacher or runs/tiny-cnn-teacher, not {spec['run']}")
        spec = {**spec, "run": str(teachers[spec["run"]])}
    return spec


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
    summary = run(load_recipe(data), tmp_path / path.stem, progress=False)
    lines = [json.loads(x) for x in (tmp_path / path.stem / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["split"] == "train"]
    assert len(losses) >= 2 and losses[-1] < losses[0], f"training loss did not go down: {losses}"
    chance = 1 / 10  # digits
    assert summary["test"]["accuracy"] > 1.5 * chance
