"""A checkpoint resumes only into the run that wrote it, as it was written: a flipped bit, malformed or
out-of-range metadata, or a teacher swapped under the same path is refused with one line naming the file;
a full disk keeps the previous checkpoint, which resumes to the uninterrupted weights; a non-finite loss
says truthfully whether a checkpoint exists."""

from __future__ import annotations

import errno
import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from alambic.errors import AlambicError, NonFiniteLossError
from alambic.export import export_safetensors
from alambic.models import MLP
from alambic.recipe import load_recipe
from alambic.run import run
from alambic.train import state as st
from tests.conftest import KillAt, PoisonAt, tiny_recipe


def flip_byte(path, tensor: str, offset: int = 0, mask: int = 0x40) -> None:
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    start = json.loads(raw[8:8 + n])[tensor]["data_offsets"][0]
    raw[8 + n + start + offset] ^= mask
    path.write_bytes(bytes(raw))


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


RECIPE = tiny_recipe(train={"epochs": 2, "batch_size": 64, "lr": 0.01, "log_every": 5, "checkpoint_every": 4})


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run's weights, and a run killed at step 10 (last checkpoint: step 8)."""
    root = tmp_path_factory.mktemp("ckpt")
    recipe = load_recipe(RECIPE)
    run(recipe, root / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, root / "killed", progress=False, callbacks=[KillAt(10)])
    return weights(root / "straight"), root / "killed"


def killed_copy(straight, tmp_path):
    out = tmp_path / "r"
    shutil.copytree(straight[1], out)
    return out, out / "checkpoint.safetensors"


