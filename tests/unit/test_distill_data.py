"""Distillation through data (alambic.distill_data): the mechanisms, each on a case whose answer is known.

KRR-ST (Lee et al. 2024, arXiv:2310.06511): gradients reach the synthetic images and targets, never the teacher;
the outer loss is the closed-form KRR error with λ = 1e-6 tr(K_ss); the model pool resets on schedule (not the
official code's every-draw reset). Random subset: class-balanced and seeded. Herding: the greedy mean-matching
order on a hand-made case. DM: the squared distance of class mean embeddings. Sets round-trip through their file
and a damaged one is refused.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from alambic.distill_data.context import Context
from alambic.distill_data.dm import DM, DMConfig
from alambic.distill_data.herding import (
    herding_order,
    kcenter_order,
    per_class_selection,
)
from alambic.distill_data.krr_st import KRRST, KRRSTConfig
from alambic.distill_data.networks import derived_seed, fresh
from alambic.distill_data.pool import ModelPool
from alambic.distill_data.random_subset import class_balanced_subset
from alambic.distill_data.synthetic_set import (
    SET_FILE,
    SetTargetsTeacher,
    SyntheticSet,
    load_set,
    save_set,
    train_on_set,
)
from alambic.errors import AlambicError, IntegrityError
from alambic.losses import distribution_matching_loss


def tiny_net(out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, out_dim))


def tiny_context(teacher=None, per_class: int = 2, n_per_class: int = 6, classes: int = 3, seed: int = 0) -> Context:
    g = torch.Generator().manual_seed(123)
    x = torch.rand(classes * n_per_class, 1, 4, 4, generator=g)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return Context(x=x, y=y, ids=torch.arange(len(y)) + 100, num_classes=classes, per_class=per_class, seed=seed,
                   teacher=teacher, network=tiny_net, device=torch.device("cpu"), feature="2")


class FrozenRep(nn.Module):
    """A tiny 'self-supervised teacher': eval mode, no gradients, as alambic.distill_data.build wraps a run."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 5), nn.Tanh())
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)

    def __call__(self, x):
        with torch.no_grad():
            return self.net(x)


# -- KRR-ST -------------------------------------------------------------------------------------------------
def test_krr_st_moves_synthetic_images_and_targets_and_never_the_teacher():
    teacher = FrozenRep()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    d = KRRST(tiny_context(teacher), KRRSTConfig(steps=3, num_models=2, max_age=4, real_batch=8))
    x0, y0 = d.x_syn.detach().clone(), d.y_syn.detach().clone()
    assert torch.equal(y0, teacher(x0))  # Y_s starts as the teacher's representation of X_s (real images)
    d.step(0)
    assert d.x_syn.grad is not None and d.x_syn.grad.abs().sum() > 0
    assert d.y_syn.grad is not None and d.y_syn.grad.abs().sum() > 0
    assert not torch.equal(d.x_syn.detach(), x0) and not torch.equal(d.y_syn.detach(), y0)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training


def test_krr_st_step_is_the_closed_form_loss_with_the_detached_ridge(monkeypatch):
    import alambic.distill_data.krr_st as krr_module

    seen = {}
    real = krr_module.krr_st_loss

    def spy(f_s, y_s, f_r, y_r, ridge, bias):
        seen.update(f_s=f_s.detach().numpy(), y_s=y_s.detach().numpy(), f_r=f_r.numpy(), y_r=y_r.numpy(),
                    ridge=ridge, bias=bias)
        return real(f_s, y_s, f_r, y_r, ridge, bias)

    monkeypatch.setattr(krr_module, "krr_st_loss", spy)
    d = KRRST(tiny_context(FrozenRep()), KRRSTConfig(steps=2, num_models=2, max_age=4, real_batch=8))
    loss = d.step(0)["loss"]
    assert seen["ridge"] == 1e-6 and seen["bias"] is True  # the paper's λ = 1e-6 · tr(K_ss)
    one = lambda a: np.hstack([a, np.ones((len(a), 1))])
    fs, fr = one(seen["f_s"]), one(seen["f_r"])
    k_ss = fs @ fs.T
    pred = fr @ fs.T @ np.linalg.solve(k_ss + 1e-6 * np.trace(k_ss) * np.eye(len(fs)), seen["y_s"])
    np.testing.assert_allclose(loss, np.mean((pred - seen["y_r"]) ** 2), rtol=1e-9)


