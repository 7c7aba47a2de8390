"""A method that deploys a wrapper (DHO's mixed heads): chosen on validation, saved, rebuilt, exported."""

from __future__ import annotations

import json

import torch
import yaml
from safetensors.torch import load_file

from alambic.recipe import load_recipe
from alambic.run import load_student, run
from tests.integration.test_tiny_recipes import TINY


def test_dho_mix_is_chosen_on_validation_and_the_rebuilt_student_predicts_identically(tmp_path, teacher_run):
    data = yaml.safe_load((TINY / "dho.yaml").read_text())
    data["teacher"] = {"run": str(teacher_run)}
    run(load_recipe(data), tmp_path / "dho", progress=False)
    meta = json.loads((tmp_path / "dho" / "student.json").read_text())
    assert meta["deploy"]["method"] == "dho" and meta["deploy"]["selected_on_val"] is True
    model, _ = load_student(tmp_path / "dho")
    saved = load_file(str(tmp_path / "dho" / "predictions.safetensors"))
    from alambic.data import build_data

    test = build_data(load_recipe(data).data).test
    with torch.no_grad():
        again = model.eval()(test.x)
    torch.testing.assert_close(again, saved["test_logits"], rtol=0, atol=1e-5)