def resume_error(run_dir) -> str:
    with pytest.raises(AlambicError) as info:
        run(load_recipe(RECIPE), run_dir, resume=True, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and str(run_dir / "checkpoint.safetensors") in msg, msg
    return msg


def test_a_bit_flipped_checkpoint_is_refused_on_resume(straight, tmp_path):
    run_dir, ckpt = killed_copy(straight, tmp_path)
    flip_byte(ckpt, "student.head.weight", offset=3, mask=0x10)  # an exponent bit: off by ~1e35
    msg = resume_error(run_dir)
    assert "student.head.weight" in msg and "damaged" in msg


def test_edited_checkpoint_metadata_is_refused_on_resume(straight, tmp_path):
    run_dir, ckpt = killed_copy(straight, tmp_path)
    raw = ckpt.read_bytes()
    assert raw.count(b'\\"step\\": 8,') == 1
    ckpt.write_bytes(raw.replace(b'\\"step\\": 8,', b'\\"step\\": 9,'))  # same length: the header still parses
    assert "metadata" in resume_error(run_dir)


def _set(meta, keys, value):
    *path, last = keys
    for k in path:
        meta = meta[k]
    if value is KeyError:
        del meta[last]
    else:
        meta[last] = value


# mutations of a checkpoint written with a valid digest (a buggy writer, a hand edit that re-signed it):
# the metadata must still make sense for this run
@pytest.mark.parametrize("keys, value, problem", [
    (["step"], -5, r"step -5"),
    (["step"], 1000, r"step 1000"),
    (["step"], "8x", r"step"),
    (["pos"], 99, r"pos"),
    (["pos"], -1, r"pos"),
    (["epoch"], 7, r"epoch"),
    (["rng"], KeyError, r"'rng'"),
    (["rng", "numpy"], [1, 2], r"rng"),
    (["rng", "python"], "x", r"rng"),
    (["optim", "param_groups"], [], r"parameter groups"),
    (["optim", "scalars"], KeyError, r"'optim.scalars'"),
    (["optim", "scalars", "0.step"], "eight", r"optim"),
    (["wall_time_s"], "soon", r"wall_time_s"),
])
def test_malformed_checkpoint_metadata_is_one_line_naming_file_and_problem(straight, tmp_path, keys, value, problem):
    run_dir, ckpt = killed_copy(straight, tmp_path)
    tensors, meta = st.load(ckpt)
    _set(meta, keys, value)
    st.atomic_save(tensors, meta, ckpt)
    msg = resume_error(run_dir)
    assert re.search(problem, msg), msg


@pytest.mark.parametrize("change", ["unexpected key", "missing key", "shape", "optimizer tensor", "rng tensor"])
def test_checkpoint_tensors_that_do_not_fit_the_run_are_one_line(straight, tmp_path, change):
    run_dir, ckpt = killed_copy(straight, tmp_path)
    tensors, meta = st.load(ckpt)
    if change == "unexpected key":
        tensors["student.extra.weight"] = torch.zeros(2)
    elif change == "missing key":
        del tensors["student.head.bias"]
    elif change == "shape":
        tensors["student.head.weight"] = torch.zeros(3, 3)
    elif change == "optimizer tensor":
        tensors["optim.0.exp_avg"] = torch.zeros(5)
    else:
        tensors["rng.torch"] = torch.zeros(3)
    st.atomic_save(tensors, meta, ckpt)
    msg = resume_error(run_dir)
    assert {"unexpected key": "student.extra.weight", "missing key": "student.head.bias",
            "shape": "head.weight", "optimizer tensor": "optim", "rng tensor": "rng"}[change] in msg


def test_a_checkpoint_from_an_older_version_without_a_digest_still_resumes(straight, tmp_path):
    run_dir, ckpt = killed_copy(straight, tmp_path)
    tensors, meta = st.load(ckpt)
    save_file(tensors, str(ckpt), metadata={st.META_KEY: json.dumps(meta)})  # the old header: no digest
    run(load_recipe(RECIPE), run_dir, resume=True, progress=False)
    assert_bit_identical(straight[0], weights(run_dir))


def test_a_full_disk_keeps_the_previous_checkpoint_which_resumes_exactly(straight, tmp_path, monkeypatch):
    recipe = load_recipe(RECIPE)
    real, calls = st.save_file, []

    def fills_up(tensors, filename, metadata=None):
        calls.append(filename)
        real(tensors, filename, metadata=metadata)
        if len(calls) == 3:  # the checkpoint of step 12: torn, then ENOSPC
            with open(filename, "r+b") as fh:
                fh.truncate(100)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(st, "save_file", fills_up)
    ckpt = tmp_path / "r" / "checkpoint.safetensors"
    with pytest.raises(AlambicError) as info:
        run(recipe, tmp_path / "r", progress=False)
    assert str(info.value) == (f"could not write checkpoint {ckpt}: No space left on device; "
                               "the previous checkpoint is intact")
    monkeypatch.setattr(st, "save_file", real)
    assert st.load(ckpt)[1]["step"] == 8
    summary = run(recipe, tmp_path / "r", resume=True, progress=False)
    assert summary["train"]["resumed_from_step"] == 8
    assert_bit_identical(straight[0], weights(tmp_path / "r"))


def test_resume_refuses_a_teacher_swapped_under_the_same_path(tmp_path, teacher_run):
    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_run, teacher)
    recipe = load_recipe(tiny_recipe(teacher={"run": str(teacher)}, method={"name": "kd"},
                                     train={"epochs": 2, "batch_size": 64, "lr": 0.01, "checkpoint_every": 4}))
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "r", progress=False, callbacks=[KillAt(6)])
    # another teacher of the same architecture replaces the first between the kill and --resume
    w = load_file(str(teacher / "student.safetensors"))
    torch.manual_seed(1)
    other = MLP(64, [64], 10)
    assert other.state_dict().keys() == w.keys()
    import safetensors

    with safetensors.safe_open(str(teacher / "student.safetensors"), "pt") as f:
        header = {k: v for k, v in f.metadata().items() if k in ("format", "alambic")}
    export_safetensors(other, teacher / "student.safetensors", metadata={"alambic": header["alambic"]})
    with pytest.raises(AlambicError) as info:
        run(recipe, tmp_path / "r", resume=True, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "r" / "checkpoint.safetensors") in msg and "FrozenTeacher" in msg
    assert len(set(re.findall(r"\b[0-9a-f]{16}\b", msg))) == 2, msg  # both fingerprints


def test_non_finite_loss_says_whether_a_checkpoint_exists(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        run(load_recipe(tiny_recipe()), tmp_path / "none", progress=False, callbacks=[PoisonAt(4)])
    msg = str(info.value)
    assert msg.startswith("non-finite loss at step 5: term 'ce' = nan")
    assert "no checkpoint was written yet" in msg and "last good checkpoint" not in msg
    assert not (tmp_path / "none" / "checkpoint.safetensors").exists()
    with pytest.raises(NonFiniteLossError) as info:
        run(load_recipe(tiny_recipe(), ["train.checkpoint_every=3"]), tmp_path / "some", progress=False,
            callbacks=[PoisonAt(4)])
    kept = tmp_path / "some" / "checkpoint.safetensors"
    assert f"the last good checkpoint (step 3) is kept in {kept}" in str(info.value)
