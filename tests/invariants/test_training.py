"""Invariants of the loop: resume == uninterrupted, accumulation == bigger batch, atomic checkpoints,
non-finite losses stop the run without losing the last good checkpoint, seeds make runs reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from alambic.data import bundle_from_arrays, make_loader
from alambic.errors import NonFiniteLossError
from alambic.methods.ce import CrossEntropy
from alambic.models import MLP
from alambic.recipe import load_recipe
from alambic.recipe.schema import TrainSpec
from alambic.run import run
from alambic.train import Trainer
from alambic.train import state as st
from tests.conftest import KillAt, PoisonAt, tiny_recipe


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def kd_recipe(teacher_run, **train):
    return load_recipe(tiny_recipe(
        data={"name": "digits", "labeled_fraction": 0.3},
        student={"arch": "mlp", "hidden": [16], "dropout": 0.1},  # dropout: the RNG state must resume too
        teacher={"run": str(teacher_run)},
        method={"name": "fitnet", "student_tap": "body.act0", "teacher_tap": "body.act0", "hint_epochs": 1},
        train={"epochs": 3, "batch_size": 64, "lr": 0.01, "log_every": 2, "warmup_epochs": 0.5, **train},
    ))


# 1168 training images / 64 = 19 steps per epoch: checkpoints at epoch ends (19, 38) and every k steps
@pytest.mark.parametrize("checkpoint_every, kill_step, last_checkpoint", [(0, 23, 19), (4, 30, 28)])
def test_resume_after_a_kill_is_bit_identical(tmp_path, teacher_run, checkpoint_every, kill_step, last_checkpoint):
    recipe = kd_recipe(teacher_run, checkpoint_every=checkpoint_every)
    run(recipe, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "killed", progress=False, callbacks=[KillAt(kill_step)])
    assert not (tmp_path / "killed" / "student.safetensors").exists()
    summary = run(recipe, tmp_path / "killed", resume=True, progress=False)
    assert summary["train"]["resumed_from_step"] == last_checkpoint
    assert_bit_identical(weights(tmp_path / "straight"), weights(tmp_path / "killed"))
    # the metrics of the redone steps are not duplicated
    steps = [r["step"] for r in map(json.loads, (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == sorted(set(steps))


def test_resume_refuses_a_changed_recipe_and_a_fresh_run_refuses_a_used_directory(tmp_path):
    recipe = load_recipe(tiny_recipe())
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "r", progress=False, callbacks=[KillAt(3)])
    from alambic.errors import RunDirError

    with pytest.raises(RunDirError, match="unfinished run: pass --resume"):
        run(recipe, tmp_path / "r", progress=False)
    changed = load_recipe(tiny_recipe(), ["train.lr=0.5"])
    with pytest.raises(RunDirError, match=r"differs from .* at train.lr \(0.01 -> 0.5\)"):
        run(changed, tmp_path / "r", resume=True, progress=False)


def test_gradient_accumulation_equals_the_larger_batch():
    torch.manual_seed(0)
    x, y = torch.randn(96, 6), torch.randint(0, 3, (96,))
    data = bundle_from_arrays(x, y, val_fraction=0.1, test_fraction=0.1)
    results = []
    for accum in (1, 4):
        torch.manual_seed(1)
        model = MLP(6, [8], 3)
        cfg = TrainSpec(epochs=2, batch_size=16, grad_accum=accum, lr=0.05, optimizer="sgd", log_every=100)
        loader = make_loader(data.train, cfg.batch_size, seed=0)
        Trainer(model, CrossEntropy(), loader, cfg, progress=False).fit()
        results.append(model.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[0]["head.weight"], MLP(6, [8], 3).head.weight)  # it did train


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    a = run(load_recipe(tiny_recipe()), tmp_path / "a", progress=False)
    run(load_recipe(tiny_recipe()), tmp_path / "b", progress=False)
    run(load_recipe(tiny_recipe(), ["seed=1"]), tmp_path / "c", progress=False)
    assert_bit_identical(weights(tmp_path / "a"), weights(tmp_path / "b"))
    assert not torch.equal(weights(tmp_path / "a")["head.weight"], weights(tmp_path / "c")["head.weight"])
    assert 0.0 <= a["test"]["accuracy"] <= 1.0


def test_interrupted_checkpoint_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.safetensors"
    st.atomic_save({"w": torch.ones(3)}, {"step": 1}, path)

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\x00" * 7)  # a torn write
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        st.atomic_save({"w": torch.zeros(3)}, {"step": 2}, path)
    tensors, meta = st.load(path)
    assert meta == {"step": 1} and torch.equal(tensors["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.safetensors"]  # no temp file left behind


def test_a_leftover_temp_file_from_a_kill_does_not_block_resume(tmp_path):
    recipe = load_recipe(tiny_recipe())
    run(recipe, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "r", progress=False, callbacks=[KillAt(20)])
    (tmp_path / "r" / ".checkpoint.safetensors.tmp-99999").write_bytes(b"garbage")  # SIGKILL mid-write
    run(recipe, tmp_path / "r", resume=True, progress=False)
    assert_bit_identical(weights(tmp_path / "straight"), weights(tmp_path / "r"))


def test_a_damaged_checkpoint_is_named(tmp_path):
    from alambic.errors import AlambicError

    bad = tmp_path / "checkpoint.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(AlambicError, match=f"checkpoint {bad} is unreadable"):
        st.load(bad)


def test_non_finite_loss_stops_with_step_and_term_and_keeps_last_checkpoint(tmp_path):
    recipe = load_recipe(tiny_recipe(), ["train.checkpoint_every=3"])
    with pytest.raises(NonFiniteLossError) as info:
        run(recipe, tmp_path / "r", progress=False, callbacks=[PoisonAt(4)])
    assert str(info.value).startswith("non-finite loss at step 5: term 'ce' = nan")
    _, meta = st.load(tmp_path / "r" / "checkpoint.safetensors")
    assert meta["step"] == 3
    tensors, _ = st.load(tmp_path / "r" / "checkpoint.safetensors")
    assert torch.isfinite(tensors["student.head.weight"]).all()


def test_a_torch_dataset_trains_exactly_like_the_same_in_memory_split():
    """Any ``torch.utils.data.Dataset`` plugs into the loop through ``make_loader`` (the Python API path)."""
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    x, y = torch.randn(80, 5), torch.randint(0, 3, (80,))
    data = bundle_from_arrays(x, y, val_fraction=0.1, test_fraction=0.1)
    cfg = TrainSpec(epochs=2, batch_size=16, lr=0.05, log_every=100)
    finals = []
    for loader in (make_loader(data.train, 16, seed=3),
                   make_loader(TensorDataset(data.train.x, data.train.y), 16, seed=3)):
        torch.manual_seed(1)
        model = MLP(5, [8], 3)
        Trainer(model, CrossEntropy(), loader, cfg, progress=False).fit()
        finals.append(model.state_dict())
    for k in finals[0]:
        assert torch.equal(finals[0][k], finals[1][k]), k


def test_method_schedules_reach_ctx_per_step_and_setup_sees_the_data_sizes():
    import numpy as np

    from alambic.data.batch import INPUT
    from alambic.methods.base import Method, MethodOutput

    seen: list[float] = []

    class Recorder(Method):
        def setup(self, student, teacher, info):
            self.info = info

        def schedules(self, info):
            return {"w": np.arange(info.total_steps) * 10.0}

        def forward(self, student, teacher, batch, ctx):
            seen.append(ctx.values["w"])
            logits = student[INPUT].logits
            return MethodOutput(logits.pow(2).mean(), {}, logits)

    x, y = torch.randn(50, 4), torch.randint(0, 3, (50,))
    data = bundle_from_arrays(x, y, val_fraction=0.2, test_fraction=0.2)
    method = Recorder()
    trainer = Trainer(MLP(4, [5], 3), method, make_loader(data.train, 8), TrainSpec(epochs=2, batch_size=8),
                      progress=False)
    trainer.fit()
    assert method.info.num_classes == 3 and method.info.num_samples == int(data.train.index.max()) + 1
    assert seen == [10.0 * i for i in range(trainer.total_steps)]


def test_train_steps_sets_the_exact_budget_and_resumes_exactly(tmp_path):
    """``train.steps`` gives every method the same number of optimizer steps, whatever its data."""
    recipe = load_recipe(tiny_recipe(), ["train.steps=30", "train.checkpoint_every=7"])  # 19 steps/epoch
    a = run(recipe, tmp_path / "a", progress=False)
    assert a["train"]["steps"] == 30 and a["train"]["epochs"] == 2
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "b", progress=False, callbacks=[KillAt(29)])
    before = st.load(tmp_path / "b" / "checkpoint.safetensors")[1]["wall_time_s"]
    b = run(recipe, tmp_path / "b", resume=True, progress=False)
    assert b["train"]["steps"] == 30 and b["train"]["resumed_from_step"] == 28
    assert b["train"]["wall_time_s"] > before > 0  # the whole run's training time, not its last piece
    assert_bit_identical(weights(tmp_path / "a"), weights(tmp_path / "b"))


@pytest.mark.parametrize("method", [{"name": "pskd"}, {"name": "dkd", "warmup_epochs": 0.5}])
def test_epoch_based_schedules_follow_a_step_budget(tmp_path, teacher_run, method):
    """Methods whose schedules are written per epoch still get one value per step under train.steps."""
    extra = {"teacher": {"run": str(teacher_run)}} if method["name"] == "dkd" else {}
    recipe = load_recipe(tiny_recipe(method=method, **extra), ["train.steps=25"])  # 19 steps/epoch
    summary = run(recipe, tmp_path / "r", progress=False)
    assert summary["train"]["steps"] == 25


def test_composed_batches_accumulate_exactly_and_resume_bit_identically(tmp_path, teacher_run):
    """With ``train.labeled_per_batch`` the labelled rows are spread evenly through the batch, so each
    accumulation chunk holds an equal share and a loss averaged over the labelled rows accumulates to
    exactly the one-batch mean; a killed run resumes into the same composed batches."""
    from alambic.data.batch import INPUT
    from alambic.losses.divergence import masked_cross_entropy
    from alambic.methods.base import Method, MethodOutput

    class SemiCE(Method):  # CE on the labelled rows + an entropy term on every row
        uses_unlabeled = True

        def forward(self, student, teacher, batch, ctx):
            logits = student[INPUT].logits
            ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
            return MethodOutput(masked_cross_entropy(logits, batch.target) + 0.1 * ent, {}, logits)

    torch.manual_seed(0)
    x, y = torch.randn(105, 6), torch.randint(0, 3, (105,))
    data = bundle_from_arrays(x, y, val_fraction=0.1, test_fraction=0.1, labeled_fraction=0.3)
    assert int((~data.train.labeled).sum()) == 60  # 5 whole batches of 12 unlabelled + 4 labelled
    results = []
    for accum in (1, 4):
        torch.manual_seed(1)
        model = MLP(6, [8], 3)
        cfg = TrainSpec(epochs=2, batch_size=16, grad_accum=accum, lr=0.05, optimizer="sgd", log_every=100)
        loader = make_loader(data.train, cfg.batch_size, seed=0, labeled_per_batch=4)
        Trainer(model, SemiCE(), loader, cfg, progress=False).fit()
        results.append(model.state_dict())
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)

    recipe = load_recipe(tiny_recipe(
        data={"name": "digits", "labeled_fraction": 0.3}, teacher={"run": str(teacher_run)},
        method={"name": "kd", "temperature": 4.0, "alpha": 0.5},
        train={"epochs": 2, "batch_size": 64, "labeled_per_batch": 16, "lr": 0.01, "checkpoint_every": 5},
    ))
    straight = run(recipe, tmp_path / "straight", progress=False)
    unlabelled = straight["train"]["train_samples"] - straight["train"]["labeled_train_samples"]
    assert straight["train"]["labeled_per_batch"] == 16
    assert straight["train"]["steps"] == 2 * -(-unlabelled // 48)  # an epoch is one pass over the unlabelled
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "killed", progress=False, callbacks=[KillAt(23)])
    assert run(recipe, tmp_path / "killed", resume=True, progress=False)["train"]["resumed_from_step"] == 20
    assert_bit_identical(weights(tmp_path / "straight"), weights(tmp_path / "killed"))


def test_uniform_batches_with_few_labels_print_a_hint_once_and_composed_ones_do_not(tmp_path, capsys, monkeypatch):
    import importlib

    run_module = importlib.import_module("alambic.run")  # alambic.run, the attribute, is the function

    monkeypatch.setattr(run_module, "_HINTED", False)
    spec = tiny_recipe(data={"name": "digits", "labeled_fraction": 0.05}, method={"name": "kd"},
                       teacher={"model": {"arch": "mlp", "hidden": [8]}}, train={"epochs": 1, "batch_size": 64})
    run(load_recipe(spec), tmp_path / "uniform", progress=False)
    assert "note: 5% of the training samples are labelled, so a uniform batch of 64 holds about 3" in capsys.readouterr().err
    run(load_recipe(spec), tmp_path / "again", progress=False)
    assert "note:" not in capsys.readouterr().err  # once per process: a bench or the quickstart runs many
    monkeypatch.setattr(run_module, "_HINTED", False)
    spec["train"]["labeled_per_batch"] = 16
    run(load_recipe(spec), tmp_path / "composed", progress=False)
    assert "note:" not in capsys.readouterr().err
