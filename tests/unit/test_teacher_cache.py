"""The cached teacher: served rows equal the live teacher's, changed inputs are recomputed, the disk copy
is shared and refuses a mismatched manifest, and a cached KD run equals the live one."""

from __future__ import annotations


import pytest
import torch

from alambic.data.batch import INPUT, Batch
from alambic.errors import AlambicError, RecipeError
from alambic.models import SmallCNN
from alambic.recipe import load_recipe
from alambic.run import run
from alambic.teachers import FrozenTeacher
from alambic.teachers.cached import CachedTeacher, input_keys
from tests.conftest import tiny_recipe


class Counting(FrozenTeacher):
    """A frozen teacher that counts the rows it computes."""

    rows = 0

    def outputs(self, batch, views):
        self.rows += len(batch.index) * len(views)
        return super().outputs(batch, views)


def make_teacher() -> Counting:
    torch.manual_seed(0)
    return Counting(SmallCNN(1, (8, 8), [4, 8], 10), taps=["features.block0"])


def batch_of(x: torch.Tensor, index: list[int]) -> Batch:
    return Batch(views={INPUT: x[index]}, index=torch.tensor(index))


def test_input_keys_tell_rotated_and_nudged_inputs_apart():
    x = torch.rand(3, 1, 8, 8)
    k = input_keys(x)
    assert torch.equal(k, input_keys(x.clone())) and len(set(k.tolist())) == 3
    assert (input_keys(torch.rot90(x, 1, (2, 3))) != k).all()  # same pixel sum, other key
    nudged = x.clone()
    nudged[:, 0, 3, 3] += 1 / 255
    assert ((input_keys(nudged) - k).abs() > 1e-6).all()


