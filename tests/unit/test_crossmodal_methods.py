"""``ppkt`` and ``slidr`` through the paired batch: what is pooled, what is contrasted, what learns.

Expected values are computed with NumPy from SLidR's equations (arXiv:2203.16258, §3) on a hand-made batch,
never by calling the losses under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alambic.data import RawData
from alambic.data.batch import INPUT, Batch
from alambic.data.loader import TensorLoader
from alambic.data.paired import PairedData, PairedLoader, pair_key, region_key
from alambic.data.splits import bundle
from alambic.errors import AlambicError
from alambic.methods.base import StepContext
from alambic.methods.ppkt import PPKT, PPKTConfig
from alambic.methods.slidr import SLidR, SLidRConfig
from alambic.models.pointnet import PointNet
from alambic.models.zoo import SmallCNN
from alambic.recipe.schema import TrainSpec
from alambic.teachers.base import ModelOutput
from alambic.teachers.frozen import FrozenTeacher
from alambic.train.loop import Trainer

D, H = 3, 2
PAIRS, REGIONS = pair_key(INPUT, "image"), region_key("image")
CTX = StepContext(step=0, epoch=0, total_steps=1, steps_per_epoch=1)


def np_info_nce(a, p, tau) -> float:
    logits = np.asarray(a) @ np.asarray(p).T / tau
    m = logits.max(1, keepdims=True)
    log_sm = logits - m - np.log(np.exp(logits - m).sum(1, keepdims=True))
    return float(-np.mean(np.diag(log_sm)))


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def scene(seed: int = 0):
    """Two 2x2 images, both with local superpixels 0 (top row) and 1 (bottom row); 3 points each.

    Sample 0: points 0, 1 -> superpixel 0 (pixels (0,0), (0,1)); point 2 unpaired; its superpixel 1 is empty.
    Sample 1: points 0, 1 -> superpixel 1; point 2 -> superpixel 0.
    """
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(2, 3, D))
    fmap = rng.normal(size=(2, D, H, H))
    pairs = torch.tensor([[[0, 0, 0], [1, 0, 1], [-1, -1, -1]],
                          [[0, 1, 0], [1, 1, 1], [2, 0, 0]]])
    regions = torch.tensor([[[0, 0], [1, 1]], [[0, 0], [1, 1]]])
    return points, fmap, pairs, regions


def expected_slidr(points, fmap, tau=0.07) -> float:
    p = unit(points)  # the 3D features are L2-normalised
    pix = unit(fmap.transpose(0, 2, 3, 1))  # decoded 2D features [I, H, W, D], per-pixel normalised
    k = np.stack([p[0, [0, 1]].mean(0), p[1, 2], p[1, [0, 1]].mean(0)])  # (img 0, sp 0), (img 1, sp 0), (img 1, sp 1)
    q = np.stack([pix[0, 0].mean(0), pix[1, 0].mean(0), pix[1, 1].mean(0)])  # all pixels of those superpixels
    return np_info_nce(k, q, tau)


def method_on(cls, config, points, fmap, grad: bool = False):
    """The method set up on the scene's shapes with an identity 1x1 decoder (so decoded = normalised fmap)."""
    m = cls(config)
    pts = torch.tensor(points, requires_grad=grad)
    student = {INPUT: ModelOutput(torch.zeros(2, 4, dtype=torch.float64), {"point_head": pts})}
    teacher = {"image": ModelOutput(None, {"features.block1": torch.tensor(fmap)})}
    m.setup(student, teacher, None)
    m.double()
    with torch.no_grad():
        m.decoder.conv.weight.copy_(torch.eye(D, dtype=torch.float64)[:, :, None, None])
        m.decoder.conv.bias.zero_()
    return m, student, teacher, pts


def batch_of(pairs, regions) -> Batch:
    return Batch(views={INPUT: torch.zeros(2, 3, 2), "image": torch.zeros(2, 1, H, H)}, index=torch.arange(2),
                 extras={PAIRS: pairs, REGIONS: regions})


