"""Hostile recipes and suites: binary files, huge or alias-bombed YAML, duplicate keys, numbers out of range,
non-finite floats, booleans posing as numbers. Each is refused before anything runs, fast, with one short
line naming the culprit (exit status 2 on the command line)."""

from __future__ import annotations

import math
import types
import typing

import pytest
from pydantic import BaseModel

from alambic.cli import main
from alambic.errors import RecipeError
from alambic.recipe import load_recipe
from alambic.recipe.load import MAX_LINE_CHARS
from alambic.recipe.load import MAX_RECIPE_BYTES, MAX_YAML_VALUES, read_yaml
from alambic.registry import DATASETS, METHODS, MODELS
from tests.conftest import tiny_recipe

BOMB = "\n".join(
    ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    + [f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]" for p, c in zip("abcdefgh", "bcdefghi")]
) + "\n"


def error_of(data, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(data, overrides)
    return str(info.value)


def cli_error(capsys, *argv) -> str:
    """The one stderr line of a command that must exit with status 2."""
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err[:500]
    return err.strip()


# -- the file itself ------------------------------------------------------------------------------------------


def test_binary_recipe_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "weights.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe" * 20)
    assert error_of(path).startswith(f"{path}: not a UTF-8 text file")
    assert cli_error(capsys, "validate", path).startswith(f"error: {path}: not a UTF-8 text file")