def test_krr_st_pool_weights_get_no_gradient_from_the_outer_loss():
    d = KRRST(tiny_context(FrozenRep()), KRRSTConfig(steps=2, num_models=1, max_age=50, real_batch=8))
    d.pool.warm_up(d.x_syn.detach(), d.y_syn.detach(), torch.Generator().manual_seed(0))
    d.warmed = True
    model = d.pool.models[0]
    for p in model.parameters():
        p.grad = None
    d.pool.update = lambda slot, x, y: 0.0  # the outer step alone
    d.step(0)
    assert all(p.grad is None for p in model.parameters())


# -- the model pool ---------------------------------------------------------------------------------------
def test_pool_resets_on_schedule_and_trains_the_fresh_model():
    torch.manual_seed(0)
    x, y = torch.rand(6, 1, 4, 4), torch.rand(6, 3)
    pool = ModelPool(lambda: tiny_net(3), size=2, max_age=3, seed=5, lr=0.05)
    ages, resets, weights = [], [], []
    for _ in range(8):
        pool.update(0, x, y)
        ages.append(pool.ages[0])
        resets.append(pool.resets[0])
        weights.append(pool.models[0][1].weight.detach().clone())
    assert ages == [1, 2, 3, 1, 2, 3, 1, 2]
    assert resets == [0, 0, 0, 1, 1, 1, 2, 2]
    # the official bug (counter never set back to 0) would re-initialise on every draw after the first reset,
    # never training the model: here consecutive updates after a reset change the weights by one SGD step
    assert not torch.equal(weights[3], weights[4])
    assert pool.ages[1] == 0 and pool.resets[1] == 0  # the other slot was never touched
    # the model after the first reset is a fresh build seeded by (seed, slot, resets=1), trained one step
    ref = fresh(lambda: tiny_net(3), derived_seed(5, "pool", 0, 1))
    opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt.zero_grad()
    nn.functional.mse_loss(ref(x), y).backward()
    opt.step()
    assert torch.allclose(weights[3], ref[1].weight.detach(), atol=0, rtol=0)


def test_pool_warm_up_staggers_ages_below_the_limit_and_state_round_trips():
    x, y = torch.rand(6, 1, 4, 4), torch.rand(6, 3)
    pool = ModelPool(lambda: tiny_net(3), size=6, max_age=10, seed=1)
    pool.warm_up(x, y, torch.Generator().manual_seed(3))
    assert all(1 <= a < 10 for a in pool.ages) and len(set(pool.ages)) > 1
    pool.update(2, x, y)
    tensors, meta = pool.state()
    tensors = {k: v.clone() for k, v in tensors.items()}  # as a checkpoint file would hand them back
    other = ModelPool(lambda: tiny_net(3), size=6, max_age=10, seed=1)
    other.load_state(tensors, json.loads(json.dumps(meta)))
    assert other.ages == pool.ages and other.resets == pool.resets
    for a, b in zip(pool.models, other.models):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    pool.update(2, x, y)
    other.update(2, x, y)  # the optimiser's momentum came back too
    assert torch.equal(pool.models[2][1].weight, other.models[2][1].weight)


# -- random subset, herding, k-center ---------------------------------------------------------------------
def test_random_subset_is_class_balanced_seeded_and_within_class():
    y = torch.tensor([0] * 7 + [1] * 4 + [2] * 9)
    rows = class_balanced_subset(y, 3, seed=0)
    assert torch.bincount(y[rows]).tolist() == [3, 3, 3]
    assert len(set(rows.tolist())) == 9
    assert torch.equal(rows, class_balanced_subset(y, 3, seed=0))
    assert any(not torch.equal(rows, class_balanced_subset(y, 3, seed=s)) for s in (1, 2, 3))
    with pytest.raises(AlambicError, match="class 1 has 4"):
        class_balanced_subset(y, 5, seed=0)


def test_herding_picks_the_greedy_mean_matching_order():
    # mean 5.04: first 5.2 (nearest the mean); then 4 (mean 4.6, off 0.44) rather than 6 (5.6, off 0.56), although
    # 6 is nearer the mean than 4; then 6 (5.067); then 0 (3.8) before 10 (6.3)
    phi = torch.tensor([[0.0], [10.0], [4.0], [6.0], [5.2]])
    assert herding_order(phi, 5).tolist() == [4, 2, 3, 0, 1]
    by_distance = torch.argsort((phi - phi.mean(0)).abs().flatten()).tolist()
    assert by_distance[:3] == [4, 3, 2]  # not the same thing
    # per class, on the class's rows, ids in the whole split
    y = torch.tensor([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    feats = torch.zeros(10, 1)
    feats[y == 1] = phi
    feats[y == 0] = phi + 100
    rows = per_class_selection(feats, y, 2, "herding", normalize=False)
    assert rows.tolist() == [9, 5, 8, 4]


def test_kcenter_starts_at_the_mean_then_goes_farthest():
    phi = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 6.0], [0.2, 0.1]])
    assert kcenter_order(phi, 3).tolist()[0] == 1  # mean (2.24, 1.22): row 1 is nearest
    assert kcenter_order(phi, 3).tolist() == [1, 2, 3]


