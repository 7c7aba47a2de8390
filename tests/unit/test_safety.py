"""Hostile and faulty run directories and resources (issue 9): a run directory is data, never code; a broken
``student.json``, an unknown deploy method, an allocation failure and an absurd thread count each end in one
line that says what to do."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch

from alambic.cli import main
from alambic.data.splits import bundle_from_arrays
from alambic.errors import AlambicError, RunDirError
from alambic.export.run import export_run
from alambic.export.weights import export_safetensors
from alambic.models.zoo import build_model
from alambic.recipe.load import model_spec, validate
from alambic.recipe.schema import TeacherSpec
from alambic.run import build_teacher, cpu_threads, load_student, run
from alambic.teachers.analytic import AnalyticTeacher
from alambic.teachers.cached import CachedTeacher

FACTORY = "alambic_marker_factory:make"


@pytest.fixture
def marker(tmp_path, monkeypatch):
    """An importable module whose import *and* call each leave a file behind: proof that code ran."""
    pkg = tmp_path / "pkgs"
    pkg.mkdir()
    flag = tmp_path / "code-ran"
    (pkg / "alambic_marker_factory.py").write_text(textwrap.dedent(f"""
        from pathlib import Path
        from torch import nn
        Path({str(flag)!r}).write_text("imported")

        def make(num_classes, input_shape):
            Path({str(flag)!r}).write_text("called")
            return nn.Sequential(nn.Flatten(), nn.Linear(4, num_classes))
    """))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delitem(__import__("sys").modules, "alambic_marker_factory", raising=False)
    return flag


def _run_dir(path, arch, *, num_classes=2, input_shape=(4,), weights=None, **extra):
    path.mkdir(parents=True, exist_ok=True)
    meta = {"arch": arch, "input_shape": list(input_shape), "num_classes": num_classes,
            "class_names": [str(i) for i in range(num_classes)], **extra}
    (path / "student.json").write_text(json.dumps(meta))
    if weights is not None:
        export_safetensors(weights, path / "student.safetensors")
    return path


def _factory_run(tmp_path):
    """A run directory whose student.json names the marker factory, with weights that fit it."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    return _run_dir(tmp_path / "received", {"arch": "module", "module": FACTORY, "kwargs": {}}, weights=net)


def _data(n=60, classes=2, features=4):
    g = torch.Generator().manual_seed(0)
    return bundle_from_arrays(torch.randn(n, features, generator=g), torch.arange(n) % classes)


