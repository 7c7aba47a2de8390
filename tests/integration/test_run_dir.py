"""The run directory's lifecycle: finished only when everything is on disk, atomic files, one process at a
time, clear errors for an unusable --out, and resumes that finish what an interrupted run left undone."""

from __future__ import annotations

import errno
import importlib
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import alambic.report
import alambic.report.markdown
from alambic.cli import main
from alambic.errors import RunDirError, WriteError
from alambic.recipe import load_recipe
from alambic.run import is_finished, run
from tests.conftest import KillAt, tiny_recipe

run_module = importlib.import_module("alambic.run")  # the module: `alambic.run` is also the function

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "recipes" / "tiny"
PROMISED = ("recipe.yaml", "metrics.jsonl", "summary.json", "report.md", "student.safetensors", "student.json",
            "predictions.safetensors", "plots/learning_curves.png", "plots/reliability.png")


def kd_recipe(teacher_run, *overrides):
    return load_recipe(tiny_recipe(teacher={"run": str(teacher_run)}, method={"name": "kd", "temperature": 2.0},
                                   train={"epochs": 1, "batch_size": 64, "lr": 0.01, "log_every": 5}), list(overrides))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_results(a: Path, b: Path) -> None:
    """Two run directories hold the same student, predictions and evaluation (timings aside)."""
    for name in ("student.safetensors", "predictions.safetensors"):
        ta, tb = tensors(a / name), tensors(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for key in ("test", "val", "teacher", "data_fingerprint"):
        untimed = [{k: v for k, v in (s[key] or {}).items() if k != "latency_ms"} if isinstance(s[key], dict)
                   else s[key] for s in (sa, sb)]
        assert untimed[0] == untimed[1], key
    assert sa["train"]["steps"] == sb["train"]["steps"]
    assert json.loads((a / "student.json").read_text()) == json.loads((b / "student.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher_run):
    """An uninterrupted kd run, the reference of every interrupted one."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run(kd_recipe(teacher_run), out, progress=False)
    return out


# -- 1. finished means everything is on disk ---------------------------------------------------------------


def _interrupt(stage: str, monkeypatch) -> None:
    """Make the next run raise KeyboardInterrupt at ``stage`` of its finishing (training is complete by then)."""
    if stage == "after the student is written":
        real_export = run_module.export_safetensors

        def export_then_stop(*args, **kwargs):
            real_export(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(run_module, "export_safetensors", export_then_stop)
    elif stage == "after the summary is written":  # the report is rendered next
        def stop(run_dir):
            assert (Path(run_dir) / "summary.json").is_file()
            raise KeyboardInterrupt

        monkeypatch.setattr(alambic.report, "render_report", stop)
    elif stage == "while rendering the plots":
        def plot_stop(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(alambic.report.markdown, "plot_reliability", plot_stop)
    else:  # "after the report is written": everything but the marker
        real_render = alambic.report.render_report

        def render_then_stop(run_dir):
            real_render(run_dir)
            raise KeyboardInterrupt

        monkeypatch.setattr(alambic.report, "render_report", render_then_stop)


STAGES = ["after the student is written", "after the summary is written", "while rendering the plots",
          "after the report is written"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_run_interrupted_while_finishing_is_unfinished_and_resume_completes_it(tmp_path, monkeypatch, stage,
                                                                               teacher_run, straight, capsys):
    out = tmp_path / "r"
    recipe = kd_recipe(teacher_run)
    with monkeypatch.context() as m:
        _interrupt(stage, m)
        with pytest.raises(KeyboardInterrupt):
            run(recipe, out, progress=False)
    assert not is_finished(out)
    with pytest.raises(RunDirError, match="unfinished run: pass --resume"):
        run(recipe, out, progress=False)
    summary = run(recipe, out, resume=True, progress=False)
    assert is_finished(out)
    for name in PROMISED:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert_same_results(straight, out)
    assert summary == json.loads((out / "summary.json").read_text())
    # training was complete: the resume trained nothing and logged no step twice
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == sorted(set(steps))
    assert summary["train"]["resumed_from_step"] == summary["train"]["steps"]


def test_the_cli_resume_of_a_run_stopped_before_its_report_writes_the_report(tmp_path, monkeypatch, teacher_run,
                                                                           capsys):
    out = tmp_path / "r"
    args = ["run", str(TINY / "kd.yaml"), "--out", str(out), "--quiet", f"teacher.run={teacher_run}",
            "train.epochs=1"]
    with monkeypatch.context() as m:
        _interrupt("after the summary is written", m)
        assert main(args) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert not (out / "report.md").exists()
    assert main([*args, "--resume"]) == 0
    printed = capsys.readouterr().out
    assert "report.md" in printed and (out / "report.md").is_file()
    assert main([*args, "--resume"]) == 0  # a finished run: the summary again, nothing rewritten
    assert "report.md" in capsys.readouterr().out


def test_the_finished_marker_is_written_last_and_says_what_it_covers(tmp_path, teacher_run, straight):
    marker = json.loads((straight / run_module.FINISHED).read_text())
    for name in PROMISED:
        assert name in marker["files"]
    newest = max((straight / f).stat().st_mtime_ns for f in marker["files"])
    assert (straight / run_module.FINISHED).stat().st_mtime_ns >= newest
    (straight / "report.md").rename(tmp_path / "report.md")  # a promised file gone: no longer finished
    try:
        assert not is_finished(straight)
    finally:
        (tmp_path / "report.md").rename(straight / "report.md")
    assert is_finished(straight)


# -- 2. atomic writes; a damaged summary -------------------------------------------------------------------


def test_empty_files_left_by_a_crash_before_the_marker_are_rebuilt_on_resume(tmp_path, monkeypatch, teacher_run,
                                                                            straight):
    out = tmp_path / "r"
    recipe = kd_recipe(teacher_run)
    with monkeypatch.context() as m:
        _interrupt("after the report is written", m)
        with pytest.raises(KeyboardInterrupt):
            run(recipe, out, progress=False)
    for name in ("summary.json", "report.md", "student.json"):  # what a full disk left behind
        (out / name).write_text("")
    run(recipe, out, resume=True, progress=False)
    assert_same_results(straight, out)
    assert "accuracy" in (out / "report.md").read_text().lower()


def test_a_full_disk_while_writing_the_summary_leaves_no_empty_summary(tmp_path, monkeypatch, teacher_run, straight):
    out = tmp_path / "r"
    recipe = kd_recipe(teacher_run)
    real = pathlib.Path.write_text

    def disk_full(self, data, *args, **kwargs):
        if "summary.json" in self.name:
            real(self, "", *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "write_text", disk_full)
        with pytest.raises(WriteError, match=r"cannot write .*summary.json: No space left on device"):
            run(recipe, out, progress=False)
    assert not (out / "summary.json").exists() and not is_finished(out)
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []
    run(recipe, out, resume=True, progress=False)
    assert_same_results(straight, out)


def test_a_full_disk_is_one_line_in_the_cli(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"
    real = pathlib.Path.write_text

    def disk_full(self, data, *args, **kwargs):
        if "summary.json" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", disk_full)
    assert main(["run", str(TINY / "ce.yaml"), "--out", str(out), "--quiet", "train.epochs=1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "No space left on device" in err
    assert "--resume" in err


def test_a_finished_run_whose_summary_is_unreadable_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["run", str(TINY / "ce.yaml"), "--out", str(out), "--quiet", "train.epochs=1"]
    assert main(args) == 0
    capsys.readouterr()
    (out / "summary.json").write_text("{")
    assert main([*args, "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / "summary.json") in err and "Traceback" not in err


# -- 3. one process per run directory ----------------------------------------------------------------------


HOLDER = """
import sys, time
from pathlib import Path
from alambic.recipe import load_recipe
from alambic.run import run
from alambic.train.loop import Callback

class Hold(Callback):
    def on_step_end(self, trainer, step, logs):
        if step == 3:
            Path(sys.argv[2]).write_text("training")
            time.sleep(600)

run(load_recipe("recipes/tiny/ce.yaml", ["train.epochs=1"]), sys.argv[1], progress=False, callbacks=[Hold()])
"""


def test_a_second_process_on_the_same_run_directory_is_refused_until_the_first_dies(tmp_path, capsys):
    out, flag = tmp_path / "r", tmp_path / "flag"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(flag)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not flag.exists():
            assert holder.poll() is None, holder.stderr.read()
            assert time.time() < deadline, "the holder never reached step 3"
            time.sleep(0.05)
        args = ["run", str(TINY / "ce.yaml"), "--out", str(out), "--quiet", "train.epochs=1"]
        for extra in (["--resume"], []):
            assert main([*args, *extra]) == 1
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and str(out) in err and "in use" in err, err
            assert f"pid {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    # the OS released the dead holder's lock: the run resumes (from scratch: it died before a checkpoint)
    assert main(["run", str(TINY / "ce.yaml"), "--out", str(out), "--quiet", "--resume", "train.epochs=1"]) == 0
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == sorted(set(steps))


def test_the_lock_is_released_when_a_run_ends_or_fails(tmp_path):
    recipe = load_recipe(tiny_recipe(train={"epochs": 1, "batch_size": 64, "lr": 0.01}))
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "r", progress=False, callbacks=[KillAt(2)])
    run(recipe, tmp_path / "r", resume=True, progress=False)  # same process: the lock was let go
    run(recipe, tmp_path / "r", resume=True, progress=False)
    import fcntl

    with open(tmp_path / "r" / run_module.LOCK, "a") as fh:  # and nobody holds it now
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


# -- 4. an --out that cannot be a run directory ------------------------------------------------------------


def _one_line_exit_2(argv, capsys, *names) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    for name in names:
        assert str(name) in err, err
    return err


def test_an_out_that_is_a_file_or_under_a_file_is_one_line_exit_2(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    base = ["run", str(TINY / "ce.yaml"), "--quiet", "train.epochs=1"]
    _one_line_exit_2([*base, "--out", str(afile)], capsys, afile)
    _one_line_exit_2([*base, "--out", str(afile / "sub" / "run")], capsys, afile)
    _one_line_exit_2([*base, "--out", str(afile), "--resume"], capsys, afile)
    assert afile.read_text() == "not a directory"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_line_exit_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        base = ["run", str(TINY / "ce.yaml"), "--quiet", "train.epochs=1"]
        _one_line_exit_2([*base, "--out", str(ro)], capsys, ro)
        _one_line_exit_2([*base, "--out", str(ro / "run")], capsys, ro / "run")
    finally:
        ro.chmod(0o755)


def test_an_out_the_process_may_not_write_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    """The same as above for a process that root's permissions do not stop (this machine's tests run as root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def refused(path, *args, **kwargs):
        if Path(path).parent == ro or Path(path) == ro / "run":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    real_mkdir = pathlib.Path.mkdir

    def mkdir_refused(self, *args, **kwargs):
        if self.parent == ro:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(os, "open", refused)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir_refused)
    base = ["run", str(TINY / "ce.yaml"), "--quiet", "train.epochs=1"]
    _one_line_exit_2([*base, "--out", str(ro)], capsys, ro)
    _one_line_exit_2([*base, "--out", str(ro / "run")], capsys, ro / "run")
    assert list(ro.iterdir()) == []


# -- 5. a run that failed before training does not block the next ------------------------------------------


def test_a_run_that_failed_loading_its_data_does_not_block_the_next_attempt(tmp_path, capsys):
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.normal(size=(300, 8)).astype(np.float32), y=rng.integers(0, 3, 300))
    out = tmp_path / "r"
    base = ["run", str(TINY / "ce.yaml"), "--out", str(out), "--quiet", "train.epochs=1", "data.name=npz",
            f"data.path={data}"]
    assert main([*base, "data.x_key=images"]) == 1  # a wrong key: fails while loading the data
    assert "no array 'images'" in capsys.readouterr().err
    assert main(base) == 0, capsys.readouterr().err  # the fixed command, without --resume
    assert is_finished(out) and "x_key: x" in (out / "recipe.yaml").read_text()
    # and once a run has trained, the directory is its own again
    assert main([*base, "train.epochs=2"]) == 1
    assert "already holds a finished run" in capsys.readouterr().err


def test_a_failed_start_is_also_reusable_with_resume_and_another_recipe(tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((50, 4), np.float32), y=np.arange(50) % 2)
    out = tmp_path / "r"
    bad = load_recipe(tiny_recipe(data={"name": "npz", "path": str(data), "x_key": "images"}))
    with pytest.raises(Exception, match="no array 'images'"):
        run(bad, out, progress=False)
    assert (out / "recipe.yaml").exists()  # the failed start did record its recipe
    good = load_recipe(tiny_recipe(train={"epochs": 1, "batch_size": 64, "lr": 0.01}))
    run(good, out, resume=True, progress=False)  # nothing to resume: a fresh run of the other recipe
    assert is_finished(out) and "name: digits" in (out / "recipe.yaml").read_text()


# -- 6. the wall time of a resumed run ---------------------------------------------------------------------


def test_a_resumed_runs_summary_console_and_report_say_the_wall_time_covers_the_whole_run(tmp_path, capsys):
    from rich.console import Console

    from alambic.report.console import print_summary

    recipe = load_recipe(tiny_recipe(train={"epochs": 2, "batch_size": 64, "lr": 0.01}))
    once = run(recipe, tmp_path / "once", progress=False)
    assert once["train"]["wall_time_covers"] == "whole run (1 attempt)"
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "r", progress=False, callbacks=[KillAt(25)])  # after the first epoch's checkpoint
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "r", resume=True, progress=False, callbacks=[KillAt(30)])
    summary = run(recipe, tmp_path / "r", resume=True, progress=False)
    assert summary["train"]["resumed_from_step"] is not None
    assert summary["train"]["wall_time_covers"] == "whole run (3 attempts)"
    console = Console(record=True, width=200)
    print_summary(summary, tmp_path / "r", console=console)
    text = console.export_text()
    assert "whole run (3 attempts)" in text and f"resumed at step {summary['train']['resumed_from_step']}" in text
    console = Console(record=True, width=200)
    print_summary(once, tmp_path / "once", console=console)
    assert "attempt" not in console.export_text()  # nothing to explain for a run in one go
    assert "whole run (3 attempts)" in (tmp_path / "r" / "report.md").read_text()


