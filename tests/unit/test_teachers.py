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


def test_ema_update_formula_and_its_limits():
    from alambic.teachers.ema import EmaTeacher, ema_update

    torch.manual_seed(0)
    student = SmallCNN(1, (8, 8), [3], 2)
    teacher = EmaTeacher(student, momentum=0.9)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = snapshot(teacher.model)
    teacher.after_step(student, 1)
    for name, value in teacher.model.state_dict().items():
        if value.dtype.is_floating_point:
            expected = 0.9 * before[name] + 0.1 * student.state_dict()[name]
            torch.testing.assert_close(value, expected, rtol=0, atol=1e-6)
    frozen = snapshot(teacher.model)
    ema_update(teacher.model, student, 1.0)  # m = 1: the teacher does not move
    assert all(torch.equal(frozen[k], v) for k, v in teacher.model.state_dict().items())
    ema_update(teacher.model, student, 0.0)  # m = 0: the teacher becomes the student
    assert all(torch.equal(student.state_dict()[k], v) for k, v in teacher.model.state_dict().items())
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_ema_cosine_momentum_starts_at_m0_and_ends_at_one():
    from alambic.teachers.ema import ema_momentum

    assert ema_momentum(1, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert ema_momentum(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    mid = ema_momentum(50, 100, 0.996, 1.0)
    assert 0.996 < mid < 1.0
    assert ema_momentum(37, 100, 0.99, None) == 0.99


def test_ensemble_logits_are_the_log_of_the_mean_probability():
    from alambic.teachers.ensemble import TeacherEnsemble, ensemble_logits

    a, b = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    mean = (a.softmax(-1) + b.softmax(-1)) / 2
    torch.testing.assert_close(ensemble_logits([a, b]).exp(), mean)
    ens = TeacherEnsemble([AnalyticTeacher(lambda x: a.expand(len(x), 3)), AnalyticTeacher(lambda x: b.expand(len(x), 3))])
    out = ens.outputs(batch_of(torch.zeros(2, 4)), [INPUT])[INPUT]
    assert len(out.members) == 2 and torch.equal(out.members[1].logits, b.expand(2, 3))
    torch.testing.assert_close(out.logits.softmax(-1), mean.expand(2, 3))


def test_recipe_with_several_teachers_distils_their_ensemble(tmp_path, teacher_run):
    recipe = load_recipe(tiny_recipe(method={"name": "kd"}, teachers=[{"run": str(teacher_run)}, {"ema": {"momentum": 0.99}}]))
    summary = run(recipe, tmp_path / "r", progress=False)
    assert 0 < summary["test"]["accuracy"] <= 1
    from alambic.errors import RecipeError

    with pytest.raises(RecipeError, match="give teacher or teachers, not both"):
        load_recipe(tiny_recipe(method={"name": "kd"}, teacher={"run": str(teacher_run)}, teachers=[{"run": str(teacher_run)}]))
    with pytest.raises(RecipeError, match=r"teachers.1.run: .* is not a finished alambic run"):
        load_recipe(tiny_recipe(method={"name": "kd"}, teachers=[{"run": str(teacher_run)}, {"run": str(tmp_path)}]))


def test_mean_teacher_resumes_bit_identically(tmp_path):
    """The EMA teacher's state is in the checkpoint: a killed and resumed mean-teacher run matches."""
    from alambic.train import Callback

    class Kill(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 25:
                raise KeyboardInterrupt

    recipe = load_recipe(tiny_recipe(method={"name": "kd", "alpha": 0.5}, teacher={"ema": {"momentum": 0.9}},
                                     train={"epochs": 3, "batch_size": 64, "lr": 0.01}))
    run(recipe, tmp_path / "a", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "b", progress=False, callbacks=[Kill()])
    run(recipe, tmp_path / "b", resume=True, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "a/student.safetensors")), load_file(str(tmp_path / "b/student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
