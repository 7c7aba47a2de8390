"""The online probe and the collapse watch: when they fire, what they record, and that they change nothing."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from alambic.models.zoo import MLP
from alambic.probe import CollapseWatch, ProbeCallback
from alambic.teachers.ema import EmaTeacher
from alambic.teachers.frozen import FrozenTeacher


class Log:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def trainer(student, teacher=None, total_steps=100, log_every=5):
    return SimpleNamespace(student=student, teacher=teacher, metrics=Log(), status={}, step=0,
                           total_steps=total_steps, cfg=SimpleNamespace(log_every=log_every))


def test_collapse_watch_warns_once_when_the_loss_sits_at_ln_k_for_a_whole_window(capsys):
    watch, t = CollapseWatch(after=0.2, threshold=0.99), trainer(None)
    for step in range(1, 20):  # before 20% of the run: never judged
        watch.on_step_end(t, step, {"monitors": {"loss_over_lnK": 1.0}})
    assert watch.warnings == []
    for step in range(20, 25):  # a window with one step below the threshold: not collapsed
        watch.on_step_end(t, step, {"monitors": {"loss_over_lnK": 0.5 if step == 22 else 1.0}})
    assert watch.warnings == []
    for step in range(25, 40):  # every step of a window at ln K: one warning, then silence
        watch.on_step_end(t, step, {"monitors": {"loss_over_lnK": 0.999}})
    assert len(watch.warnings) == 1 and "ln(K)" in watch.warnings[0] and "step 29" in watch.warnings[0]
    assert "warning:" in capsys.readouterr().err
    watch.on_step_end(t, 40, {"monitors": {}})  # a method without the monitor is never judged
    assert len(watch.warnings) == 1


def test_probe_callback_records_the_start_and_every_n_steps_for_student_and_ema_teacher(digits):
    torch.manual_seed(0)
    student = MLP(64, [16], 10).train()
    t = trainer(student, EmaTeacher(student, momentum=0.9))
    cb = ProbeCallback(digits, "body", every=3, max_train=200)
    rng = torch.get_rng_state()
    cb.on_fit_start(t, resumed=False)
    for step in range(1, 8):
        cb.on_step_end(t, step, {})
    assert [r["step"] for r in t.metrics.records] == [0, 3, 6]
    assert all(r["split"] == "probe" and "teacher" in r for r in t.metrics.records)
    assert 0.1 < t.metrics.records[0]["student"]["knn_val"] <= 1.0
    assert t.status["kNN"] == f"{t.metrics.records[-1]['student']['knn_val']:.3f}"
    assert student.training  # put back in train mode
    assert torch.equal(torch.get_rng_state(), rng)  # draws nothing from the global RNG: resume stays exact
    resumed = trainer(student)
    cb.on_fit_start(resumed, resumed=True)  # a resumed run already has its step-0 line
    assert resumed.metrics.records == []


def test_probe_callback_follows_only_teachers_that_change(digits):
    student = MLP(64, [16], 10)
    frozen = trainer(student, FrozenTeacher(copy.deepcopy(student)))
    ProbeCallback(digits, "body", every=1, max_train=100).record(frozen, 1)
    assert "teacher" not in frozen.metrics.records[0]
    with pytest.raises(Exception, match="every must be >= 1"):
        ProbeCallback(digits, "body", every=0)


def test_collapse_watch_resumes_its_window_and_warnings_from_the_checkpoint(tmp_path, capsys):
    """Killed after a checkpoint in the middle of a window and resumed, the watch warns at the same step as
    an uninterrupted run (not a window later); a warning given before a kill is kept for the summary."""
    def feed(watch, t, steps):
        for step in steps:
            t.step = step
            watch.on_step_end(t, step, {"monitors": {"loss_over_lnK": 0.5 if step <= 22 else 1.0}})

    def resume(t, at):
        watch = CollapseWatch(after=0.2, threshold=0.99)
        t.step = at
        watch.on_fit_start(t, resumed=True)
        return watch

    straight, t = CollapseWatch(after=0.2, threshold=0.99), trainer(None)
    feed(straight, t, range(1, 40))
    assert len(straight.warnings) == 1 and "step 29" in straight.warnings[0]  # window 25-29
    t = trainer(None)
    t.run_dir = tmp_path
    first = CollapseWatch(after=0.2, threshold=0.99)
    feed(first, t, range(1, 28))
    first.on_checkpoint(t, tmp_path / "checkpoint.safetensors")  # at step 27: window 25-27 half full
    second = resume(t, 27)
    feed(second, t, range(28, 32))
    assert second.warnings == straight.warnings
    second.on_checkpoint(t, tmp_path / "checkpoint.safetensors")  # at step 31, after the warning
    third = resume(t, 31)
    feed(third, t, range(32, 40))
    assert third.warnings == straight.warnings  # kept, and not given twice
    stale = resume(t, 35)  # a later checkpoint than the state file: its state is not used
    assert stale.warnings == [] and stale._window == []
    capsys.readouterr()
