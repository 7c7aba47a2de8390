"""``alambic distill-data`` end to end: the tiny recipes make sets, a killed distillation resumes to the same set,
bad input is one line, and a run trains a student on a set (``data.distilled``, ``teacher.distilled``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from alambic.cli import main
from alambic.distill_data import distill_data, load_distill_recipe, load_set
from alambic.errors import IntegrityError, RunDirError
from alambic.recipe import load_recipe
from alambic.run import run

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "distill_data"
RECIPES = sorted(TINY.glob("*.yaml"))


@pytest.fixture(scope="module")
def byol_teacher(tmp_path_factory) -> Path:
    """A briefly trained self-supervised (BYOL) teacher run: its representation is the recorded `pool` tap."""
    out = tmp_path_factory.mktemp("dd-teacher") / "byol"
    data = yaml.safe_load((TINY.parent / "byol.yaml").read_text())
    data["train"] = {**data["train"], "epochs": 1}
    data["eval"] = {**data.get("eval", {}), "probe_every": 0, "linear_probe": False}
    run(load_recipe(data), out, progress=False)
    return out


def tiny(name: str, teacher: Path, **distill) -> dict:
    data = yaml.safe_load((TINY / f"{name}.yaml").read_text())
    data["teacher"] = {"run": str(teacher)}
    data["distill"] = {**data["distill"], **distill}
    return data


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_tiny_distillation_recipes_make_a_set(path, byol_teacher, tmp_path):
    recipe = load_distill_recipe(tiny(path.stem, byol_teacher))
    manifest = distill_data(recipe, tmp_path / "set", progress=False)
    s = load_set(tmp_path / "set")
    assert len(s) == 20 and manifest["size"] == 20 and s.images.shape[1:] == (1, 8, 8)
    assert s.targets is not None and s.targets.shape == (20, 32)  # the BYOL teacher's pooled representation
    assert (s.labels is None) == (path.stem == "krr_st")
    if s.labels is not None:
        assert torch.bincount(s.labels).tolist() == [2] * 10
    assert manifest["teacher"]["feature"] == "pool" and not (tmp_path / "set" / "checkpoint.safetensors").exists()


@pytest.mark.parametrize("name", ["krr_st", "dm"])
def test_a_killed_distillation_resumes_to_the_same_set(name, byol_teacher, tmp_path):
    recipe = load_distill_recipe(tiny(name, byol_teacher, steps=7), ["checkpoint_every=2"])
    distill_data(recipe, tmp_path / "whole", progress=False)

    def kill(step, logs):
        if step == 4:  # after the 5th step; the last checkpoint holds 4
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill_data(recipe, tmp_path / "cut", progress=False, on_step=kill)
    assert (tmp_path / "cut" / "checkpoint.safetensors").is_file() and not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(RunDirError, match="unfinished distillation: pass --resume"):
        distill_data(recipe, tmp_path / "cut", progress=False)
    manifest = distill_data(recipe, tmp_path / "cut", resume=True, progress=False)
    assert manifest["resumed_from_step"] == 4
    a, b = load_set(tmp_path / "whole"), load_set(tmp_path / "cut")
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_cli_distills_refuses_bad_input_in_one_line_and_reuses_a_finished_set(byol_teacher, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny("random", byol_teacher)))
    assert main(["distill-data", str(recipe), "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert "20 labelled images by random" in capsys.readouterr().out
    assert main(["distill-data", str(recipe), "--out", str(tmp_path / "s"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a finished distilled set" in err[0]
    assert main(["distill-data", str(recipe), "--out", str(tmp_path / "s"), "--quiet", "--resume"]) == 0
    for bad, words in ((["distill.images_per_class=500"], "images_per_class 500, but class"),
                       (["distill.method=kmeans"], "distill.method: unknown data distillation method 'kmeans'"),
                       (["distill.steps=3"], "distill.steps: unknown key"),
                       (["teacher.run=/nowhere"], "teacher.run: /nowhere is not a finished alambic run")):
        code = main(["distill-data", str(recipe), "--out", str(tmp_path / "bad"), "--quiet", *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert code != 0 and len(err) == 1 and words in err[0], err
    # a distillation that failed before its first checkpoint leaves only its recipe: the folder is reused
    assert main(["distill-data", str(recipe), "--out", str(tmp_path / "bad"), "--quiet"]) == 0


def test_students_train_on_a_set_and_a_damaged_set_is_refused(byol_teacher, tmp_path):
    distill_data(load_distill_recipe(tiny("krr_st", byol_teacher, steps=5)), tmp_path / "krr", progress=False)
    distill_data(load_distill_recipe(tiny("herding", byol_teacher)), tmp_path / "herd", progress=False)
    base = {"student": {"arch": "cnn", "channels": [8, 16]}, "eval": {"latency_repeats": 1, "probe_every": 0},
            "train": {"steps": 30, "batch_size": 64, "lr": 0.01, "checkpoint_every": 100, "eval_every": 100}}
    krr = str(tmp_path / "krr")
    summary = run(load_recipe({**base, "data": {"name": "digits", "distilled": krr},
                               "teacher": {"distilled": krr}, "method": {"name": "regress"}}),
                  tmp_path / "regress", progress=False)
    assert summary["kind"] == "representation" and summary["train"]["train_samples"] == 20
    assert summary["test"]["linear_accuracy"] > 0.5  # probed on the real training split (1,168 images), not the set
    summary = run(load_recipe({**base, "data": {"name": "digits", "distilled": str(tmp_path / "herd")},
                               "method": {"name": "ce"}}), tmp_path / "ce", progress=False)
    assert summary["train"]["train_samples"] == 20 and summary["test"]["accuracy"] > 0.3
    lines = [json.loads(x) for x in (tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["split"] == "val" for r in lines)  # validation on the real split
    path = tmp_path / "herd" / "set.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="damaged"):
        run(load_recipe({**base, "data": {"name": "digits", "distilled": str(tmp_path / "herd")},
                         "method": {"name": "ce"}}), tmp_path / "ce2", progress=False)
