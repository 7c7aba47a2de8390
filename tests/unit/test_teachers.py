"""Teachers: a frozen network cannot change; an analytic teacher wraps callables and estimators."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alambic.data.batch import INPUT, Batch
from alambic.errors import AlambicError
from alambic.models import SmallCNN
from alambic.recipe import load_recipe
from alambic.run import load_student, run
from alambic.teachers import AnalyticTeacher, FrozenTeacher
from tests.conftest import tiny_recipe


def batch_of(x: torch.Tensor) -> Batch:
    return Batch(views={INPUT: x}, index=torch.arange(len(x)))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_frozen_teacher_is_eval_mode_without_grad_even_if_someone_calls_train():
    model = SmallCNN(1, (8, 8), [4], 3)  # has BatchNorm and running stats
    teacher = FrozenTeacher(model)
    before = snapshot(model)
    model.train()  # e.g. a user's loop calls .train() on everything
    out = teacher.outputs(batch_of(torch.randn(5, 1, 8, 8) * 3 + 1), [INPUT])[INPUT]
    assert not model.training
    assert not out.logits.requires_grad
    assert all(not p.requires_grad for p in model.parameters())
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm running stats untouched


def test_frozen_teacher_outputs_equal_the_eval_forward_and_taps_are_detached():
    torch.manual_seed(0)
    model = SmallCNN(1, (8, 8), [4, 5], 3)
    x = torch.randn(4, 1, 8, 8)
    teacher = FrozenTeacher(model, taps=["pool"])
    out = teacher.outputs(batch_of(x), [INPUT])[INPUT]
    with torch.no_grad():
        expected = model.eval()(x)
    assert torch.equal(out.logits, expected)
    assert out.features["pool"].shape == (4, 5) and not out.features["pool"].requires_grad
    teacher.close()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_fingerprint_changes_with_weights_only():
    torch.manual_seed(0)
    a = SmallCNN(1, (8, 8), [4], 3)
    b = SmallCNN(1, (8, 8), [4], 3)
    b.load_state_dict(a.state_dict())
    assert FrozenTeacher(a).fingerprint() == FrozenTeacher(b).fingerprint()
    with torch.no_grad():
        b.head.bias[0] += 1e-3
    assert FrozenTeacher(a).fingerprint() != FrozenTeacher(b).fingerprint()


def test_teacher_weights_and_buffers_unchanged_after_a_distillation_run(tmp_path):
    teacher_dir = tmp_path / "teacher"
    run(load_recipe(tiny_recipe(student={"arch": "cnn", "channels": [4]}, train={"epochs": 1})), teacher_dir,
        progress=False)
    model, _ = load_student(teacher_dir)
    before = snapshot(model)
    frozen = FrozenTeacher(model)
    recipe = load_recipe(tiny_recipe(method={"name": "kd"}, teacher={"run": str(teacher_dir)}))
    run(recipe, tmp_path / "student", teacher=frozen, progress=False)
    after = snapshot(model)
    assert any("running_mean" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_analytic_teacher_from_callable_and_estimator():
    from sklearn.linear_model import LogisticRegression

    x = torch.randn(30, 1, 2, 2)
    y = (x.reshape(30, -1).sum(1) > 0).long()
    fn = AnalyticTeacher(lambda v: v.reshape(len(v), -1)[:, :2] * 2)
    assert torch.equal(fn.outputs(batch_of(x), [INPUT])[INPUT].logits, x.reshape(30, -1)[:, :2] * 2)

    est = LogisticRegression().fit(x.reshape(30, -1).numpy(), y.numpy())
    teacher = AnalyticTeacher(est)
    logits = teacher.outputs(batch_of(x), [INPUT])[INPUT].logits
    proba = torch.from_numpy(est.predict_proba(x.reshape(30, -1).double().numpy())).float()
    assert torch.allclose(logits.softmax(-1), proba, atol=1e-6)
    assert teacher.fingerprint() == AnalyticTeacher(est).fingerprint()
    with pytest.raises(AlambicError, match="no layers to tap"):
        teacher.use_taps(["body.act0"])


def test_binary_decision_function_becomes_two_logits():
    from sklearn.svm import LinearSVC

    x = torch.randn(20, 3)
    y = (x[:, 0] > 0).long()
    est = LinearSVC().fit(x.numpy(), y.numpy())
    logits = AnalyticTeacher(est).outputs(batch_of(x), [INPUT])[INPUT].logits
    d = torch.from_numpy(est.decision_function(x.double().numpy())).float()
    assert torch.allclose(logits[:, 1] - logits[:, 0], d, atol=1e-6)
    assert torch.equal(logits.argmax(1), torch.from_numpy(est.predict(x.double().numpy())))
