"""Shared fixtures: tiny data and recipes that train in well under a second."""

from __future__ import annotations

import os

import pytest
import torch

import alambic  # noqa: F401  (registers datasets, models, methods)
from alambic.data import build_data
from alambic.recipe import load_recipe
from alambic.train import Callback

torch.set_num_threads(1)
os.environ.setdefault("COLUMNS", "120")


def launch_torchrun(n: int, args: list[str], *, rerun_clears=(), **kwargs):
    """:func:`alambic.train.distributed.launch` (``torchrun --nproc-per-node n``), rerun once if a rank died of
    SIGABRT: a few times in many runs on a heavily loaded 2-core machine a rank aborted inside gloo (``terminate
    called without an active exception``) with no alambic error before it; never reproduced alone. A real
    desync fails every time, and the rerun is printed, so a flake stays visible in the log. ``rerun_clears``:
    run directories the failed attempt may have started, removed before the rerun."""
    import shutil
    import sys

    from alambic.train import distributed as dist

    kwargs.setdefault("timeout", 300)
    kwargs.setdefault("env", {**os.environ, "OMP_NUM_THREADS": "1"})
    done = dist.launch(n, args, **kwargs)
    if done.returncode != 0 and "SIGABRT" in done.stderr:
        print(f"torchrun: a rank aborted (SIGABRT); rerunning once. stderr tail:\n{done.stderr[-2000:]}",
              file=sys.stderr)
        for path in rerun_clears:
            shutil.rmtree(path, ignore_errors=True)
        done = dist.launch(n, args, **kwargs)
    return done


def tiny_recipe(**sections) -> dict:
    """A recipe dict for a fast digits run; keyword arguments replace whole sections."""
    base = {
        "name": "tiny",
        "seed": 0,
        "data": {"name": "digits"},
        "student": {"arch": "mlp", "hidden": [16]},
        "method": {"name": "ce"},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.01, "log_every": 5},
        "eval": {"latency_repeats": 3},
    }
    base.update(sections)
    return base


class KillAt(Callback):
    """A kill (KeyboardInterrupt) right after optimizer step ``step``, before anything else is written: what the
    resume tests interrupt a run with."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, logs):
        if step == self.step:
            raise KeyboardInterrupt


class PoisonAt(Callback):
    """NaN in the student's head right after optimizer step ``step``: the next loss is non-finite."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, trainer, step, logs):
        if step == self.step:
            with torch.no_grad():
                trainer.student.head.weight.fill_(float("nan"))


@pytest.fixture(scope="session")
def digits():
    return build_data(load_recipe(tiny_recipe()).data)


@pytest.fixture(scope="session")
def teacher_run(tmp_path_factory):
    """A finished (briefly trained) teacher run directory, shared by the tests that need one."""
    from alambic.run import run

    out = tmp_path_factory.mktemp("teacher") / "run"
    recipe = load_recipe(tiny_recipe(student={"arch": "mlp", "hidden": [64]}, train={"epochs": 3, "lr": 0.01}))
    run(recipe, out, progress=False)
    return out
