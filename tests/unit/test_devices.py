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


# -- train.pin_memory: page-locked batches, only on CUDA ------------------------------------------------------


def test_pinning_is_asked_for_iff_the_device_is_cuda():
    from alambic.train.devices import pins

    assert pins(torch.device("cuda"), True) and pins(torch.device("cuda", 1), True)
    assert not pins(torch.device("cuda"), False)
    for other in ("cpu", "mps", "meta"):
        assert not pins(torch.device(other), True)


class _FakePinning:
    """What pinning would do on a CUDA machine, on this CPU-only one: ``pinned_empty`` hands out ordinary
    tensors and remembers them, ``Tensor.is_pinned`` answers from that record, ``Tensor.pin_memory`` counts
    copies (none when the loader already gathered into "pinned" memory)."""

    def __init__(self, monkeypatch, cuda: bool):
        import alambic.data.loader as loader_mod
        import alambic.train.loop as loop_mod
        from alambic.train.devices import pins

        self.allocated: list[torch.Tensor] = []  # held: no address is reused while the test runs
        self.copies = 0
        # the Trainer's device check answers as on a CUDA device (or as on this CPU)
        monkeypatch.setattr(loop_mod, "pins", lambda device, wanted: pins(torch.device("cuda" if cuda else "cpu"),
                                                                           wanted))

        def pinned_empty(shape, dtype):
            t = torch.empty(shape, dtype=dtype)
            self.allocated.append(t)
            return t

        def pin_memory(t, *args, **kwargs):
            self.copies += 1
            return t

        monkeypatch.setattr(loader_mod, "pinned_empty", pinned_empty)
        monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t, *a, **k: any(t is p for p in self.allocated))
        monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)


def _fit(cfg_pin: bool):
    from alambic.data import bundle_from_arrays, make_loader
    from alambic.methods.ce import CrossEntropy
    from alambic.models import MLP
    from alambic.recipe.schema import TrainSpec
    from alambic.train import Trainer

    torch.manual_seed(0)
    data = bundle_from_arrays(torch.randn(60, 5), torch.randint(0, 3, (60,)), val_fraction=0.1, test_fraction=0.1)
    loader = make_loader(data.train, 16, seed=3)
    model = MLP(5, [8], 3)
    trainer = Trainer(model, CrossEntropy(), loader, TrainSpec(epochs=2, batch_size=16, lr=0.05, log_every=100,
                                                               pin_memory=cfg_pin, device="cpu"), progress=False)
    trainer.fit()
    return trainer, loader, model.state_dict()


@pytest.mark.parametrize("cuda, cfg_pin, pinned", [(True, True, True), (True, False, False), (False, True, False)])
def test_the_trainer_pins_batches_only_on_cuda_and_trains_the_same(monkeypatch, cuda, cfg_pin, pinned):
    _, _, plain = _fit(cfg_pin=False)
    fake = _FakePinning(monkeypatch, cuda)
    trainer, loader, weights = _fit(cfg_pin)
    assert trainer.pin is pinned and loader.pin_memory is pinned
    # every tensor of every batch (input, index, target) gathered straight into pinned memory: no extra copy
    assert len(fake.allocated) == (3 * 2 * len(loader) + 3 if pinned else 0)  # + the probe batch of setup
    assert fake.copies == 0
    assert all(torch.equal(plain[k], weights[k]) for k in plain)


def test_the_trainer_pins_what_a_loader_could_not(monkeypatch):
    """Views an AugmentedLoader draws per batch are new tensors: the Trainer pins them on their way."""
    from alambic.data.batch import Batch
    from alambic.train.devices import move_batch

    fake = _FakePinning(monkeypatch, cuda=True)
    b = Batch(views={"input": torch.randn(4, 2), "global_0": torch.randn(4, 2)}, index=torch.arange(4),
              target=torch.zeros(4, dtype=torch.long), extras={"mask": torch.ones(4, dtype=torch.bool)})
    moved = move_batch(b, torch.device("cpu"), pin=True)
    assert fake.copies == 5 and moved.labeled is None
    assert torch.equal(moved.views["global_0"], b.views["global_0"])
    move_batch(b, torch.device("cpu"), pin=False)
    assert fake.copies == 5


def test_request_pinned_reaches_the_loader_inside_wrappers():
    from alambic.data import bundle_from_arrays, make_loader
    from alambic.data.loader import WithoutLabels, request_pinned

    data = bundle_from_arrays(torch.randn(20, 3), torch.randint(0, 2, (20,)), val_fraction=0.1, test_fraction=0.1)
    inner = make_loader(data.train, 4)
    assert request_pinned(WithoutLabels(inner)) and inner.pin_memory
    assert not request_pinned(object())
