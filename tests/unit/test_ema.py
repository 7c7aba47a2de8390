"""EMA teacher: the update formula and its limits, the cosine schedule over updates, per-epoch updates,
and that the teacher never learns by gradient nor drifts in train mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from alambic.data.batch import INPUT, Batch
from alambic.errors import AlambicError
from alambic.teachers import ema
from alambic.teachers.ema import EmaTeacher, ema_momentum, momentum_schedule


def batch_of(x: torch.Tensor) -> Batch:
    return Batch(views={INPUT: x}, index=torch.arange(len(x)))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def bn_net() -> nn.Module:
    """Linear + BatchNorm: float running stats and an integer num_batches_tracked buffer."""
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def trained_student(seed: int = 0) -> nn.Module:
    """A student whose weights and every buffer (running stats, num_batches_tracked) differ from a fresh copy."""
    torch.manual_seed(seed)
    net = bn_net().train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(8, 3) * 2 + 1)
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    return net


def test_momentum_one_leaves_the_teacher_unchanged():
    torch.manual_seed(0)
    student = bn_net()
    teacher = EmaTeacher(student, momentum=1.0)
    before = snapshot(teacher.model)
    moved = trained_student(1)
    for step in range(1, 4):
        teacher.after_step(moved, step)
    after = snapshot(teacher.model)  # (integer buffers such as num_batches_tracked are copied, not averaged)
    assert all(torch.equal(before[k], after[k]) for k in before if before[k].dtype.is_floating_point)


def test_momentum_zero_copies_the_student_exactly_params_and_buffers():
    torch.manual_seed(0)
    teacher = EmaTeacher(bn_net(), momentum=0.0)
    student = trained_student(1)
    assert int(student[1].num_batches_tracked) == 3
    teacher.after_step(student, 1)
    assert same(snapshot(teacher.model), snapshot(student))  # weights, running stats, num_batches_tracked


def test_one_update_is_exactly_the_convex_combination():
    lin = nn.Linear(2, 2)
    teacher = EmaTeacher(lin, momentum=0.75)
    with torch.no_grad():  # dyadic values: every product and sum below is exact in float32
        teacher.model.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 4.0]]))
        teacher.model.bias.copy_(torch.tensor([0.25, -1.0]))
        lin.weight.copy_(torch.tensor([[3.0, 2.0], [-0.5, 0.0]]))
        lin.bias.copy_(torch.tensor([1.25, 1.0]))
    before = snapshot(teacher.model)
    teacher.after_step(lin, 1)
    for name, value in teacher.model.state_dict().items():
        assert torch.equal(value, 0.75 * before[name] + 0.25 * lin.state_dict()[name])
    assert torch.equal(teacher.model.weight, torch.tensor([[1.5, -1.0], [0.25, 3.0]]))

    torch.manual_seed(0)  # random weights: the same formula to float32 rounding
    student = nn.Linear(5, 3)
    teacher = EmaTeacher(student, momentum=0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = snapshot(teacher.model)
    teacher.after_step(student, 1)
    for name, value in teacher.model.state_dict().items():
        torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * student.state_dict()[name], rtol=1e-6, atol=1e-7)


def test_cosine_schedule_runs_over_updates_from_m0_to_one(monkeypatch):
    s = momentum_schedule(10, 0.996, 1.0)
    assert s.shape == (10,) and s[0] == 0.996 and s[-1] == 1.0
    assert np.all(np.diff(s) > 0)
    np.testing.assert_allclose(s, [ema_momentum(u, 10, 0.996, 1.0) for u in range(1, 11)], rtol=0, atol=1e-15)
    assert np.all(momentum_schedule(7, 0.99, None) == 0.99)
    assert len(momentum_schedule(0, 0.99, 1.0)) == 0

    applied = []
    real_update = ema.ema_update
    monkeypatch.setattr(ema, "ema_update", lambda t, s, m: (applied.append(m), real_update(t, s, m)))
    teacher = EmaTeacher(nn.Linear(3, 2), momentum=0.5, end_momentum=1.0, total_steps=12, every=3)  # 4 updates
    for step in range(1, 13):
        teacher.after_step(nn.Linear(3, 2), step)
    assert len(applied) == 4 and applied[0] == 0.5 and applied[-1] == 1.0
    assert applied == list(momentum_schedule(4, 0.5, 1.0))


def test_every_three_over_nine_steps_updates_exactly_three_times():
    torch.manual_seed(0)
    student = nn.Linear(3, 2)
    teacher = EmaTeacher(student, momentum=0.5, total_steps=9, every=3)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    history = [snapshot(teacher.model)]
    for step in range(1, 10):
        teacher.after_step(student, step)
        history.append(snapshot(teacher.model))
    changed = [step for step in range(1, 10) if not same(history[step - 1], history[step])]
    assert changed == [3, 6, 9]
    assert same(history[0], history[2])  # unchanged after steps 1 and 2
    # three halvings of the gap: θ_T = θ_S − (θ_S − θ_T0) / 8
    for name, value in teacher.model.state_dict().items():
        expected = student.state_dict()[name] - (student.state_dict()[name] - history[0][name]) / 8
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)


def test_teacher_gets_no_gradients_even_when_the_loss_uses_its_outputs():
    torch.manual_seed(0)
    student = bn_net()
    teacher = EmaTeacher(student, momentum=0.9)
    assert all(not p.requires_grad for p in teacher.model.parameters())
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    x = torch.randn(6, 3)
    for step in range(1, 4):
        t_logits = teacher.outputs(batch_of(x), [INPUT])[INPUT].logits
        s_logits = student(x)
        loss = ((s_logits - t_logits) ** 2).mean() + (s_logits * t_logits).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        teacher.after_step(student, step)
        assert all(p.grad is None for p in teacher.model.parameters())
        assert all(p.grad is not None for p in student.parameters())
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_teacher_stays_in_eval_mode_even_if_someone_calls_train():
    torch.manual_seed(0)
    teacher = EmaTeacher(bn_net(), momentum=0.9)
    before = snapshot(teacher.model)
    teacher.model.train()
    teacher.outputs(batch_of(torch.randn(8, 3) * 3 + 2), [INPUT])
    assert not teacher.model.training
    assert same(before, snapshot(teacher.model))  # running stats and num_batches_tracked untouched


def test_bad_schedule_arguments_name_the_culprit():
    with pytest.raises(AlambicError, match="EmaTeacher: every must be a positive"):
        EmaTeacher(nn.Linear(2, 2), every=0)
    with pytest.raises(AlambicError, match=r"EmaTeacher: end_momentum must be in \[0, 1\], got 1.5"):
        EmaTeacher(nn.Linear(2, 2), end_momentum=1.5)


def test_batch_stats_normalises_with_the_batch_and_writes_no_buffer():
    """BYOL's target network: BatchNorm on the batch's own statistics, dropout off, running stats untouched."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    teacher = EmaTeacher(student, momentum=0.9, batch_stats=True)
    before = snapshot(teacher.model)
    x = torch.randn(8, 3) * 3 + 2
    out = teacher.outputs(batch_of(x), [INPUT])[INPUT].logits
    lin, bn, _, head = teacher.model
    h = lin(x)
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(out, head(h))  # batch statistics, and no dropout
    assert same(before, snapshot(teacher.model))  # running stats and num_batches_tracked untouched
    assert not teacher.model.training and not bn.training and bn.track_running_stats
    running = EmaTeacher(student, momentum=0.9).outputs(batch_of(x), [INPUT])[INPUT].logits
    assert not torch.allclose(running, out)  # the default still reads the running statistics
