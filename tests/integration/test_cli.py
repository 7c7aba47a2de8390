"""The ``alambic`` command end to end, as a user runs it (subprocesses, exit codes, files)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny"


def alambic(*args, check_rc: int | None = 0, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run([sys.executable, "-m", "alambic", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or ROOT, env=env, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr + proc.stdout
    return proc


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "teacher"
    alambic("run", TINY / "ce.yaml", "--out", out, "--quiet", "student.hidden=[64]", "train.epochs=3")
    return out


def test_run_writes_a_complete_run_directory(tmp_path, teacher_dir):
    out = tmp_path / "kd"
    proc = alambic("run", TINY / "kd.yaml", "--out", out, "--quiet", f"teacher.run={teacher_dir}", "method.alpha=0.5")
    assert "student" in proc.stdout and "teacher" in proc.stdout
    for name in ("recipe.yaml", "metrics.jsonl", "summary.json", "report.md", "student.safetensors",
                 "student.json", "predictions.safetensors", "plots/learning_curves.png", "plots/reliability.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert 0.3 < summary["test"]["accuracy"] <= 1.0
    assert summary["teacher"]["params"] > summary["student"]["params"]
    assert "alpha: 0.5" in (out / "recipe.yaml").read_text()  # the override is recorded
    assert summary["train"]["labeled_train_samples"] < summary["train"]["train_samples"]


def test_validate_and_bad_recipes_exit_2_with_one_line_and_no_traceback(tmp_path):
    ok = alambic("validate", TINY / "ce.yaml")
    assert ok.stdout.startswith("ok: ")
    bad = alambic("validate", TINY / "ce.yaml", "method.name=kdd", check_rc=2)
    assert bad.stderr.startswith("error: method.name: unknown method 'kdd'")
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
    neg = alambic("run", TINY / "ce.yaml", "--out", tmp_path / "x", "train.lr=-1", check_rc=2)
    assert neg.stderr.strip() == "error: train.lr: must be greater than 0, got -1"
    assert not (tmp_path / "x").exists()  # nothing is created for a recipe that does not validate
    missing = alambic("run", tmp_path / "nope.yaml", "--out", tmp_path / "y", check_rc=2)
    assert missing.stderr.strip() == f"error: recipe file not found: {tmp_path / 'nope.yaml'}"


def test_existing_run_directory_is_never_overwritten(tmp_path, teacher_dir):
    before = load_file(str(teacher_dir / "student.safetensors"))
    proc = alambic("run", TINY / "ce.yaml", "--out", teacher_dir, "--quiet", check_rc=1)
    assert "already holds a finished run" in proc.stderr and "Traceback" not in proc.stderr
    after = load_file(str(teacher_dir / "student.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_shape_mismatch_between_taps_names_both_shapes(tmp_path):
    cnn_teacher = tmp_path / "cnn-teacher"
    alambic("run", TINY / "ce.yaml", "--out", cnn_teacher, "--quiet", "student.arch=cnn", "student.channels=[4, 8]",
            "student.hidden=null", check_rc=2)  # hidden is not a cnn option: a clear error, not a crash
    alambic("run", TINY / "ce.yaml", "--out", cnn_teacher, "--quiet", "student={arch: cnn, channels: [4, 8]}",
            "train.epochs=1")
    ok = alambic("run", TINY / "fitnet_cnn.yaml", "--out", tmp_path / "ok", "--quiet", f"teacher.run={cnn_teacher}")
    assert "student" in ok.stdout
    # a student map smaller than the teacher's hint: no regressor can map it
    bad = alambic("run", TINY / "fitnet_cnn.yaml", "--out", tmp_path / "bad", "--quiet", f"teacher.run={cnn_teacher}",
                  "method.student_tap=features.block1", "method.teacher_tap=features.block0", check_rc=1)
    assert "(32, 8, 2, 2)" in bad.stderr and "(32, 4, 4, 4)" in bad.stderr


def test_methods_listing_shows_papers():
    out = alambic("methods").stdout
    for name in ("ce", "kd", "label_free_kd", "fitnet", "1503.02531", "1412.6550", "2103.05959"):
        assert name in out


def test_report_and_export(tmp_path, teacher_dir):
    (teacher_dir / "report.md").unlink()
    alambic("report", teacher_dir)
    assert "accuracy" in (teacher_dir / "report.md").read_text().lower()
    st = alambic("export", teacher_dir, "--format", "safetensors", "--out", tmp_path / "w.safetensors")
    assert "wrote" in st.stdout
    exported, original = load_file(str(tmp_path / "w.safetensors")), load_file(str(teacher_dir / "student.safetensors"))
    assert all(torch.equal(exported[k], original[k]) for k in original)
    pytest.importorskip("onnxruntime")
    onnx = alambic("export", teacher_dir, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx").stat().st_size > 1000 and "wrote" in onnx.stdout
    missing = alambic("export", tmp_path, "--format", "onnx", check_rc=1)
    assert missing.stderr.startswith("error: ") and "student.json" in missing.stderr


@pytest.mark.slow
def test_sigkill_at_a_random_moment_then_resume_matches_an_uninterrupted_run(tmp_path):
    args = [TINY / "ce.yaml", "--quiet", "train.epochs=12", "train.checkpoint_every=5", "student.dropout=0.1"]
    alambic("run", *args[:1], "--out", tmp_path / "straight", *args[1:])
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "alambic", "run", str(args[0]), "--out", str(tmp_path / "killed"),
                             *map(str, args[1:])], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "killed" / "checkpoint.safetensors"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)  # somewhere in the middle of training, possibly mid-write
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (tmp_path / "killed" / "summary.json").exists():
        pytest.skip("the run finished before the kill on this machine")
    alambic("run", *args[:1], "--out", tmp_path / "killed", "--resume", *args[1:])
    a = load_file(str(tmp_path / "straight" / "student.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_quickstart_reuses_finished_runs_and_names_a_stale_directory(tmp_path):
    from alambic.errors import RunDirError
    from alambic.quickstart import quickstart

    short = ["train.steps=20"]  # every run, the teacher's included, shortened to 20 steps
    first = quickstart(tmp_path / "qs", seeds=2, progress=False, overrides=short)
    ce, kd = first["models"]["student-ce"], first["models"]["student-kd"]
    assert ce["seeds"] == kd["seeds"] == 2 and ce["params"] == kd["params"] < first["models"]["teacher"]["params"]
    again = quickstart(tmp_path / "qs", seeds=2, progress=False, overrides=short)  # all finished: nothing retrains
    assert again["models"] == first["models"]
    recipe = tmp_path / "qs" / "student-ce-seed0" / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace("lr: 0.003", "lr: 0.004"))
    with pytest.raises(RunDirError, match=r"another version of the quickstart: delete .* or pass --out DIR"):
        quickstart(tmp_path / "qs", seeds=2, progress=False, overrides=short)


def test_quickstart_recipes_pit_a_cnn_teacher_against_students_on_the_same_budget():
    import yaml

    from alambic.quickstart import recipe_path

    # read as written (load_recipe would want student-kd's teacher run to exist already)
    teacher, ce, kd = (yaml.safe_load(recipe_path(n).read_text()) for n in ("teacher", "student-ce", "student-kd"))
    assert teacher["student"]["arch"] == "cnn" and teacher["data"]["labeled_fraction"] == 1.0
    assert ce["data"] == kd["data"] and kd["data"]["labeled_fraction"] == 0.1
    assert ce["student"] == kd["student"] and ce["train"] == kd["train"] and "steps" in ce["train"]  # same budget
    assert (ce["method"]["name"], kd["method"]["name"]) == ("ce", "kd")


def test_cache_lists_each_kind_and_clears_only_what_is_named(tmp_path, monkeypatch, capsys):
    from alambic.cli import main as cli

    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path))
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "a.safetensors").write_bytes(b"x" * 2048)
    (tmp_path / "glyphs").mkdir()
    (tmp_path / "glyphs" / "g.npz").write_bytes(b"y" * 10)
    assert cli(["cache"]) == 0
    listing = capsys.readouterr().out
    assert "teachers" in listing and "glyphs" in listing and "probes" in listing
    assert cli(["cache", "--clear", "teachers"]) == 0
    assert "cleared teachers: 1 files" in capsys.readouterr().out
    assert not (tmp_path / "teachers").exists() and (tmp_path / "glyphs" / "g.npz").is_file()
    assert cli(["cache", "--clear", "nope"]) == 2
    assert "unknown cache kind(s) ['nope']" in capsys.readouterr().out
    assert cli(["cache", "--clear"]) == 0 and not (tmp_path / "glyphs").exists()


def test_the_quickstart_does_not_print_the_composed_batch_hint(tmp_path, capsys, monkeypatch):
    """Composed batches did not help the quickstart's students on validation: its demo must not advise them."""
    import sys

    from alambic.quickstart import quickstart

    monkeypatch.setattr(sys.modules["alambic.run"], "_HINTED", False)
    quickstart(tmp_path / "qs", seeds=1, progress=False, overrides=["train.steps=5"])
    assert "labeled_per_batch" not in capsys.readouterr().err