# -------------------------------------------------------------------------------------- code in run dirs
def test_export_refuses_a_run_whose_student_json_names_a_factory(tmp_path, marker, capsys):
    rd = _factory_run(tmp_path)
    code = main(["export", str(rd), "--format", "safetensors"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not marker.exists()  # not even imported
    assert len(err) == 1 and "student.json" in err[0] and FACTORY in err[0] and "--trust-code" in err[0]
    with pytest.raises(RunDirError, match="trust_code=True") as info:
        export_run(rd, "safetensors")
    assert "\n" not in str(info.value) and not marker.exists()


def test_load_student_runs_a_factory_only_when_trusted(tmp_path, marker):
    rd = _factory_run(tmp_path)
    with pytest.raises(RunDirError, match=r"student\.json.*alambic_marker_factory:make"):
        load_student(rd)
    assert not marker.exists()
    model, meta = load_student(rd, trust_code=True)
    assert marker.read_text() == "called" and model(torch.zeros(1, 4)).shape == (1, 2)
    assert main(["export", str(rd), "--format", "safetensors", "--trust-code"]) == 0


@pytest.mark.parametrize("section", ["run", "transfer"])
def test_a_teacher_run_with_a_factory_needs_trust_code(tmp_path, marker, section):
    rd = _factory_run(tmp_path)
    data = _data()
    spec = {"run": rd} if section == "run" else {"transfer": {"run": rd}}
    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with pytest.raises(RunDirError, match="trust_code: true"):
        build_teacher(TeacherSpec(**spec), data, student, 10, 2)
    assert not marker.exists()
    teacher = build_teacher(TeacherSpec(**spec, trust_code=True), data, student, 10, 2)
    assert teacher is not None and marker.exists()


def test_trust_code_is_not_written_to_a_resolved_recipe_when_off():
    r = validate({"teacher": {"model": {"arch": "mlp"}}, "method": {"name": "kd"}})
    assert "trust_code" not in r.resolved()["teacher"]


def test_a_deploy_method_must_be_registered(tmp_path):
    rd = _run_dir(tmp_path / "r", {"arch": "mlp", "hidden": [8]}, deploy={"method": "os.system"})
    with pytest.raises(RunDirError, match=r"student\.json: deploy\.method 'os\.system' is not a registered method"
                       ) as info:
        load_student(rd)
    assert "\n" not in str(info.value)
    rd2 = _run_dir(tmp_path / "r2", {"arch": "mlp", "hidden": [8]}, deploy={"method": "ce"})
    with pytest.raises(RunDirError, match="student.json: deploy"):
        load_student(rd2)


# ------------------------------------------------------------------------------------- broken student.json
@pytest.mark.parametrize("content, what", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    (json.dumps({"arch": {"arch": "mlp"}, "num_classes": 2}), "input_shape"),
    (json.dumps({"arch": {"arch": "mlp"}, "input_shape": "4", "num_classes": 2}), "input_shape"),
    (json.dumps({"arch": {"arch": "mlp"}, "input_shape": [4], "num_classes": "2"}), "num_classes"),
    (json.dumps({"arch": {"arch": "mlp"}, "input_shape": [4], "num_classes": 0}), "num_classes"),
    (json.dumps({"arch": {"arch": "mlp", "hidden": "x", "nope": 1}, "input_shape": [4], "num_classes": 2}), "arch"),
    (json.dumps({"arch": "mlp", "input_shape": [4], "num_classes": 2}), "arch"),
    (json.dumps({"arch": {"arch": "mlp"}, "input_shape": [4], "num_classes": 2, "features": 3}), "features"),
])
def test_a_broken_student_json_is_one_line_naming_the_file(tmp_path, content, what, capsys):
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / "student.json").write_text(content)
    with pytest.raises(RunDirError, match=what) as info:
        export_run(rd, "safetensors")
    assert "\n" not in str(info.value) and str(rd / "student.json") in str(info.value)
    assert main(["export", str(rd)]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------- out of memory
ALLOC = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes. Error code 12"


def _failing_init(monkeypatch, exc):
    """Allocation of real (not meta) weights fails, as a model too large for memory would."""
    real = torch.nn.init.kaiming_uniform_

    def init(tensor, *a, **k):
        if tensor.device.type != "meta":
            raise exc
        return real(tensor, *a, **k)

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", init)


@pytest.mark.parametrize("exc", [RuntimeError(ALLOC), MemoryError(), torch.OutOfMemoryError("CUDA out of memory")])
def test_a_model_too_large_for_memory_says_what_and_how_large(monkeypatch, exc):
    _failing_init(monkeypatch, exc)
    spec = model_spec({"arch": "mlp", "hidden": [1000, 1000]}, "student")
    with pytest.raises(AlambicError) as info:
        build_model(spec, (64,), 10, what="student")
    msg = str(info.value)
    params = 64 * 1000 + 1000 + 1000 * 1000 + 1000 + 1000 * 10 + 10
    assert "\n" not in msg and "student" in msg and f"{params:,} parameters" in msg and "student.hidden" in msg


def test_a_batch_too_large_for_memory_names_the_step_and_batch_size(tmp_path, monkeypatch):
    from alambic.train import loop

    real, calls = loop.Trainer.train_step, []

    def step(self, batch, ctx, **kwargs):
        calls.append(ctx.step)
        if len(calls) == 2:
            raise RuntimeError(ALLOC)
        return real(self, batch, ctx, **kwargs)

    monkeypatch.setattr(loop.Trainer, "train_step", step)
    recipe = validate({"student": {"arch": "mlp", "hidden": [8]}, "train": {"epochs": 1, "batch_size": 16},
                       "eval": {"latency_repeats": 1}})
    with pytest.raises(AlambicError, match=r"out of memory at training step 2 .*train\.batch_size.*16") as info:
        run(recipe, tmp_path / "r", progress=False, data=_data())
    assert "\n" not in str(info.value)


def test_running_out_of_memory_in_the_final_evaluation_keeps_the_training_and_resume_finishes(tmp_path, monkeypatch):
    import importlib

    run_module = importlib.import_module("alambic.run")  # the package's ``run`` is the function
    real, real_fit, trained = run_module.predict, run_module.fit_within_memory, []

    def fit(*args):  # training (and its validation passes) as usual
        trained.append(real_fit(*args))
        return trained[-1]

    def predict(*args):  # the evaluation after training runs out of memory
        if trained:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args)

    monkeypatch.setattr(run_module, "fit_within_memory", fit)
    monkeypatch.setattr(run_module, "predict", predict)
    recipe = validate({"student": {"arch": "mlp", "hidden": [8]}, "train": {"epochs": 1, "batch_size": 16},
                       "eval": {"latency_repeats": 1, "batch_size": 64}})
    with pytest.raises(AlambicError, match=r"out of memory evaluating the trained student \(eval\.batch_size=64\)"
                       r".*checkpoint kept.*--resume") as info:
        run(recipe, tmp_path / "r", progress=False, data=_data())
    assert "\n" not in str(info.value)
    assert (tmp_path / "r" / "checkpoint.safetensors").exists() and not (tmp_path / "r" / "summary.json").exists()

    trained.clear()
    monkeypatch.setattr(run_module, "fit_within_memory", real_fit)
    summary = run(recipe, tmp_path / "r", resume=True, progress=False, data=_data())
    assert summary["train"]["resumed_from_step"] == summary["train"]["steps"]  # evaluated, not retrained


