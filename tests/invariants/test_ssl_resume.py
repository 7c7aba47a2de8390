"""Resume == uninterrupted for self-supervised runs: multi-crop views, an EMA teacher, DINO's center and
SEED's queue all come back from the checkpoint bit for bit.

The final checkpoint holds every piece of training state (student + projection head, EMA teacher, method
buffers, optimizer, RNG), so two runs are compared there. The probes and the report that a finished run
writes afterwards are not under test and are stubbed out to keep the test fast.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from alambic.recipe import load_recipe
from alambic.run import run
from alambic.train import state as st
from tests.conftest import tiny_recipe
from tests.invariants.test_training import KillAt

# 1168 training images / 128 = 10 steps per epoch, 20 steps in all
VIEWS = {"groups": {"global": {"count": 2, "scale": [0.5, 1.0], "jitter": 0.2},
                    "local": {"count": 2, "size": 6, "scale": [0.2, 0.5]}}}
TRAIN = {"epochs": 2, "batch_size": 128, "lr": 0.003, "log_every": 3, "checkpoint_every": 4}


@pytest.fixture(autouse=True)
def no_final_probes(monkeypatch):
    run_module = importlib.import_module("alambic.run")  # `alambic.run` the attribute is the function
    monkeypatch.setattr(run_module, "finish_representation", lambda out, recipe, data, student, feature, teacher,
                        fit_info, **_: {"train": fit_info})


def dino_recipe():
    return load_recipe(tiny_recipe(
        student={"arch": "cnn", "channels": [4, 8]},
        teacher={"ema": {"momentum": 0.9, "end_momentum": 1.0}},
        views=VIEWS,
        method={"name": "dino", "out_dim": 16, "hidden": 16, "bottleneck": 8,
                "warmup_teacher_temperature": 0.02, "warmup_teacher_temperature_epochs": 1},
        train=TRAIN,
        eval={"latency_repeats": 1, "probe_every": 5},  # online probes run on both sides of the kill
    ))


def seed_recipe():
    return load_recipe(tiny_recipe(
        student={"arch": "cnn", "channels": [4]},
        teacher={"model": {"arch": "cnn", "channels": [4, 8]}},  # a frozen (random) network is enough here
        views={"groups": {"global": {"count": 1, "scale": [0.5, 1.0], "jitter": 0.2}}},
        method={"name": "seed", "queue_size": 300, "hidden": 16, "teacher_temperature": 0.05},
        train=TRAIN,
        eval={"latency_repeats": 1, "probe_every": 0},
    ))


def final_state(run_dir) -> dict[str, torch.Tensor]:
    tensors, meta = st.load(run_dir / "checkpoint.safetensors")
    assert meta["step"] == 20
    return tensors


@pytest.mark.parametrize("make, kill_step, resumed_from, prefixes", [
    (dino_recipe, 15, 12, ("student.", "teacher.", "method.center", "optim.")),
    (seed_recipe, 7, 4, ("student.", "method.queue", "method.queue_ptr", "method.queue_filled",
                         "method.projector.", "optim.")),
], ids=["dino-multicrop-ema", "seed-queue"])
def test_a_killed_self_supervised_run_resumes_bit_identically(tmp_path, make, kill_step, resumed_from, prefixes):
    recipe = make()
    straight = run(recipe, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "killed", progress=False, callbacks=[KillAt(kill_step)])
    resumed = run(recipe, tmp_path / "killed", resume=True, progress=False)
    assert straight["train"]["resumed_from_step"] is None
    assert resumed["train"]["resumed_from_step"] == resumed_from

    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert a.keys() == b.keys()
    for prefix in prefixes:  # the state this test is about is really in the checkpoint
        assert any(k.startswith(prefix) for k in a), prefix
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if make is dino_recipe:
        assert a["method.center"].abs().sum() > 0  # the center did move
        assert not torch.equal(a["teacher.head.prototypes"], a["student.head.prototypes"])  # a lagging teacher
    else:
        assert int(a["method.queue_filled"]) == 300 and 0 < int(a["method.queue_ptr"]) < 300  # it wrapped

    records = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    for split in ("train", "probe"):
        steps = [r["step"] for r in records if r["split"] == split]
        assert steps == sorted(set(steps)), split  # the redone steps are logged once
    straight_records = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    # lines whose window starts after the resume point are the same numbers
    later = lambda rs: [r["loss"] for r in rs if r["split"] == "train" and r["step"] > resumed_from + 3]  # noqa: E731
    assert later(records) == later(straight_records) and later(records)