# -- DM -------------------------------------------------------------------------------------------------------
def test_dm_loss_is_the_squared_distance_of_class_mean_embeddings():
    rng = np.random.default_rng(0)
    er, es = rng.normal(size=(12, 4)), rng.normal(size=(6, 4))
    yr, ys = np.array([0, 1, 2] * 4), np.array([0, 0, 1, 1, 2, 2])
    want = sum(np.sum((er[yr == c].mean(0) - es[ys == c].mean(0)) ** 2) for c in range(3))
    emb_s = torch.tensor(es, requires_grad=True)
    emb_r = torch.tensor(er, requires_grad=True)
    loss = distribution_matching_loss(emb_r, torch.tensor(yr), emb_s, torch.tensor(ys))
    np.testing.assert_allclose(loss.item(), want, rtol=1e-12)
    loss.backward()
    assert emb_r.grad is None and emb_s.grad.abs().sum() > 0
    # identical class means: zero
    assert distribution_matching_loss(torch.tensor(er), torch.tensor(yr), torch.tensor(er), torch.tensor(yr)) == 0


def test_dm_step_moves_only_the_synthetic_images_and_keeps_their_labels():
    d = DM(tiny_context(), DMConfig(steps=2, real_batch=4, shift=0.25))
    x0 = d.images.detach().clone()
    assert d.labels.tolist() == [0, 0, 1, 1, 2, 2]
    d.step(0)
    assert not torch.equal(d.images.detach(), x0)
    images, labels, targets, _ = d.result()
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and targets is None and images.shape == x0.shape


# -- the set file -------------------------------------------------------------------------------------------
def _set() -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    return SyntheticSet(torch.rand(4, 1, 2, 2, generator=g), torch.tensor([0, 0, 1, 1]),
                        torch.rand(4, 3, generator=g), {"method": "test", "data_fingerprint": "abc"})


def test_a_set_round_trips_through_its_file(tmp_path):
    s = _set()
    save_set(s, tmp_path / "s")
    back = load_set(tmp_path / "s")
    assert torch.equal(back.images, s.images) and torch.equal(back.labels, s.labels)
    assert torch.equal(back.targets, s.targets) and back.meta["method"] == "test"
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["size"] == 4 and manifest["per_class"] == [2, 2] and len(manifest["sha256"]) == 64


def test_a_damaged_set_is_refused(tmp_path):
    s = _set()
    save_set(s, tmp_path / "s")
    path = tmp_path / "s" / SET_FILE
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # a flipped bit in the last tensor's bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="damaged"):
        load_set(tmp_path / "s")
    save_set(s, tmp_path / "t")
    manifest = tmp_path / "t" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["sha256"] = "0" * 64
    manifest.write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="sha256"):
        load_set(tmp_path / "t")
    with pytest.raises(AlambicError, match="no such folder"):
        load_set(tmp_path / "nothing")


def test_train_on_set_swaps_only_the_training_split_and_checks_the_data(tmp_path, digits):
    x = digits.train.x[:20].clone()
    s = SyntheticSet(x, digits.train.y[:20].clone(), torch.rand(20, 3),
                     {"data_fingerprint": digits.fingerprint})
    save_set(s, tmp_path / "s")
    swapped = train_on_set(digits, tmp_path / "s")
    assert torch.equal(swapped.train.x, x) and swapped.train.index.tolist() == list(range(20))
    assert swapped.val is digits.val and swapped.test is digits.test
    assert swapped.fingerprint != digits.fingerprint
    s.meta["data_fingerprint"] = "another"
    save_set(s, tmp_path / "other")
    with pytest.raises(AlambicError, match="distilled from data another"):
        train_on_set(digits, tmp_path / "other")
    teacher = SetTargetsTeacher.from_folder(tmp_path / "s")
    from alambic.data.batch import Batch

    out = teacher.outputs(Batch({"input": x[[3, 1]]}, torch.tensor([3, 1])), ["input"])
    assert torch.equal(out["input"].logits, s.targets[[3, 1]])
    with pytest.raises(AlambicError, match="not this set"):
        teacher.outputs(Batch({"input": x[[1, 3]]}, torch.tensor([3, 1])), ["input"])