# -- 7. the resume error names the overrides that match ----------------------------------------------------


def test_resume_with_other_overrides_names_the_overrides_that_continue_the_run(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["run", str(TINY / "ce.yaml"), "--out", str(out), "--quiet"]
    assert main([*base, "train.lr=0.05", "train.epochs=1", "student.hidden=[12, 8]"]) == 0
    capsys.readouterr()
    assert main([*base, "--resume"]) == 1  # the README's mistake: the overrides left out
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pass the same overrides again" in err and "start a new run directory" not in err
    named = err.split("pass the same overrides again (")[1].split(");")[0]
    overrides = shlex.split(named)
    assert sorted(o.split("=")[0] for o in overrides) == ["student.hidden", "train.epochs", "train.lr"]
    assert main([*base, "--resume", *overrides]) == 0  # exactly what the error named continues the run


def test_the_recipe_difference_names_the_first_key_and_overrides_that_replace_whole_sections(tmp_path):
    train = {"epochs": 1, "batch_size": 64, "lr": 0.01}
    run(load_recipe(tiny_recipe(train=train)), tmp_path / "r", progress=False)
    changed = ["method.name=kd", f"teacher.run={tmp_path / 'r'}"]
    with pytest.raises(RunDirError, match=r"at method.name \('ce' -> 'kd'\).*pass the same overrides again") as exc:
        run(load_recipe(tiny_recipe(train=train), changed), tmp_path / "r", resume=True, progress=False)
    named = shlex.split(str(exc.value).split("pass the same overrides again (")[1].split(");")[0])
    assert sorted(o.split("=")[0] for o in named) == ["method", "teacher"]  # ce has no temperature: a whole section
    again = run(load_recipe(tiny_recipe(train=train), [*changed, *named]), tmp_path / "r", resume=True, progress=False)
    assert again["method"] == "ce"


# -- 8. the Ctrl-C hint ------------------------------------------------------------------------------------


def test_ctrl_c_before_any_checkpoint_does_not_claim_one(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "build_data", interrupted)
    assert main(["run", str(TINY / "ce.yaml"), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted") and "checkpoint" not in err and "--resume" not in err


def test_ctrl_c_during_training_before_the_first_checkpoint_says_resume_starts_over(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["run", str(TINY / "ce.yaml"), "--out", str(out), "--quiet"]
    real = run_module.Trainer.fit

    def fit_then_stop(self, resume=False):
        self.callbacks.append(KillAt(2))
        return real(self, resume)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_module.Trainer, "fit", fit_then_stop)
        assert main(base) == 130
    err = capsys.readouterr().err.strip()
    assert "intact" not in err and "--resume" in err and "no checkpoint" in err


def test_ctrl_c_after_a_checkpoint_says_it_is_intact(tmp_path, capsys):
    out = tmp_path / "r"
    real = run_module.Trainer.fit

    def fit_then_stop(self, resume=False):
        self.callbacks.append(KillAt(25))
        return real(self, resume)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(run_module.Trainer, "fit", fit_then_stop)
        assert main(["run", str(TINY / "ce.yaml"), "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert "--resume" in err and f"checkpoint in {out} is intact" in err


def test_a_run_directory_from_before_the_marker_is_finished_only_when_complete(tmp_path, straight):
    """An alambic that wrote no finished.json (nor attempts.jsonl) left finished runs that stay finished, and
    the wedged ones of this issue (a report never written, an empty summary) stay unfinished."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(straight, old)
    (old / run_module.FINISHED).unlink()
    (old / run_module.ATTEMPTS).unlink()
    assert is_finished(old)
    (old / "report.md").write_text("")
    assert not is_finished(old)
    (old / "report.md").unlink()
    assert not is_finished(old)
    shutil.copy(straight / "report.md", old / "report.md")
    (old / "summary.json").write_text("")
    assert not is_finished(old)
