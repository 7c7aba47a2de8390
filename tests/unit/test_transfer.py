"""Parameter-space transfer (MACIL-SD): the student's shared weights move toward a frozen source model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alambic.data.batch import INPUT, Batch
from alambic.errors import AlambicError
from alambic.teachers import FrozenTeacher, TransferTeacher, param_transfer
from alambic.teachers.ema import momentum_schedule


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Net(nn.Module):
    """A body shared with the source and a head of its own (another number of classes)."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.body(x))))


class Wrapped(nn.Module):
    """A student whose layer lives one module deeper than the source's (``a.fc`` vs ``fc``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Module()
        self.a.fc = nn.Linear(2, 2)
        self.own = nn.Linear(2, 2)


class Source(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.alt = nn.Linear(2, 2)


def filled(model: nn.Module, value: float) -> nn.Module:
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.dtype.is_floating_point:
                t.fill_(value)
    return model


def test_mapped_params_follow_the_ema_formula_exactly_and_skipped_ones_do_not_move():
    torch.manual_seed(0)
    dst, src = filled(Net(3), 1.0), filled(Net(5), 3.0)  # dyadic values: exact in float32
    with torch.no_grad():
        dst.body.weight.copy_(torch.arange(16.0).reshape(4, 4) / 4)
    before = snapshot(dst)
    names = param_transfer(dst, src, 0.75, skip=["head.*"])
    assert names == ["body.weight", "body.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    after = snapshot(dst)
    for n in names:
        assert torch.equal(after[n], 0.75 * before[n] + 0.25 * src.state_dict()[n])
    for n in ("head.weight", "head.bias", "bn.num_batches_tracked"):
        assert torch.equal(after[n], before[n])  # skipped (and integer buffers) bit-exact

    torch.manual_seed(1)  # random weights: the same formula to float32 rounding
    dst, src = Net(3), Net(3)
    before = snapshot(dst)
    names = param_transfer(dst, src, 0.91)
    assert "head.weight" in names
    for n in names:
        torch.testing.assert_close(dst.state_dict()[n], 0.91 * before[n] + 0.09 * src.state_dict()[n],
                                   rtol=1e-6, atol=1e-7)


def test_prefix_mapping_rewrites_module_prefixes():
    dst, src = filled(Wrapped(), 2.0), filled(Source(), 4.0)
    names = param_transfer(dst, src, 0.5, name_map={"a.fc.": "fc."}, skip=["own.*"])
    assert names == ["a.fc.weight", "a.fc.bias"]
    assert torch.equal(dst.a.fc.weight, torch.full((2, 2), 3.0))
    assert torch.equal(dst.own.weight, torch.full((2, 2), 2.0))
    with torch.no_grad():
        src.alt.bias.fill_(7.0)
    names = param_transfer(dst, src, 0.5, name_map={"a.fc.": "fc.", "a.fc.bias": "alt.bias"}, skip=["own.*"])
    assert names == ["a.fc.weight", "a.fc.bias"]  # an exact key wins over a prefix key
    assert torch.equal(dst.a.fc.weight, torch.full((2, 2), 3.5)) and torch.equal(dst.a.fc.bias, torch.full((2,), 5.0))


def test_missing_mapped_source_names_both():
    dst, src = Wrapped(), Source()
    with pytest.raises(AlambicError, match=r"Wrapped\.a\.fc\.weight \(2, 2\) is mapped to Source\.head\.weight"):
        param_transfer(dst, src, 0.5, name_map={"a.fc.weight": "head.weight"})
    with pytest.raises(AlambicError, match=r"name_map key 'b\.' names nothing in Wrapped"):
        param_transfer(dst, src, 0.5, name_map={"b.": "fc."})


def test_shape_mismatch_names_both_shapes():
    before = snapshot(dst := Net(3))
    with pytest.raises(AlambicError, match=r"Net\.head\.weight has shape \(3, 4\) but Net\.head\.weight has shape "
                                           r"\(5, 4\) \(add 'head\.weight' to skip"):
        param_transfer(dst, Net(5), 0.5)
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing written before the error
    with pytest.raises(AlambicError, match=r"Wrapped\.a\.fc\.bias has shape \(2,\) but Source\.fc\.weight has shape \(2, 2\)"):
        param_transfer(Wrapped(), Source(), 0.5, name_map={"a.fc.bias": "fc.weight"})


def test_nothing_matching_is_an_error():
    with pytest.raises(AlambicError, match="param_transfer: no parameter of Wrapped matches Source"):
        param_transfer(Wrapped(), Source(), 0.5)
    with pytest.raises(AlambicError, match="param_transfer: no parameter of Net matches Net"):
        param_transfer(Net(3), Net(3), 0.5, skip=["*"])
    with pytest.raises(AlambicError, match=r"momentum must be in \[0, 1\]"):
        param_transfer(Net(3), Net(3), 1.5)


def test_schedule_runs_from_0_91_to_one_and_the_last_update_is_a_no_op():
    torch.manual_seed(0)
    teacher = TransferTeacher(Net(3), total_steps=10)
    assert teacher.schedule[0] == 0.91 and teacher.schedule[-1] == 1.0 and len(teacher.schedule) == 10
    student = Net(3)
    before = snapshot(student)
    teacher.after_step(student, 1)  # m = 0.91
    for n in teacher.updated:
        torch.testing.assert_close(student.state_dict()[n], 0.91 * before[n] + 0.09 * teacher.model.state_dict()[n],
                                   rtol=1e-6, atol=1e-7)
    for step in range(2, 10):
        teacher.after_step(student, step)
    before_last = snapshot(student)
    teacher.after_step(student, 10)  # m = 1
    assert teacher.updated and all(torch.equal(before_last[k], v) for k, v in student.state_dict().items())


def test_source_never_changes_and_stays_a_frozen_teacher():
    torch.manual_seed(0)
    source = Net(3)
    teacher = TransferTeacher(source, momentum=0.5, end_momentum=None, total_steps=50, skip=["head.*"])
    assert isinstance(teacher, FrozenTeacher)
    frozen, fingerprint = snapshot(source), teacher.fingerprint()
    student = Net(3)
    gap = (student.body.weight - source.body.weight).abs().max()
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    for step in range(1, 51):
        source.train()  # someone toggles it: outputs() puts it back in eval mode
        t = teacher.outputs(Batch(views={INPUT: x}, index=torch.arange(8)), [INPUT])[INPUT].logits
        loss = ((student(x) - t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.after_step(student, step)
    assert all(torch.equal(frozen[k], v) for k, v in source.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in source.parameters())
    assert teacher.fingerprint() == fingerprint and not source.training
    assert teacher.updated == ["body.weight", "body.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"]
    # m = 0.5 after every step: the body stays next to the source's, whatever the gradient steps do
    assert (student.body.weight - source.body.weight).abs().max() < gap / 10


def test_every_steps_per_epoch_transfers_only_at_epoch_ends(monkeypatch):
    from alambic.teachers import transfer

    calls = []
    real = transfer.param_transfer
    monkeypatch.setattr(transfer, "param_transfer", lambda d, s, m, *a: (calls.append(m), real(d, s, m, *a))[1])
    steps_per_epoch, epochs = 4, 5
    teacher = TransferTeacher(Net(3), total_steps=steps_per_epoch * epochs, every=steps_per_epoch)
    student = Net(3)
    history = [snapshot(student)]
    for step in range(1, steps_per_epoch * epochs + 1):
        teacher.after_step(student, step)
        history.append(snapshot(student))
    moved = [s for s in range(1, len(history)) if any(not torch.equal(history[s - 1][k], history[s][k]) for k in history[s])]
    assert moved == [4, 8, 12, 16]  # the fifth (last) epoch end has m = 1: called, but a no-op
    assert calls == list(momentum_schedule(epochs, 0.91, 1.0)) and calls[0] == 0.91 and calls[-1] == 1.0


def test_recipe_transfer_teacher_pulls_the_student_onto_the_source_run(tmp_path):
    """`teacher: {transfer: {run: DIR}}` from a recipe: with momentum 0 at every epoch end the student ends
    equal to the source run's weights; skipped parameters keep what training made of them."""
    from safetensors.torch import load_file

    from alambic.recipe import load_recipe
    from alambic.run import run
    from tests.conftest import tiny_recipe

    source = tmp_path / "source"
    run(load_recipe(tiny_recipe(seed=1)), source, progress=False)
    out = tmp_path / "pulled"
    run(load_recipe(tiny_recipe(teacher={"transfer": {"run": str(source), "momentum": 0.0, "end_momentum": 0.0,
                                                       "skip": ["head.*"]}})), out, progress=False)
    src, got = load_file(str(source / "student.safetensors")), load_file(str(out / "student.safetensors"))
    assert torch.equal(got["body.fc0.weight"], src["body.fc0.weight"])
    assert not torch.equal(got["head.weight"], src["head.weight"])