def test_slidr_pools_paired_points_and_all_pixels_per_superpixel_with_ids_unique_across_the_batch():
    points, fmap, pairs, regions = scene()
    m, s, t, _ = method_on(SLidR, SLidRConfig(), points, fmap)
    out = m(s, t, batch_of(pairs, regions), CTX)
    assert out.loss.item() == pytest.approx(expected_slidr(points, fmap), rel=1e-9)
    # 3 superpixels: image 1's superpixel 0 is not merged with image 0's (same local id), image 0's 1 is dropped
    assert out.monitors["superpixels"].item() == 3


def test_slidr_ignores_unpaired_points():
    points, fmap, pairs, regions = scene()
    m, s, t, pts = method_on(SLidR, SLidRConfig(), points, fmap, grad=True)
    loss = m(s, t, batch_of(pairs, regions), CTX).loss
    loss.backward()
    assert pts.grad[0, 2].abs().sum() == 0 and pts.grad[0, :2].abs().sum() > 0  # sample 0's point 2 has no pixel
    moved = points.copy()
    moved[0, 2] = [100.0, -3.0, 7.0]
    m2, s2, t2, _ = method_on(SLidR, SLidRConfig(), moved, fmap)
    assert m2(s2, t2, batch_of(pairs, regions), CTX).loss.item() == pytest.approx(loss.item(), rel=1e-12)


def test_slidr_positives_are_the_same_superpixel_pairs():
    """Points carry exactly their superpixel's (orthonormal) pixel feature: the loss vanishes at a low τ; pairing
    the same points with the other superpixels makes it large."""
    e = np.eye(D)
    fmap = np.zeros((2, D, H, H))
    fmap[0, :, 0, :] = e[0][:, None]  # image 0, superpixel 0
    fmap[0, :, 1, :] = e[1][:, None]  # image 0, superpixel 1 (empty of points: dropped)
    fmap[1, :, 0, :] = e[1][:, None]  # image 1, superpixel 0
    fmap[1, :, 1, :] = e[2][:, None]  # image 1, superpixel 1
    points = np.stack([[e[0], e[0], e[2]], [e[2], e[2], e[1]]])
    _, _, pairs, regions = scene()
    m, s, t, _ = method_on(SLidR, SLidRConfig(temperature=0.01), points, fmap)
    assert m(s, t, batch_of(pairs, regions), CTX).loss.item() < 1e-6
    swapped = pairs.clone()
    swapped[1, :, 1] = 1 - swapped[1, :, 1]  # image 1's points now paired with pixels of the other superpixel
    assert m(s, t, batch_of(swapped, regions), CTX).loss.item() > 10