def test_cached_rows_equal_live_rows_and_are_computed_once():
    x = torch.rand(20, 1, 8, 8)
    live, teacher = make_teacher(), make_teacher()
    cached = CachedTeacher(teacher, num_samples=20)
    cached.use_taps(["features.block0"])
    first = cached.outputs(batch_of(x, [0, 1, 2, 3]), [INPUT])[INPUT]
    again = cached.outputs(batch_of(x, [3, 1, 5, 0]), [INPUT])[INPUT]  # 3 cached rows, 1 new
    assert teacher.rows == 5 and cached.stats()["hits"] == 3 and cached.stats()["misses"] == 5
    want = live.outputs(batch_of(x, [3, 1, 5, 0]), [INPUT])[INPUT]
    torch.testing.assert_close(again.logits, want.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(again.features["features.block0"], want.features["features.block0"],
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(again.logits[[1, 3]], first.logits[[1, 0]])  # served exactly as first computed
    assert not again.logits.requires_grad


def test_a_changed_input_under_a_known_index_is_recomputed_not_served():
    x = torch.rand(6, 1, 8, 8)
    teacher = make_teacher()
    cached = CachedTeacher(teacher, num_samples=6)
    cached.outputs(batch_of(x, [0, 1]), [INPUT])
    rotated = Batch(views={INPUT: torch.rot90(x[[0, 1]], 1, (2, 3))}, index=torch.tensor([0, 1]))
    out = cached.outputs(rotated, [INPUT])[INPUT]
    assert teacher.rows == 4
    torch.testing.assert_close(out.logits, make_teacher().outputs(rotated, [INPUT])[INPUT].logits)
    with pytest.raises(AlambicError, match="sample index 9 is beyond the 6 samples"):
        cached.outputs(batch_of(torch.rand(10, 1, 8, 8), [9]), [INPUT])


def test_views_other_than_the_input_run_live():
    x = torch.rand(4, 1, 8, 8)
    teacher = make_teacher()
    cached = CachedTeacher(teacher, num_samples=4)
    b = Batch(views={INPUT: x, "strong": x.flip(-1)}, index=torch.arange(4))
    for _ in range(2):
        out = cached.outputs(b, ["strong", INPUT])
    assert list(out) == ["strong", INPUT] and teacher.rows == 4 + 4 + 4  # input once, "strong" twice


def test_disk_cache_is_shared_and_refuses_a_mismatched_manifest(tmp_path):
    x = torch.rand(8, 1, 8, 8)
    a = CachedTeacher(make_teacher(), 8, tmp_path, data_fingerprint="d1")
    out = a.outputs(batch_of(x, list(range(8))), [INPUT])[INPUT]
    file = a.file
    a.close()
    assert file.stat().st_mode & 0o777 == 0o644  # readable by every run that shares it
    teacher = make_teacher()
    b = CachedTeacher(teacher, 8, tmp_path, data_fingerprint="d1")
    again = b.outputs(batch_of(x, [7, 2]), [INPUT])[INPUT]
    assert teacher.rows == 0 and torch.equal(again.logits, out.logits[[7, 2]])
    assert CachedTeacher(make_teacher(), 8, tmp_path, data_fingerprint="d2").stats()["cached_rows"] == 0
    # a file whose manifest disagrees with its name (copied by hand, another version) is refused by name
    from alambic.train.state import atomic_save, load

    tensors, meta = load(file)
    atomic_save(tensors, {**meta, "num_samples": 9}, file)
    with pytest.raises(AlambicError, match=r"teacher cache .*safetensors does not match .*num_samples"):
        CachedTeacher(make_teacher(), 8, tmp_path, data_fingerprint="d1")


def test_cache_needs_a_frozen_network_teacher():
    with pytest.raises(RecipeError, match="cache: memory needs a frozen network teacher"):
        load_recipe(tiny_recipe(teacher={"ema": {"momentum": 0.9}, "cache": "memory"}))


def test_cached_teacher_run_equals_the_live_run(tmp_path, teacher_run, monkeypatch):
    """Cached teacher == live teacher: the same KD run with and without the cache ends at the same weights
    (up to the rounding of a teacher row computed in another batch), and the second disk-cached run
    computes no teacher row for the training split."""
    from safetensors.torch import load_file

    monkeypatch.setenv("ALAMBIC_CACHE", str(tmp_path / "cache"))
    base = tiny_recipe(teacher={"run": str(teacher_run)}, method={"name": "kd", "temperature": 4.0, "alpha": 0.9},
                       train={"epochs": 3, "batch_size": 64, "lr": 0.01})
    live = run(load_recipe(base), tmp_path / "live", progress=False)
    disk = {**base, "teacher": {**base["teacher"], "cache": "disk"}}
    first = run(load_recipe(disk), tmp_path / "first", progress=False)
    second = run(load_recipe(disk), tmp_path / "second", progress=False)
    n = first["train"]["train_samples"]
    stats = first["train"]["teacher_cache"]
    assert stats["misses"] == n and stats["hits"] == 2 * n + 2 * 64 - 64  # epochs 2-3 + setup probe, - first
    assert second["train"]["teacher_cache"]["misses"] == 0
    assert "teacher_cache" not in live["train"]
    w = {k: load_file(str(tmp_path / k / "student.safetensors")) for k in ("live", "first", "second")}
    for k in w["live"]:
        torch.testing.assert_close(w["first"][k], w["live"][k], rtol=1e-4, atol=1e-5)
        assert torch.equal(w["first"][k], w["second"][k])


def test_a_tapped_cached_teacher_still_answers_after_close():
    """After training the run closes the teacher (its taps go) and then evaluates agreement on the test
    split: new rows must still be computed, as logits only."""
    x = torch.rand(8, 1, 8, 8)
    teacher = make_teacher()
    cached = CachedTeacher(teacher, num_samples=8)
    cached.use_taps(["features.block0"])
    cached.outputs(batch_of(x, [0, 1]), [INPUT])
    cached.close()
    out = cached.outputs(batch_of(x, [1, 5]), [INPUT])[INPUT]
    assert out.features == {}
    torch.testing.assert_close(out.logits, make_teacher().outputs(batch_of(x, [1, 5]), [INPUT])[INPUT].logits)


def test_a_tapped_method_runs_to_the_end_with_a_cached_teacher(tmp_path, teacher_run):
    spec = tiny_recipe(teacher={"run": str(teacher_run), "cache": "memory"},
                       method={"name": "fitnet", "student_tap": "body.act0", "teacher_tap": "body.act0"},
                       train={"epochs": 2, "batch_size": 64, "lr": 0.01})
    summary = run(load_recipe(spec), tmp_path / "r", progress=False)
    assert summary["train"]["teacher_cache"]["hits"] > 0 and 0 <= summary["test"]["agreement"] <= 1
