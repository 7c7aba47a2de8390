"""Self-distillation without an external teacher: PS-KD, BYOT, LSSKD, DML and born-again generations.

Expected values are computed with numpy / math here, never by calling the loss under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch
from torch import nn

from alambic.born_again import BAN_KD, born_again, generation_recipe
from alambic.data.batch import IGNORE_INDEX, INPUT, Batch
from alambic.data.loader import TensorLoader
from alambic.data.splits import Split
from alambic.errors import ShapeMismatchError
from alambic.eval.efficiency import parameter_count
from alambic.methods import SetupInfo, StepContext
from alambic.methods.byot import BYOT, BYOTConfig, feature_hint, make_branch
from alambic.methods.dml import DML, DMLConfig, fresh_copy, mutual_learning_losses
from alambic.methods.lsskd import LSSKD, LSSKDConfig, deep_to_shallow_kd, joint_labels, rotate4
from alambic.methods.pskd import PSKD, PSKDConfig, pskd_alpha, pskd_targets, soft_cross_entropy
from alambic.models.taps import Taps
from alambic.models.zoo import MLP, SmallCNN
from alambic.recipe.schema import TrainSpec
from alambic.registry import METHODS
from alambic.run import load_student
from alambic.teachers.base import ModelOutput
from alambic.teachers.frozen import state_fingerprint
from alambic.train.loop import Trainer
from tests.conftest import tiny_recipe
from tests.reference import np_ce, np_softmax

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.0, 0.0], [0.5, 0.5, -1.0]]
Y = [2, 1, 0, 1]


def np_onehot(y, c):
    return np.eye(c)[np.asarray(y)]


def np_kl_t2(teacher, student, temp) -> float:
    """T²·KL(softmax(t/T) ‖ softmax(s/T)), batch mean."""
    p_t, p_s = np_softmax(np.asarray(teacher) / temp), np_softmax(np.asarray(student) / temp)
    return float(temp**2 * (p_t * np.log(p_t / p_s)).sum(-1).mean())


def f64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def outs(logits, **features) -> dict[str, ModelOutput]:
    return {INPUT: ModelOutput(logits, dict(features))}


def batch_of(index, target=Y, labeled=None, x=None) -> Batch:
    n = len(index)
    return Batch(views={INPUT: x if x is not None else torch.zeros(n, 2)}, index=torch.tensor(index),
                 target=torch.tensor(target), labeled=None if labeled is None else torch.tensor(labeled))


def ctx(epoch=0, values=None, epochs=4, steps=2) -> StepContext:
    return StepContext(step=epoch * steps, epoch=epoch, total_steps=epochs * steps, steps_per_epoch=steps,
                       values=values or {})


def info(num_samples=6, num_classes=3, epochs=4, steps=2, student=None, loader=None) -> SetupInfo:
    return SetupInfo(student if student is not None else nn.Identity(), num_classes, num_samples, steps, epochs,
                     loader=loader)


class OneBatch:
    """The smallest loader: one fixed batch per epoch."""

    def __init__(self, batch: Batch):
        self.batch = batch

    def epoch(self, epoch: int, start: int = 0):
        yield self.batch

    def __len__(self) -> int:
        return 1


# ----------------------------------------------------------------------------------------------- PS-KD


def make_pskd(alpha_T=0.8, num_samples=6) -> PSKD:
    method = PSKD(PSKDConfig(alpha_T=alpha_T))
    method.setup(outs(f64(S)), None, info(num_samples=num_samples))
    return method


def test_pskd_alpha_schedule_is_linear_in_the_epoch_and_constant_within_it():
    # Kim et al. Eq. 5: α_t = α_T·(t+1)/E, reaching α_T at the last epoch
    values = PSKD(PSKDConfig(alpha_T=0.8)).schedules(info(epochs=4, steps=3))["alpha_t"]
    np.testing.assert_allclose(values, [0.2] * 3 + [0.4] * 3 + [0.6] * 3 + [0.8] * 3, rtol=1e-12)
    assert pskd_alpha(0, 300, 0.8) == pytest.approx(0.8 / 300, rel=1e-12)
    assert pskd_alpha(299, 300, 0.8) == pytest.approx(0.8, rel=1e-12)


def test_pskd_first_epoch_targets_are_exactly_one_hot_whatever_the_store_holds():
    method = make_pskd()
    method.store.fill_(1 / 3)  # even a filled store must not leak into epoch 0 (α_0 = 0.2 here)
    method.seen.fill_(True)
    s = f64(S).requires_grad_(True)
    out = method(outs(s), None, batch_of([0, 1, 2, 3]), ctx(0, {"alpha_t": 0.2}))
    assert out.loss.item() == pytest.approx(np_ce(S, Y), rel=1e-12)
    out.loss.backward()
    np.testing.assert_allclose(s.grad.numpy(), (np_softmax(S) - np_onehot(Y, 3)) / 4, rtol=1e-10)


def test_pskd_later_epochs_use_the_mixed_soft_target_cross_entropy():
    method = make_pskd()
    past = np_softmax([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, -1.0, 0.5]])
    rows = [5, 0, 3, 2]
    with torch.no_grad():
        method.store[rows] = f64(past)
        method.seen[rows] = True
    alpha = 0.4
    s = f64(S).requires_grad_(True)
    out = method(outs(s), None, batch_of(rows), ctx(1, {"alpha_t": alpha}))
    target = (1 - alpha) * np_onehot(Y, 3) + alpha * past
    np.testing.assert_allclose(target.sum(-1), 1.0, rtol=1e-12)
    expected = float(np.mean(-(target * np.log(np_softmax(S))).sum(-1)))
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert set(out.terms) == {"soft_ce"}
    out.loss.backward()  # soft CE gradient: (p − target)/B, the target a constant
    np.testing.assert_allclose(s.grad.numpy(), (np_softmax(S) - target) / 4, rtol=1e-10)


def test_pskd_alpha_falls_back_to_the_epoch_when_no_schedule_is_given():
    method = make_pskd()
    past = np.full((4, 3), 1 / 3)
    with torch.no_grad():
        method.store[[0, 1, 2, 3]] = f64(past)
        method.seen[[0, 1, 2, 3]] = True
    out = method(outs(f64(S)), None, batch_of([0, 1, 2, 3]), ctx(2, epochs=4))  # α = 0.8·3/4
    target = 0.4 * np_onehot(Y, 3) + 0.6 * past
    assert out.loss.item() == pytest.approx(float(np.mean(-(target * np.log(np_softmax(S))).sum(-1))), rel=1e-12)


def test_pskd_store_rows_of_the_batch_get_this_forwards_detached_softmax_and_no_other_row_changes():
    method = make_pskd()
    with torch.no_grad():
        method.store.fill_(7.0)
    s = f64(S).requires_grad_(True)
    method(outs(s), None, batch_of([4, 1, 0, 2]), ctx(0, {"alpha_t": 0.2}))
    store = method.store.numpy()
    np.testing.assert_allclose(store[[4, 1, 0, 2]], np_softmax(S), rtol=1e-12)
    np.testing.assert_array_equal(store[[3, 5]], np.full((2, 3), 7.0))
    assert method.seen.tolist() == [True, True, True, False, True, False]
    assert not method.store.requires_grad and method.store.grad_fn is None


def test_pskd_skips_unlabelled_rows_in_loss_and_store():
    method = make_pskd()
    batch = batch_of([0, 1, 2, 3], target=[2, IGNORE_INDEX, 0, IGNORE_INDEX], labeled=[True, False, True, False])
    out = method(outs(f64(S)), None, batch, ctx(0, {"alpha_t": 0.2}))
    assert out.loss.item() == pytest.approx(np_ce([S[0], S[2]], [2, 0]), rel=1e-12)
    assert method.seen.tolist() == [True, False, True, False, False, False]
    assert method.store[1].abs().sum() == 0 and method.store[3].abs().sum() == 0


def test_pskd_store_is_checkpointed_and_restored_on_resume(tmp_path):
    torch.manual_seed(0)
    n = 12
    split = Split(torch.randn(n, 4), torch.arange(n) % 3, torch.arange(n), torch.ones(n, dtype=torch.bool))
    spec = TrainSpec(epochs=1, batch_size=4, lr=0.01, log_every=1)
    first = PSKD()
    Trainer(MLP(4, [5], 3), first, TensorLoader(split, 4, seed=0), spec, run_dir=tmp_path, progress=False).fit()
    assert bool(first.seen.all())
    np.testing.assert_allclose(first.store.sum(-1).numpy(), 1.0, rtol=1e-6)
    again = PSKD()
    trainer = Trainer(MLP(4, [5], 3), again, TensorLoader(split, 4, seed=0), spec, run_dir=tmp_path, progress=False)
    trainer.load_checkpoint(trainer.checkpoint_path)
    assert torch.equal(again.store, first.store) and torch.equal(again.seen, first.seen)


def test_pskd_helpers_check_shapes_and_config_is_strict():
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3\).*\(2, 4\)"):
        pskd_targets(torch.zeros(2, 3), torch.zeros(2, 4), 0.5)
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3\).*\(3, 3\)"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(pydantic.ValidationError):
        PSKDConfig(alpha_T=1.5)
    with pytest.raises(pydantic.ValidationError):
        PSKDConfig(alpha=0.5)
    assert PSKD.uses_unlabeled is False and PSKD.needs_teacher is False


# ------------------------------------------------------------------------------------------------ BYOT


def make_byot(**cfg):
    torch.manual_seed(0)
    method = BYOT(BYOTConfig(taps=["a"], deep_tap="d", **cfg))
    a = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    d = torch.randn(4, 5, dtype=torch.float64).relu()
    method.setup(outs(f64(S), a=a, d=d), None, info(num_classes=3))
    method.double()
    return method, a, d


def test_byot_branches_are_sized_from_the_tap_shapes():
    method, _, _ = make_byot()
    conv = method.branches[0][0]
    assert isinstance(conv, nn.Conv2d) and (conv.in_channels, conv.out_channels) == (3, 5)
    assert (method.classifiers[0].in_features, method.classifiers[0].out_features) == (5, 3)
    vec = make_branch(torch.zeros(2, 7), 5, "t")
    assert isinstance(vec[0], nn.Linear) and (vec[0].in_features, vec[0].out_features) == (7, 5)
    assert method.student_taps() == ["a", "d"]


def test_byot_loss_is_deep_ce_plus_weighted_branch_ce_kd_and_hint():
    alpha, temp, lam = 0.3, 3.0, 0.05
    method, a, d = make_byot(alpha=alpha, temperature=temp, hint_weight=lam)
    s = f64(S).requires_grad_(True)
    a_in, d_in = a.clone().requires_grad_(True), d.clone().requires_grad_(True)
    out = method(outs(s, a=a_in, d=d_in), None, batch_of([0, 1, 2, 3]), ctx())
    with torch.no_grad():  # train-mode BatchNorm: the same batch gives the same branch output
        z = method.branches[0](a).numpy()
        zl = method.classifiers[0](torch.from_numpy(z)).numpy()
    ce, branch_ce = np_ce(S, Y), (1 - alpha) * np_ce(zl, Y)
    branch_kd = alpha * np_kl_t2(S, zl, temp)
    hint = lam * float(((z - d.numpy()) ** 2).sum(1).mean())
    assert out.terms["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out.terms["branch_ce"].item() == pytest.approx(branch_ce, rel=1e-10)
    assert out.terms["branch_kd"].item() == pytest.approx(branch_kd, rel=1e-10)
    assert out.terms["hint"].item() == pytest.approx(hint, rel=1e-10)
    assert out.loss.item() == pytest.approx(ce + branch_ce + branch_kd + hint, rel=1e-10)
    out.loss.backward()
    # the deepest classifier learns from the labels only: its KD role is a detached teacher
    np.testing.assert_allclose(s.grad.numpy(), (np_softmax(S) - np_onehot(Y, 3)) / 4, rtol=1e-10)
    assert d_in.grad is None  # the hint target is a constant too
    assert a_in.grad.abs().sum() > 0 and method.branches[0][0].weight.grad.abs().sum() > 0


def test_byot_without_hint_has_no_hint_term():
    method, a, d = make_byot(hint_weight=0.0)
    out = method(outs(f64(S), a=a, d=d), None, batch_of([0, 1, 2, 3]), ctx())
    assert set(out.terms) == {"ce", "branch_ce", "branch_kd"}


def test_byot_branches_are_dropped_at_deployment():
    torch.manual_seed(0)
    split = Split(torch.rand(8, 1, 8, 8), torch.arange(8) % 10, torch.arange(8), torch.ones(8, dtype=torch.bool))
    student = SmallCNN(1, (8, 8), [4, 8], 10)
    plain = parameter_count(SmallCNN(1, (8, 8), [4, 8], 10))
    method = BYOT(BYOTConfig(taps=["features.block0"], deep_tap="pool"))
    trainer = Trainer(student, method, TensorLoader(split, 4), TrainSpec(epochs=1), progress=False)
    trainer.close()
    assert parameter_count(method) > 0  # the branches exist and are trained ...
    trained = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in trained for p in method.parameters())
    deployed = method.deploy(student)  # ... but the deployed network is the plain student
    assert parameter_count(deployed) == plain
    assert set(deployed.state_dict()) == set(SmallCNN(1, (8, 8), [4, 8], 10).state_dict())


def test_byot_rejects_bad_taps_and_config():
    with pytest.raises(ShapeMismatchError, match=r"\(2, 3, 4\)"):
        make_branch(torch.zeros(2, 3, 4), 5, "byot tap x")
    with pytest.raises(ShapeMismatchError, match=r"\(2, 5\).*\(2, 6\)"):
        feature_hint(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(pydantic.ValidationError):
        BYOTConfig(taps=[])
    with pytest.raises(pydantic.ValidationError, match="deep_tap"):
        BYOTConfig(taps=["pool"], deep_tap="pool")


# ----------------------------------------------------------------------------------------------- LSSKD


def test_rotate4_expands_the_batch_four_times_in_quarter_turns():
    x = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    out = rotate4(x)
    assert out.shape == (8, 1, 3, 3)
    for b in range(2):
        for r in range(4):
            np.testing.assert_array_equal(out[4 * b + r, 0].numpy(), np.rot90(x[b, 0].numpy(), r))
    assert torch.equal(out[0::4], x)


def test_joint_labels_are_4y_plus_r_and_unlabelled_stay_ignored():
    joint = joint_labels(torch.tensor([2, 0, IGNORE_INDEX]))
    assert joint.tolist() == [8, 9, 10, 11, 0, 1, 2, 3] + [IGNORE_INDEX] * 4


def test_rotate4_needs_square_images():
    with pytest.raises(ShapeMismatchError, match=r"\(2, 1, 3, 4\)"):
        rotate4(torch.zeros(2, 1, 3, 4))
    with pytest.raises(ShapeMismatchError, match=r"\(2, 9\)"):
        rotate4(torch.zeros(2, 9))


def test_stage_kd_runs_deeper_to_shallower_with_the_deeper_side_detached():
    rng = np.random.default_rng(0)
    shallow, middle, deep = (rng.normal(size=(5, 8)) for _ in range(3))
    t = 3.0
    z = [f64(v).requires_grad_(True) for v in (shallow, middle, deep)]
    loss = deep_to_shallow_kd(z, t)
    expected = np_kl_t2(middle, shallow, t) + np_kl_t2(deep, middle, t)
    reverse = np_kl_t2(shallow, middle, t) + np_kl_t2(middle, deep, t)
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert abs(expected - reverse) > 1e-3  # the direction is observable
    loss.backward()
    assert z[2].grad is None  # the deepest stage only teaches
    # the middle stage gets only its student gradient T·(p_mid − p_deep)/N, nothing as a teacher
    p_mid, p_deep = np_softmax(middle / t), np_softmax(deep / t)
    np.testing.assert_allclose(z[1].grad.numpy(), t * (p_mid - p_deep) / 5, rtol=1e-10)


def make_lsskd():
    torch.manual_seed(0)
    student = SmallCNN(1, (8, 8), [4, 8], 10)
    x = torch.randn(3, 1, 8, 8)
    batch = Batch(views={INPUT: x}, index=torch.arange(3), target=torch.tensor([1, 7, 3]))
    method = LSSKD(LSSKDConfig(taps=["features.block0", "features.block1"]))
    method.setup(outs(student(x)), None, info(num_samples=3, num_classes=10, student=student, loader=OneBatch(batch)))
    return method, student, batch


def test_lsskd_forward_runs_the_student_on_the_x4_batch_with_4c_stage_classifiers():
    method, student, batch = make_lsskd()
    seen = []
    handle = student.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    out = method(outs(student(batch.input)), None, batch, ctx())
    handle.remove()
    assert seen == [3, 12]  # the loop's pass, then the rotated pass on 4B rows
    assert all(head[-1].out_features == 40 for head in method.heads)
    with torch.no_grad():  # the main CE is on the unrotated rows of the rotated pass
        main = student(rotate4(batch.input))[0::4].numpy()
    assert out.terms["ce"].item() == pytest.approx(np_ce(main, [1, 7, 3]), rel=1e-5)
    assert set(out.terms) == {"ce", "stage_ce", "stage_kd"}
    out.loss.backward()
    assert student.features[0][0].weight.grad.abs().sum() > 0
    assert all(h[-1].weight.grad.abs().sum() > 0 for h in method.heads)


def test_lsskd_keeps_the_student_out_of_its_own_parameters():
    method, student, _ = make_lsskd()
    student_ids = {id(p) for p in student.parameters()}
    assert not any(id(p) in student_ids for p in method.parameters())
    assert not any(k.startswith("_student") for k in method.state_dict())
    assert parameter_count(method.deploy(student)) == parameter_count(SmallCNN(1, (8, 8), [4, 8], 10))


def test_lsskd_config_needs_two_distinct_taps():
    with pytest.raises(pydantic.ValidationError):
        LSSKDConfig(taps=["features.block0"])
    with pytest.raises(pydantic.ValidationError):
        LSSKDConfig(taps=["a", "a"])


# ------------------------------------------------------------------------------------------------- DML


A = [[0.5, -1.0, 2.0], [1.0, 1.0, 0.0], [-0.5, 2.0, 0.5], [0.0, 0.0, 1.5]]


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_mutual_learning_losses_match_the_paper(temp):
    la, lb = mutual_learning_losses(f64(S), f64(A), torch.tensor(Y), temp, all_labeled=True)
    assert la.item() == pytest.approx(np_ce(S, Y) + np_kl_t2(A, S, temp), rel=1e-12)
    assert lb.item() == pytest.approx(np_ce(A, Y) + np_kl_t2(S, A, temp), rel=1e-12)


def test_each_mutual_kl_sends_no_gradient_to_the_other_network():
    a, b = f64(S).requires_grad_(True), f64(A).requires_grad_(True)
    la, _ = mutual_learning_losses(a, b, torch.tensor(Y))
    la.backward()
    assert b.grad is None
    expected = (np_softmax(S) - np_onehot(Y, 3)) / 4 + (np_softmax(S) - np_softmax(A)) / 4
    np.testing.assert_allclose(a.grad.numpy(), expected, rtol=1e-10)
    a, b = f64(S).requires_grad_(True), f64(A).requires_grad_(True)
    _, lb = mutual_learning_losses(a, b, torch.tensor(Y))
    lb.backward()
    assert a.grad is None
    expected = (np_softmax(A) - np_onehot(Y, 3)) / 4 + (np_softmax(A) - np_softmax(S)) / 4
    np.testing.assert_allclose(b.grad.numpy(), expected, rtol=1e-10)


def test_dml_peer_is_a_fresh_seeded_copy_of_the_student():
    torch.manual_seed(0)
    student = MLP(4, [6], 3, batchnorm=True)
    taps = Taps(student, ["body.act0"]).attach()  # a hook on the student must not be copied to the peer
    rng_before = torch.get_rng_state()
    method = DML(DMLConfig(peer_seed=5))
    method.setup(outs(torch.zeros(2, 3)), None, info(student=student))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the run's random stream is untouched
    s_state, p_state = student.state_dict(), method.peer.state_dict()
    assert set(s_state) == set(p_state) and all(s_state[k].shape == p_state[k].shape for k in s_state)
    assert not torch.equal(s_state["body.fc0.weight"], p_state["body.fc0.weight"])
    assert not torch.equal(s_state["head.weight"], p_state["head.weight"])
    same = fresh_copy(student, 5).state_dict()
    assert all(torch.equal(same[k], p_state[k]) for k in p_state)  # the peer_seed decides the peer
    method.peer(torch.randn(2, 4))
    assert taps.outputs == {}
    taps.remove()
    peer_ids = {id(p) for p in method.peer.parameters()}
    assert peer_ids == {id(p) for p in method.parameters()}  # trained and checkpointed with the method
    assert not peer_ids & {id(p) for p in student.parameters()}


def test_dml_forward_trains_both_networks_each_on_its_own_objective():
    torch.manual_seed(0)
    student = MLP(4, [6], 3).double()
    method = DML()
    method.setup(outs(torch.zeros(2, 3)), None, info(student=student))
    x = torch.randn(4, 4, dtype=torch.float64)
    s = f64(S).requires_grad_(True)
    out = method(outs(s), None, batch_of([0, 1, 2, 3], x=x), ctx())
    with torch.no_grad():
        p = method.peer(x).numpy()
    assert out.terms["student"].item() == pytest.approx(np_ce(S, Y) + np_kl_t2(p, S, 1.0), rel=1e-10)
    assert out.terms["peer"].item() == pytest.approx(np_ce(p, Y) + np_kl_t2(S, p, 1.0), rel=1e-10)
    out.loss.backward()
    # the student's logits see only the student's own objective: the peer's KL target is detached
    expected = (np_softmax(S) - np_onehot(Y, 3)) / 4 + (np_softmax(S) - np_softmax(p)) / 4
    np.testing.assert_allclose(s.grad.numpy(), expected, rtol=1e-10)
    assert method.peer.head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------- born-again


def test_generation_recipes_chain_teachers_and_pick_the_ban_kd():
    base = tiny_recipe(method={"name": "pskd"}, teacher={"run": "elsewhere"})
    g0 = generation_recipe(base, 0, Path("out"))
    assert g0["method"] == {"name": "ce"} and "teacher" not in g0 and g0["seed"] == 0
    g2 = generation_recipe(base, 2, Path("out"))
    assert g2["method"] == BAN_KD == {"name": "kd", "alpha": 1.0, "temperature": 1.0}
    assert g2["teacher"] == {"run": str(Path("out") / "gen1")} and g2["seed"] == 2
    kd = tiny_recipe(method={"name": "kd", "alpha": 0.5, "temperature": 2.0})
    assert generation_recipe(kd, 1, Path("out"))["method"] == {"name": "kd", "alpha": 0.5, "temperature": 2.0}


def test_born_again_teaches_each_generation_with_the_previous_one(tmp_path, monkeypatch):
    monkeypatch.setattr("alambic.report.render_report", lambda out: None)  # plots are not under test here
    recipe = tiny_recipe(train={"epochs": 1, "batch_size": 64, "lr": 0.01, "log_every": 5})
    results = born_again(recipe, tmp_path / "ban", generations=3, progress=False)
    assert [r["generation"] for r in results] == [0, 1, 2]
    assert [r["method"] for r in results] == ["ce", "kd", "kd"]
    assert results[0]["teacher_fingerprint"] is None and results[0]["summary"]["teacher"] is None
    for k in (1, 2):
        previous, _ = load_student(tmp_path / "ban" / f"gen{k - 1}")
        assert results[k]["summary"]["teacher"]["fingerprint"] == state_fingerprint(previous)
        assert results[k]["test_accuracy"] == results[k]["summary"]["test"]["accuracy"]
    assert results[1]["teacher_fingerprint"] != results[2]["teacher_fingerprint"]
    listed = json.loads((tmp_path / "ban" / "born_again.json").read_text())
    assert [r["generation"] for r in listed] == [0, 1, 2] and "summary" not in listed[0]
    # resumable: a second call finds every generation finished and trains nothing
    stamp = (tmp_path / "ban" / "gen2" / "student.safetensors").stat().st_mtime_ns
    again = born_again(recipe, tmp_path / "ban", generations=3, progress=False)
    assert [r["summary"] for r in again] == [r["summary"] for r in results]
    assert (tmp_path / "ban" / "gen2" / "student.safetensors").stat().st_mtime_ns == stamp


def test_self_kd_methods_are_registered_with_papers():
    expected = {"pskd": (PSKD, "2006.12000"), "byot": (BYOT, "1905.08094"), "lsskd": (LSSKD, "2506.07055"),
                "dml": (DML, "1706.00384")}
    for name, (cls, arxiv) in expected.items():
        entry = METHODS.get(name)
        assert entry.obj is cls and entry.config is cls.Config
        assert arxiv in entry.paper
        assert cls.needs_teacher is False
