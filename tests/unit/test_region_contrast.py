"""``region_contrast`` through the paired batch: what is pooled, what is contrasted, what learns.

Expected values are computed with NumPy from the method's definition (CALICO's region-aware contrast in its
generic form: per-region scatter-means of both modalities, L2-normalised, same region = positive) on a hand-made
batch, never by calling the loss under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alambic.data.batch import INPUT, Batch
from alambic.data.paired import pair_key, region_key
from alambic.methods.base import StepContext
from alambic.methods.region_contrast import RegionContrast, RegionContrastConfig
from alambic.teachers.base import ModelOutput
from tests.unit.test_crossmodal_methods import (  # the same hand-made batch as SLidR's
    np_info_nce,
    paired_training,
    scene,
    unit,
    with_identity_projector,
)

D, H = 3, 2
PAIRS, REGIONS = pair_key(INPUT, "image"), region_key("image")
CTX = StepContext(step=0, epoch=0, total_steps=1, steps_per_epoch=1)


def expected(points, fmap, tau=0.07) -> float:
    """Regions of ``scene()``: (img 0, r 0) holds points 0, 1 of sample 0; (img 1, r 0) point 2 and (img 1, r 1)
    points 0, 1 of sample 1; sample 0's point 2 is unpaired and its region 1 has no point."""
    pix = fmap.transpose(0, 2, 3, 1)  # [I, H, W, D] the teacher's features, not normalised per pixel
    # regions with a paired point, in batch id order: (img 0, r 0), (img 1, r 0), (img 1, r 1)
    k = np.stack([points[0, [0, 1]].mean(0), points[1, 2], points[1, [0, 1]].mean(0)])
    q = np.stack([pix[0, 0].mean(0), pix[1, 0].mean(0), pix[1, 1].mean(0)])  # all pixels of those regions
    return np_info_nce(unit(k), unit(q), tau)


def method_on(points, fmap, config=None, grad: bool = False):
    """The method set up on the scene's shapes with an identity projector (so projected = the point features)."""
    teacher = {"image": ModelOutput(None, {"features.block1": torch.tensor(fmap)})}
    return with_identity_projector(RegionContrast(config or RegionContrastConfig()), points, teacher, grad)


def batch_of(pairs, regions) -> Batch:
    return Batch(views={INPUT: torch.zeros(2, 3, 2), "image": torch.zeros(2, 1, H, H)}, index=torch.arange(2),
                 extras={PAIRS: pairs, REGIONS: regions})


def test_region_means_over_the_paired_points_and_all_pixels_of_each_region_unique_across_the_batch():
    points, fmap, pairs, regions = scene()
    m, s, t, _ = method_on(points, fmap)
    out = m(s, t, batch_of(pairs, regions), CTX)
    assert out.loss.item() == pytest.approx(expected(points, fmap), rel=1e-9)
    # image 1's region 0 is not merged with image 0's (same local id); image 0's region 1 has no point: dropped
    assert out.monitors["regions"].item() == 3


def test_unpaired_points_take_no_part():
    points, fmap, pairs, regions = scene()
    m, s, t, pts = method_on(points, fmap, grad=True)
    loss = m(s, t, batch_of(pairs, regions), CTX).loss
    loss.backward()
    assert pts.grad[0, 2].abs().sum() == 0 and pts.grad[0, :2].abs().sum() > 0  # sample 0's point 2 has no pixel
    moved = points.copy()
    moved[0, 2] = [100.0, -3.0, 7.0]
    m2, s2, t2, _ = method_on(moved, fmap)
    assert m2(s2, t2, batch_of(pairs, regions), CTX).loss.item() == pytest.approx(loss.item(), rel=1e-12)


def test_positives_are_the_same_region_pairs_across_modalities():
    """Points carry exactly their region's (orthonormal) teacher feature: the loss vanishes at a low τ; pairing the
    same points with the other region's pixels makes it large."""
    e = np.eye(D)
    fmap = np.zeros((2, D, H, H))
    fmap[0, :, 0, :] = e[0][:, None]  # image 0, region 0
    fmap[0, :, 1, :] = e[1][:, None]  # image 0, region 1 (no point: dropped)
    fmap[1, :, 0, :] = e[1][:, None]  # image 1, region 0
    fmap[1, :, 1, :] = e[2][:, None]  # image 1, region 1
    points = np.stack([[2 * e[0], e[0], e[2]], [e[2], 3 * e[2], e[1]]])  # any scale: the region means are normalised
    _, _, pairs, regions = scene()
    m, s, t, _ = method_on(points, fmap, RegionContrastConfig(temperature=0.01))
    assert m(s, t, batch_of(pairs, regions), CTX).loss.item() < 1e-6
    swapped = pairs.clone()
    swapped[1, :, 1] = 1 - swapped[1, :, 1]  # image 1's points now paired with pixels of the other region
    assert m(s, t, batch_of(swapped, regions), CTX).loss.item() > 10


def test_the_teacher_side_is_a_constant_only_the_projector_and_the_student_learn():
    """One real training step: the frozen image network gets no gradient and keeps its weights and BatchNorm
    statistics (no decoder on it, unlike SLidR); the projector and the point network change."""
    method = RegionContrast()
    trainer, loader, encoder, before, student = paired_training(method)
    assert method.decoder is None and method.projector.fc.weight.shape == (6, 5)  # student 5 -> teacher block1 6
    projector0 = method.projector.fc.weight.detach().clone()
    student0 = student.point_head[1].weight.detach().clone()
    trainer.train_step(next(loader.epoch(0)), CTX)
    assert all(not q.requires_grad and q.grad is None for q in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert not encoder.training
    assert not torch.equal(method.projector.fc.weight, projector0)
    assert not torch.equal(student.point_head[1].weight, student0)
