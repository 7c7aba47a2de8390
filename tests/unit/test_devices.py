"""train.device and teacher.device: where a run computes is not what it computes.

On this CPU-only machine: an explicit ``device: cpu`` trains bit-identically to the default (auto -> cpu); a
checkpoint written under one device string resumes under another; an absent CUDA device is one line; teacher
outputs are moved and upcast without losing their structure. What only a GPU run can confirm (a CUDA
checkpoint resumed on the CPU, a teacher on another GPU, NCCL) is run by benchmarks/gpu_check.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from alambic.errors import AlambicError
from alambic.recipe import load_recipe
from alambic.run import run
from alambic.teachers.base import ModelOutput
from alambic.train.devices import float_outputs, move_outputs, resolve_device
from tests.conftest import KillAt, tiny_recipe


def _weights(d):
    return load_file(str(d / "student.safetensors"))


def test_explicit_cpu_equals_the_default_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto -> cpu on any machine
    run(load_recipe(tiny_recipe()), tmp_path / "auto", progress=False)
    run(load_recipe(tiny_recipe(), ["train.device=cpu"]), tmp_path / "cpu", progress=False)
    a, b = _weights(tmp_path / "auto"), _weights(tmp_path / "cpu")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_resumes_under_another_device_string(tmp_path, monkeypatch):
    """Written with device: cpu, resumed with device: auto (the recipe check ignores devices): the same weights."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    spec = tiny_recipe(student={"arch": "mlp", "hidden": [16], "dropout": 0.1})
    run(load_recipe(spec, ["train.checkpoint_every=4"]), tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(spec, ["train.checkpoint_every=4", "train.device=cpu"]), tmp_path / "moved", progress=False,
            callbacks=[KillAt(10)])
    summary = run(load_recipe(spec, ["train.checkpoint_every=4", "train.device=auto"]), tmp_path / "moved",
                  resume=True, progress=False)
    assert summary["train"]["resumed_from_step"] == 8
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "moved")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AlambicError, match=r"train.device: cuda:1 was asked for but this machine has no usable CUDA"
                                           r" device .*: use train.device=cpu or auto") as info:
        resolve_device("cuda:1")
    assert "\n" not in str(info.value)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")


def test_a_bad_device_string_is_refused_by_the_recipe():
    with pytest.raises(AlambicError, match="train.device"):
        load_recipe(tiny_recipe(train={"device": "gpu0"}))


def test_outputs_keep_their_structure_when_moved_and_upcast():
    half = torch.randn(3, 4).bfloat16()
    member = ModelOutput(half, {"f": half})
    out = {"input": ModelOutput(half, {"f": half, "i": torch.arange(3)}, [member])}
    moved = move_outputs(out, torch.device("cpu"))
    assert moved["input"].logits is half and moved["input"].members[0].features["f"] is half
    up = float_outputs(out)["input"]
    assert up.logits.dtype == up.features["f"].dtype == up.members[0].logits.dtype == torch.float32
    assert up.features["i"].dtype == torch.int64
    assert move_outputs(None, torch.device("cpu")) is None
