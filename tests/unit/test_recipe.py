"""Recipes: strict validation, one-line errors naming the key path, overrides, resolved output."""

from __future__ import annotations

import pytest
import yaml

from alambic.errors import RecipeError
from alambic.recipe import apply_override, load_recipe
from tests.conftest import tiny_recipe


def error_of(data, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(data, overrides)
    return str(info.value)


def test_defaults_validate_and_options_are_typed():
    r = load_recipe(tiny_recipe(method={"name": "kd", "temperature": 2}, teacher={"model": {"arch": "mlp"}}) | {})
    assert r.method.options.temperature == 2.0 and r.method.options.alpha == 0.9


def test_out_of_range_value_names_key_path_and_value():
    msg = error_of(tiny_recipe(method={"name": "ce"}), ["train.lr=-1"])
    assert msg == "train.lr: must be greater than 0, got -1"


def test_method_option_error_has_full_path():
    msg = error_of(tiny_recipe(method={"name": "label_free_kd", "temperature": -1}, teacher={"model": {"arch": "mlp"}}))
    assert msg.splitlines()[0] == "method.temperature: must be greater than 0, got -1"


def test_unknown_keys_are_errors_everywhere():
    assert error_of(tiny_recipe(), ["train.epochz=3"]) == "train.epochz: unknown key"
    assert error_of(tiny_recipe(method={"name": "ce", "temprature": 2})) == "method.temprature: unknown key"
    assert error_of(tiny_recipe(student={"arch": "mlp", "hiden": [3]})) == "student.hiden: unknown key"
    assert error_of({"sneaky": 1}) == "sneaky: unknown key"


def test_wrong_type_is_named():
    assert error_of(tiny_recipe(), ["train.epochs=many"]).startswith("train.epochs: must be a valid integer")


def test_unknown_registry_names_list_the_known_ones():
    msg = error_of(tiny_recipe(method={"name": "kdd"}))
    assert msg.startswith("method.name: unknown method 'kdd' (closest: kd, ") and "dkd" in msg and "; known: at, " in msg
    assert error_of(tiny_recipe(data={"name": "cifar"})).startswith("data.name: unknown dataset 'cifar'")
    assert error_of(tiny_recipe(student={"arch": "resnet999"})).startswith("student.arch: unknown model 'resnet999'")


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.npz"
    msg = error_of(tiny_recipe(data={"name": "npz", "path": str(missing)}))
    assert msg == f"data.path: file not found: {missing}"
    msg = error_of(tiny_recipe(method={"name": "kd"}, teacher={"run": str(tmp_path / "t")}))
    assert msg.startswith("teacher.run: ") and "not a finished alambic run" in msg


def test_method_needing_a_teacher_without_one():
    """Valid (a Python caller may bring the teacher: alambic.run(..., teacher=)); the run refuses it without."""
    from alambic.recipe import missing_teacher

    recipe = load_recipe(tiny_recipe(method={"name": "kd"}))
    assert missing_teacher(recipe, python=False) == "method.name: 'kd' needs a teacher, but the recipe has no teacher section"
    assert missing_teacher(load_recipe(tiny_recipe())) is None


def test_teacher_needs_exactly_one_source():
    msg = error_of(tiny_recipe(method={"name": "kd"}, teacher={}))
    assert msg.startswith("teacher: give exactly one of run, model, estimator")


def test_cross_field_checks():
    assert "divisible by grad_accum" in error_of(tiny_recipe(), ["train.batch_size=10", "train.grad_accum=3"])
    assert "val_fraction + test_fraction" in error_of(tiny_recipe(), ["data.val_fraction=0.5", "data.test_fraction=0.5"])


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1\nmethod: ce\n")
    msg = error_of(bad)
    assert msg.startswith(f"{bad}:") and "invalid YAML" in msg
    assert error_of(tmp_path / "absent.yaml") == f"recipe file not found: {tmp_path / 'absent.yaml'}"
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    assert "must be a mapping" in error_of(listy)


def test_overrides_parse_yaml_values_and_build_sections():
    data = {}
    apply_override(data, "student.hidden=[8, 4]")
    apply_override(data, "train.lr=1e-3")
    apply_override(data, "name=x")
    assert data == {"student": {"hidden": [8, 4]}, "train": {"lr": 1e-3}, "name": "x"}
    with pytest.raises(RecipeError, match="expected key.path=value"):
        apply_override(data, "train.lr")
    with pytest.raises(RecipeError, match="name is not a section"):
        apply_override(data, "name.sub=1")


def test_resolved_recipe_round_trips_with_every_default():
    r = load_recipe(tiny_recipe(method={"name": "kd"}, teacher={"model": {"arch": "mlp"}}), ["method.alpha=0.5"])
    resolved = r.resolved()
    assert {k: resolved["method"][k] for k in ("name", "temperature", "alpha")} == {"name": "kd", "temperature": 4.0, "alpha": 0.5}
    assert set(resolved["method"]) == {"name", *type(r.method.options).model_fields}  # every option recorded
    assert resolved["student"]["dropout"] == 0.0  # the model's default is recorded too
    again = load_recipe(yaml.safe_load(yaml.safe_dump(resolved)))
    assert again.resolved() == resolved


def test_every_recipe_in_the_repository_validates():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    files = sorted(root.glob("recipes/**/*.yaml")) + sorted(root.glob("alambic/recipes/**/*.yaml"))
    assert len(files) >= 5
    for path in files:
        data = yaml.safe_load(path.read_text())
        if "distill" in data:  # a data-distillation recipe (alambic distill-data), not a run's
            from alambic.distill_data import load_distill_recipe

            try:
                load_distill_recipe(data, files=False)
            except Exception as exc:
                raise AssertionError(f"{path}: {exc}") from None
            continue
        # recipes point at teacher runs made earlier: validate their shape, not their presence
        if "run" in data.get("teacher", {}):
            data["teacher"] = {"model": {"arch": "mlp"}}
        data["teachers"] = [{"model": {"arch": "mlp"}} if "run" in t else t for t in data.get("teachers") or []] or None
        if data["teachers"] is None:
            del data["teachers"]
        try:
            load_recipe(data)
        except Exception as exc:
            raise AssertionError(f"{path}: {exc}") from None


def test_a_run_saved_before_an_option_existed_still_matches_its_recipe():
    """--resume and alambic bench compare a run's saved recipe with the current one: an option added
    since, at its default, must not make the old run look like another recipe; a real change must."""
    from alambic.recipe.load import validate
    from alambic.run import first_difference, resolved_again

    with pytest.raises(RecipeError, match="not a finished alambic run"):
        validate({"method": {"name": "kd"}, "teacher": {"run": "runs/t"}})
    current = validate({"method": {"name": "kd"}, "teacher": {"run": "runs/t"}}, files=False).resolved()
    saved = {k: v for k, v in current.items()}
    saved["eval"] = {k: v for k, v in current["eval"].items() if k != "probe_every"}  # written by an older alambic
    assert first_difference(saved, current) == "eval.probe_every"
    assert first_difference(resolved_again(saved), current) is None
    saved["train"] = {**current["train"], "lr": 0.5}
    assert first_difference(resolved_again(saved), current).startswith("train.lr")


def test_every_registry_lookup_puts_the_closest_names_first():
    from alambic.distill_data import DATA_DISTILLERS, load_distill_recipe
    from alambic.registry import METHODS

    with pytest.raises(KeyError, match=r"unknown method 'kdd' \(closest: kd, .*; known: "):
        METHODS.get("kdd")
    assert METHODS.known(None).startswith("known: ")  # nothing to compare: the plain list
    assert DATA_DISTILLERS.known("krr-st").startswith("closest: krr_st")
    with pytest.raises(RecipeError, match=r"distill\.method: unknown .* 'krr-st' \(closest: krr_st"):
        load_distill_recipe({"name": "x", "data": {"name": "digits"}, "network": {"arch": "mlp"},
                             "distill": {"method": "krr-st"}})