def test_oversized_recipe_is_refused_before_parsing(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text("student:\n  hidden:\n" + "    - 1\n" * (MAX_RECIPE_BYTES // 8 + 10))
    msg = cli_error(capsys, "validate", path)
    assert msg.startswith(f"error: {path}: ") and "over the limit" in msg


def test_alias_bomb_fails_fast_with_a_short_message(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    msg = cli_error(capsys, "validate", path)
    assert msg.startswith(f"error: {path}:") and "aliases" in msg and len(msg) < 300
    # the same bomb as an override value
    bomb = "&a [" + ", ".join(["1"] * 9) + "]"
    for level in "bcdefghi":
        prev = chr(ord(level) - 1)
        bomb = f"[{bomb}, " + ", ".join([f"*{prev}"] * 8) + "]"
        bomb = f"&{level} {bomb}"
    msg = error_of(tiny_recipe(), [f"student.hidden={bomb}"])
    assert "aliases" in msg and len(msg) < 300


def test_recursive_alias_and_deep_nesting_are_one_line(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("name: &a [*a]\n")
    assert error_of(loop).startswith(f"{loop}:1: invalid YAML: an alias refers to a value that contains it")
    deep = tmp_path / "deep.yaml"  # libyaml's composer recurses: 100000 levels crashed the interpreter
    deep.write_text("name: " + "[" * 100_000 + "]" * 100_000 + "\n")
    msg = error_of(deep)  # ours at 64 levels, or libyaml's own limit where its scanner reads ahead and meets it first
    assert msg.startswith(f"{deep}:1") and "invalid YAML:" in msg and "\n" not in msg
    assert "nested deeper than 64 levels" in msg or "exceeded maximum nesting depth" in msg


def test_a_file_of_too_many_values_is_refused_fast(tmp_path):
    path = tmp_path / "many.yaml"
    path.write_text("student: {hidden: [" + "1, " * (MAX_RECIPE_BYTES // 3 - 20) + "]}\n")
    assert error_of(path) == f"{path}:1: holds more than {MAX_YAML_VALUES} values: refused"


def test_an_ordinary_anchor_and_merge_still_work(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text("a: &base {k: 1, j: 2}\nb: {<<: *base, k: 3}\nc: *base\n")
    assert read_yaml(path) == {"a": {"k": 1, "j": 2}, "b": {"k": 3, "j": 2}, "c": {"k": 1, "j": 2}}
    assert MAX_YAML_VALUES >= 10_000


def test_duplicate_keys_are_named_with_their_lines(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("train: {epochs: 3}\nmethod: {name: ce}\ntrain: {lr: 0.1}\n")
    msg = error_of(path)
    assert msg.startswith(f"{path}:3:") and "duplicate key 'train'" in msg and "line 1" in msg
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.2\n")
    assert "duplicate key 'lr'" in cli_error(capsys, "validate", nested)


# -- numbers --------------------------------------------------------------------------------------------------


def test_seeds_are_bounded_to_what_the_generators_take():
    assert error_of(tiny_recipe(seed=2**64)).startswith("seed: ")
    assert error_of(tiny_recipe(seed=-1)).startswith("seed: ")
    assert error_of(tiny_recipe(data={"name": "digits", "split_seed": 2**64})).startswith("data.split_seed: ")
    assert load_recipe(tiny_recipe(seed=2**63 - 1)).seed == 2**63 - 1


def test_huge_integers_anywhere_are_refused():
    msg = error_of(tiny_recipe(), ["train.epochs=" + "9" * 400])
    assert msg.startswith("train.epochs: ") and len(msg) < 300


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.lr=.nan", "data.val_fraction=.nan",
                                      "eval.knn_temperature=.inf", "student.dropout=.nan",
                                      "train.clip_grad_norm=.inf"])
def test_non_finite_numbers_are_refused(override):
    key = override.split("=")[0]
    assert error_of(tiny_recipe(), [override]).startswith(f"{key}: must be a finite number")


def test_non_finite_inside_a_teacher_and_a_method():
    msg = error_of(tiny_recipe(method={"name": "kd", "temperature": math.inf}, teacher={"model": {"arch": "mlp"}}))
    assert msg.startswith("method.temperature: must be a finite number")
    msg = error_of(tiny_recipe(method={"name": "kd"}, teacher={"model": {"arch": "mlp", "dropout": math.nan}}))
    assert msg.startswith("teacher.model.dropout: must be a finite number")


@pytest.mark.parametrize("override", ["train.batch_size=true", "train.lr=true", "train.steps=false",
                                      "train.step_epochs=[1, true]", "seed=true", "eval.probe_every=false"])
def test_booleans_are_not_numbers(override):
    key = override.split("=")[0]
    assert error_of(tiny_recipe(), [override]).startswith(f"{key}")
    assert "boolean" in error_of(tiny_recipe(), [override])


def test_booleans_where_booleans_belong_still_work():
    assert load_recipe(tiny_recipe(), ["eval.linear_probe=false"]).eval.linear_probe is False


def test_cli_line_for_inf_learning_rate(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("train: {lr: .inf}\n")
    assert cli_error(capsys, "validate", path).startswith("error: train.lr: must be a finite number")


def _fields(config: type[BaseModel], kinds: tuple[type, ...]) -> list[str]:
    out = []
    for name, field in config.model_fields.items():
        ann = field.annotation
        while typing.get_origin(ann) is typing.Annotated:
            ann = typing.get_args(ann)[0]
        args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
        if any(a in kinds for a in args) and bool not in args:
            out.append(field.alias or name)
    return out


def test_every_registered_config_refuses_nan_and_booleans():
    """Every float option of every method, model and dataset refuses nan; every int option refuses true."""
    seen_float = seen_int = 0
    for registry, section, key in ((METHODS, "method", "name"), (MODELS, "student", "arch"),
                                   (DATASETS, "data", "name")):
        for entry in registry:
            for field in _fields(entry.config, (float,)):
                msg = error_of(tiny_recipe(**{section: {key: entry.name, field: math.nan}}))
                assert f"{section}.{field}: must be a finite number" in msg, (entry.name, msg)
                seen_float += 1
            for field in _fields(entry.config, (int,)):
                msg = error_of(tiny_recipe(**{section: {key: entry.name, field: True}}))
                assert f"{section}.{field}: must be a number, not a boolean" in msg, (entry.name, msg)
                seen_int += 1
    assert seen_float > 30 and seen_int > 10


def test_long_values_are_cut_short_in_errors():
    msg = error_of(tiny_recipe(), [f"train.optimizer={'x' * 100_000}"])
    assert msg.startswith("train.optimizer: ") and len(msg) < 300
    msg = error_of(tiny_recipe(method={"name": "y" * 100_000}))
    # the line is capped (the known-method list, which grows with every method, may be cut) and the hostile name
    # is echoed short
    assert msg.startswith("method.name: unknown method") and len(msg) <= MAX_LINE_CHARS and msg.count("y") < 150


# -- bench suites ---------------------------------------------------------------------------------------------


def test_binary_suite_and_file_as_out_are_one_line(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_bytes(b"\xff\xd8\xff\xe0" * 50)
    assert cli_error(capsys, "bench", suite, "--out", tmp_path / "b").startswith(
        f"error: {suite}: not a UTF-8 text file")
    good = tmp_path / "good.yaml"
    good.write_text("name: s\nbase: {train: {epochs: 1}}\nmethods: {ce: {method: {name: ce}}}\nseeds: 1\n")
    taken = tmp_path / "taken"
    taken.write_text("a file")
    msg = cli_error(capsys, "bench", good, "--out", taken)
    assert str(taken) in msg and "not a directory" in msg
    assert cli_error(capsys, "bench", good, "--out", taken / "sub").startswith("error: bench: --out")
    assert taken.read_text() == "a file"


def test_suite_numbers_are_checked_like_a_recipe(tmp_path):
    from alambic.bench import load_suite

    suite = {"name": "s", "methods": {"ce": {}}}
    for key, value, msg in (("workers", True, "workers: must be a number, not a boolean"),
                            ("seeds", [0, 2**64], "seeds.1: must fit in 64 bits"),
                            ("base", {"train": {"lr": math.inf}}, "base.train.lr: must be a finite number")):
        with pytest.raises(RecipeError, match=msg):
            load_suite({**suite, key: value})


def test_suite_duplicate_keys_and_bombs(tmp_path, capsys):
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: s\nmethods: {ce: {}}\nname: t\n")
    assert "duplicate key 'name'" in cli_error(capsys, "bench", suite, "--out", tmp_path / "b")
    suite.write_text(BOMB.replace("a:", "name:", 1))
    assert "aliases" in cli_error(capsys, "bench", suite, "--out", tmp_path / "b")


# -- a teacher brought from Python ----------------------------------------------------------------------------


def test_a_kd_recipe_without_teacher_loads_for_a_python_teacher(tmp_path, capsys):
    from alambic.run import run

    recipe = load_recipe(tiny_recipe(method={"name": "kd"}))  # the teacher comes from Python
    assert recipe.teacher is None
    with pytest.raises(RecipeError, match="method 'kd' needs a teacher: add a teacher section to the recipe, "
                                          "or pass teacher= to alambic.run"):
        run(recipe, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    path = tmp_path / "kd.yaml"
    path.write_text("method: {name: kd}\n")
    assert cli_error(capsys, "validate", path).startswith("error: method.name: 'kd' needs a teacher")
    assert cli_error(capsys, "run", path, "--out", tmp_path / "r2").startswith("error: method 'kd' needs a teacher")
    assert not (tmp_path / "r2").exists()


def test_bench_still_refuses_a_cell_without_teacher_before_training(tmp_path):
    from alambic.bench import bench

    suite = {"name": "s", "base": tiny_recipe(), "methods": {"kd": {"method": {"name": "kd"}}}, "seeds": 1}
    with pytest.raises(RecipeError, match="needs a teacher"):
        bench(suite, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_python_data_must_fit_the_teacher_run(tmp_path, teacher_run):
    import numpy as np

    from alambic.data import bundle_from_arrays
    from alambic.errors import ShapeMismatchError
    from alambic.run import run

    rng = np.random.default_rng(0)
    data = bundle_from_arrays(rng.random((60, 64)), np.arange(60) % 3)
    recipe = load_recipe(tiny_recipe(method={"name": "kd"}, teacher={"run": str(teacher_run)}))
    with pytest.raises(ShapeMismatchError, match="10 classes.*3 classes"):
        run(recipe, tmp_path / "run", progress=False, data=data)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_configs_built_in_python_refuse_non_finite_numbers_too(value):
    """The recipe loader scans for nan/inf before pydantic; a config built in Python skips the loader, so every
    options class refuses them itself (a temperature of inf validated and gave NaN losses)."""
    from pydantic import ValidationError

    from alambic.distill_data.dm import DMConfig
    from alambic.methods.kd import KDConfig
    from alambic.models.zoo import MLPConfig

    for build in (lambda: KDConfig(temperature=value), lambda: MLPConfig(dropout=value),
                  lambda: DMConfig(lr=value)):
        with pytest.raises(ValidationError, match="finite number"):
            build()
