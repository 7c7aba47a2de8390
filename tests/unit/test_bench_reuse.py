"""Which finished cells ``alambic bench`` reuses: a run that differs only in options that change speed or memory,
never results, is the same cell; one that differs in anything that changes what is computed is not."""

from __future__ import annotations

import pytest

from alambic.bench import _state
from alambic.recipe import load_recipe
from alambic.run import run
from tests.conftest import tiny_recipe

BASE = {"epochs": 1, "batch_size": 64, "lr": 0.01, "log_every": 5}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, teacher_run):
    out = tmp_path_factory.mktemp("reuse") / "cell"
    run(load_recipe(recipe(teacher_run)), out, progress=False)
    return out


def recipe(teacher_run, teacher=None, **train) -> dict:
    return tiny_recipe(teacher={"run": str(teacher_run), **(teacher or {})}, method={"name": "kd"},
                       train={**BASE, **train})


@pytest.mark.parametrize("teacher, train", [
    ({}, {"gradient_checkpointing": True}),
    ({}, {"pin_memory": False}),
    ({"shard": "fsdp"}, {}),
    ({"cache": "memory"}, {}),
    ({"cache": "disk", "shard": "none"}, {"pin_memory": False, "gradient_checkpointing": True}),
])
def test_speed_and_memory_options_reuse_the_finished_cell(finished, teacher_run, teacher, train):
    status, summary, why = _state(finished, load_recipe(recipe(teacher_run, teacher, **train)))
    assert status == "ok" and summary is not None and why is None


@pytest.mark.parametrize("teacher, train, key", [
    ({}, {"lr": 0.02}, "train.lr"),
    ({}, {"precision": "bf16"}, "train.precision"),
    ({}, {"compile": True}, "train.compile"),
    ({}, {"shard": "fsdp"}, "train.shard"),
    ({}, {"device": "cpu"}, "train.device"),
    ({}, {"grad_accum": 2}, "train.grad_accum"),
])
def test_options_that_change_results_do_not(finished, teacher_run, teacher, train, key):
    status, summary, why = _state(finished, load_recipe(recipe(teacher_run, teacher, **train)))
    assert status == "stale" and summary is None and f"(at {key}" in why, why