# ------------------------------------------------------------------------------------ estimator teachers
def test_an_estimator_teacher_can_be_cached_in_memory():
    spec = TeacherSpec(estimator="sklearn.linear_model:LogisticRegression", estimator_kwargs={"max_iter": 200},
                       cache="memory")
    data = _data()
    teacher = build_teacher(spec, data)
    assert isinstance(teacher, CachedTeacher) and isinstance(teacher.teacher, AnalyticTeacher)
    from alambic.data.batch import INPUT, Batch

    batch = Batch(views={INPUT: data.train.x[:8]}, index=data.train.index[:8], target=data.train.y[:8])
    first = teacher.outputs(batch, [INPUT])[INPUT].logits
    again = teacher.outputs(batch, [INPUT])[INPUT].logits
    assert torch.equal(first, again) and teacher.hits == 8 and teacher.misses == 8


def test_an_estimator_fingerprint_covers_its_fitted_state():
    # two forests with equal parameters but other trees (a disk cache keyed on the old fingerprint served one
    # forest's outputs for the other)
    from sklearn.ensemble import RandomForestClassifier

    x, y = np.random.default_rng(0).normal(size=(60, 4)), np.arange(60) % 2
    a = RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y)
    b = RandomForestClassifier(n_estimators=3, random_state=1).fit(x, y)
    b.random_state = 0
    assert a.get_params() == b.get_params()
    assert AnalyticTeacher(a).fingerprint() != AnalyticTeacher(b).fingerprint()
    a2 = RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y)
    assert AnalyticTeacher(a).fingerprint() == AnalyticTeacher(a2).fingerprint()


def test_an_estimator_teacher_can_be_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))
    spec = TeacherSpec(estimator="sklearn.linear_model:LogisticRegression", cache="disk")
    teacher = build_teacher(spec, _data())
    assert isinstance(teacher, CachedTeacher) and teacher.folder is not None


# ------------------------------------------------------------------------------------------------ threads
def test_threads_above_the_core_count_are_clamped_with_a_note(capsys):
    cores = os.cpu_count() or 1
    assert cpu_threads(10**6) == cores
    assert "train.threads" in capsys.readouterr().err
    assert cpu_threads(1) == 1 and capsys.readouterr().err == ""


def test_a_run_never_asks_torch_for_more_threads_than_cores(tmp_path, monkeypatch):
    asked = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (asked.append(n), real(min(n, 2)))[1])
    recipe = validate({"student": {"arch": "mlp", "hidden": [8]}, "train": {"epochs": 1, "threads": 10**6},
                       "eval": {"latency_repeats": 1}})
    run(recipe, tmp_path / "r", progress=False, data=_data())
    assert asked and max(asked) <= (os.cpu_count() or 1)


def test_born_again_trusts_only_the_factory_of_the_users_own_recipe(tmp_path):
    from alambic.born_again import generation_recipe

    own = generation_recipe({"student": {"module": FACTORY}}, 1, tmp_path)
    assert own["teacher"] == {"run": str(tmp_path / "gen0"), "trust_code": True}
    assert "trust_code" not in generation_recipe({"student": {"arch": "mlp"}}, 1, tmp_path)["teacher"]
    validate(own, files=False)


def test_probe_refuses_a_run_whose_student_json_names_a_factory(tmp_path, marker, capsys):
    rd = _factory_run(tmp_path)
    (rd / "recipe.yaml").write_text("student: {module: alambic_marker_factory:make}\n")
    code = main(["probe", str(rd), "--baselines"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not marker.exists()  # neither the student nor the baseline's rebuild ran it
    assert len(err) == 1 and "student.json" in err[0] and "--trust-code" in err[0]