def test_ppkt_contrasts_the_drawn_points_with_their_own_pixels_and_the_draw_is_keyed_by_the_step():
    points, fmap, pairs, regions = scene()
    m, s, t, _ = method_on(PPKT, PPKTConfig(num_matches=4), points, fmap)
    batch = batch_of(pairs, regions)
    loss = m(s, t, batch, CTX).loss.item()
    # the 5 pairs as flat rows (sample · 3 + point) and (image, row, col); the same draw as the method's
    flat_p = np.array([0, 1, 3, 4, 5])
    flat_i = np.array([[0, 0, 0], [0, 0, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    idx = torch.randperm(5, generator=torch.Generator().manual_seed(CTX.step))[:4].numpy()
    k = unit(points.reshape(6, D))[flat_p[idx]]
    pix = unit(fmap.transpose(0, 2, 3, 1))
    q = pix[flat_i[idx, 0], flat_i[idx, 1], flat_i[idx, 2]]
    assert loss == pytest.approx(np_info_nce(k, q, 0.07), rel=1e-9)
    assert m(s, t, batch, CTX).loss.item() == loss  # resumed at this step: the same draw
    steps = {round(m(s, t, batch, StepContext(i, 0, 9, 9)).loss.item(), 9) for i in range(6)}
    assert len(steps) > 1  # other steps, other draws


def test_a_batch_without_pairs_is_one_line():
    points, fmap, _, _ = scene()
    m, s, t, _ = method_on(SLidR, SLidRConfig(), points, fmap)
    with pytest.raises(AlambicError, match="no pairing 'pair:input->image'"):
        m(s, t, Batch(views={INPUT: torch.zeros(2, 3, 2), "image": torch.zeros(2, 1, H, H)}, index=torch.arange(2)),
          CTX)


def with_identity_projector(m, points, teacher, grad: bool = False):
    """``m`` set up on a student whose ``point_head`` holds ``points`` and on ``teacher`` (view -> output), in
    float64, its projector set to the identity (so projected = the point features). Returns ``m``, the student
    outputs, the teacher outputs and the point tensor (a leaf with ``requires_grad=grad``)."""
    pts = torch.tensor(points, requires_grad=grad)
    student = {INPUT: ModelOutput(torch.zeros(2, 4, dtype=torch.float64), {"point_head": pts})}
    m.setup(student, teacher, None)
    m.double()
    with torch.no_grad():
        m.projector.fc.weight.copy_(torch.eye(pts.shape[-1], dtype=torch.float64))
        m.projector.fc.bias.zero_()
    return m, student, teacher, pts


def paired_training(method):
    """A trainer of ``method`` on 16 random 12-point clouds paired with random 8x8 images (4 random regions
    each): a 2-block CNN as the frozen teacher, a PointNet (point features of width 5) as the student.
    Returns the trainer, its loader, the teacher's encoder, the encoder's state before training and the student."""
    torch.manual_seed(0)
    n, p, size = 16, 12, 8
    rng = np.random.default_rng(0)
    raw = RawData(torch.rand(n, p, 2) * 2 - 1, torch.arange(n) % 2, ["a", "b"], "fp")
    rc = torch.from_numpy(rng.integers(0, size, size=(n, p, 2)))
    pairs = torch.cat([torch.arange(p).expand(n, p)[..., None], rc], dim=2)
    regions = torch.from_numpy(rng.integers(0, 4, size=(n, size, size)))
    paired = PairedData(raw, {"image": torch.rand(n, 1, size, size)}, {PAIRS: pairs, REGIONS: regions})
    data = bundle(raw, val_fraction=0.25, test_fraction=0.25, labeled_fraction=1.0, split_seed=0)
    loader = PairedLoader(TensorLoader(data.train, batch_size=8, seed=0), paired)
    encoder = SmallCNN(1, (size, size), [4, 6], 2)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    student = PointNet(2, 2, [8, 16], point_dim=5)
    trainer = Trainer(student, method, loader, TrainSpec(epochs=1, lr=0.05), teacher=FrozenTeacher(encoder),
                      progress=False)
    return trainer, loader, encoder, before, student


@pytest.mark.parametrize("cls", [PPKT, SLidR])
def test_only_the_decoder_and_the_student_learn_the_frozen_teacher_does_not(cls, tmp_path):
    """One real training step: the image encoder gets no gradient and keeps its weights and BatchNorm statistics;
    the 1x1 decoder and the point network change."""
    method = cls(cls.Config(num_matches=16) if cls is PPKT else cls.Config())
    trainer, loader, encoder, before, student = paired_training(method)
    decoder0 = method.decoder.conv.weight.detach().clone()
    student0 = student.point_head[1].weight.detach().clone()
    trainer.train_step(next(loader.epoch(0)), CTX)
    assert all(not q.requires_grad and q.grad is None for q in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # BatchNorm buffers too
    assert not encoder.training
    assert not torch.equal(method.decoder.conv.weight, decoder0)
    assert not torch.equal(student.point_head[1].weight, student0)


def test_a_cross_modal_teacher_is_checked_against_the_view_it_sees_not_the_students_input():
    from alambic.errors import ShapeMismatchError
    from alambic.run import _check_compatible

    data = bundle(RawData(torch.zeros(12, 5, 2), torch.arange(12) % 2, ["a", "b"], "fp"), val_fraction=0.25,
                  test_fraction=0.25, labeled_fraction=1.0, split_seed=0)
    _check_compatible(62, (1, 16, 16), data, "teacher.run T", seen=(1, 16, 16))  # other classes: fine
    with pytest.raises(ShapeMismatchError, match=r"teacher.run T: the teacher takes inputs \[1, 16, 16\], but the "
                                                 r"paired view it sees has samples of shape \[1, 32, 32\]"):
        _check_compatible(62, (1, 16, 16), data, "teacher.run T", seen=(1, 32, 32))
    with pytest.raises(ShapeMismatchError, match="predicts 62 classes"):  # not cross-modal: the data's own check
        _check_compatible(62, (5, 2), data, "teacher.run T")
