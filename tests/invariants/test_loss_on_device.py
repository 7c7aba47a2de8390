"""On an accelerator the loop keeps each step's loss on the device and reads it on the host only where it needs
it (a metric line, a checkpoint, an epoch's end, callbacks), so it does not wait for the device every step.

A CPU reads every step (free there); these tests turn the deferral on for the CPU (``SYNC_FREE = ()``), so the
path an accelerator takes runs here: the metric lines are the same values (exactly: the same floats summed in
the same order), the weights the same, and a non-finite loss still stops the run naming the first bad step and
its term, after a finished checkpoint that is kept, finite, and never overwritten by a later one.
"""

from __future__ import annotations

import json

import pytest
import torch

from alambic.data import bundle_from_arrays, make_loader
from alambic.errors import NonFiniteLossError
from alambic.methods.base import MethodOutput
from alambic.methods.ce import CrossEntropy
from alambic.models import MLP
from alambic.recipe import load_recipe
from alambic.recipe.schema import TrainSpec
from alambic.run import run
from alambic.train import loop
from alambic.train import state as st
from tests.conftest import tiny_recipe


def metric_lines(run_dir) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in rows]  # the one timing


def test_deferred_reads_log_the_same_values_and_train_the_same_weights(tmp_path, teacher_run, monkeypatch):
    recipe = tiny_recipe(teacher={"run": str(teacher_run)}, method={"name": "kd"},
                         train={"epochs": 2, "batch_size": 64, "lr": 0.01, "log_every": 4, "checkpoint_every": 7})
    run(load_recipe(recipe), tmp_path / "every", progress=False)
    monkeypatch.setattr(loop, "SYNC_FREE", ())
    run(load_recipe(recipe), tmp_path / "deferred", progress=False)
    assert metric_lines(tmp_path / "every") == metric_lines(tmp_path / "deferred")
    a = st.load(tmp_path / "every" / "checkpoint.safetensors")[0]
    b = st.load(tmp_path / "deferred" / "checkpoint.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("student."))


class NanAt(CrossEntropy):
    """Cross-entropy whose loss (and term) is NaN at optimizer step ``bad`` (1-based), without a callback."""

    def __init__(self, bad: int):
        super().__init__()
        self.bad = bad

    def forward(self, student, teacher, batch, ctx) -> MethodOutput:
        out = super().forward(student, teacher, batch, ctx)
        if ctx.step + 1 == self.bad:
            out = MethodOutput(out.loss * float("nan"), {"ce": out.terms["ce"] * float("nan")}, out.logits)
        return out


@pytest.mark.parametrize("deferred, raised_in", [(False, 7), (True, 9)])
def test_a_non_finite_loss_still_stops_at_its_step_and_keeps_the_last_good_checkpoint(
        tmp_path, monkeypatch, deferred, raised_in):
    if deferred:
        monkeypatch.setattr(loop, "SYNC_FREE", ())
    torch.manual_seed(0)
    data = bundle_from_arrays(torch.randn(400, 6), torch.randint(0, 3, (400,)), val_fraction=0.1, test_fraction=0.1)
    # 20 steps per epoch; metric lines every 5 steps, checkpoints every 3: step 7 goes bad, the host reads it
    # at once (every step read) or at step 9 (its checkpoint), before anything is written
    cfg = TrainSpec(epochs=1, batch_size=16, lr=0.05, log_every=5, checkpoint_every=3)
    trainer = loop.Trainer(MLP(6, [8], 3), NanAt(7), make_loader(data.train, 16, seed=0), cfg, run_dir=tmp_path,
                           progress=False)
    with pytest.raises(NonFiniteLossError) as info:
        trainer.fit()
    assert str(info.value).startswith("non-finite loss at step 7: term 'ce' = nan")
    assert info.value.checkpoint_step == 6 and "last good checkpoint (step 6)" in str(info.value)
    assert trainer.step == raised_in - 1  # the steps completed when it was raised: deferred by 2 steps
    tensors, meta = st.load(tmp_path / "checkpoint.safetensors")
    assert meta["step"] == 6 and all(torch.isfinite(v).all() for k, v in tensors.items() if k.startswith("student."))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [5] and all(r["loss"] == r["loss"] for r in lines)  # no NaN line


def test_host_floats_reads_tensors_and_numbers_as_float_would():
    values = [torch.tensor(0.1), 2.5, torch.tensor(1 / 3, dtype=torch.float64), torch.tensor(float("nan")), 3]
    got = loop.host_floats(values)
    want = [float(v) for v in values]
    assert got[:3] == want[:3] and got[4] == want[4] and got[3] != got[3]
