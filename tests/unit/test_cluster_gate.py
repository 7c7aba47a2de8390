"""cluster_gate (DLG-LC stage 2): k-means pseudo-labels of a frozen encoder through a GMM loss gate."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from alambic.data.batch import INPUT
from alambic.data.loader import TensorLoader, WithoutLabels
from alambic.data.splits import Split
from alambic.methods.base import SetupInfo, StepContext
from alambic.methods.cluster_gate import ClusterGate, ClusterGateConfig
from alambic.methods.kmeans_pseudo import kmeans_labels
from alambic.models.zoo import MLP
from alambic.teachers.base import ModelOutput
from alambic.models.taps import Taps
from alambic.teachers.frozen import FrozenTeacher, model_outputs


def _setup(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(3, 6, generator=g) * 4
    x = centers[torch.arange(n) % 3] + 0.3 * torch.randn(n, 6, generator=g)
    split = Split(x, torch.arange(n) % 3, torch.arange(n) + 100, torch.ones(n, dtype=torch.bool))
    loader = WithoutLabels(TensorLoader(split, 16, shuffle=True, seed=0))
    torch.manual_seed(0)
    encoder, student = MLP(6, [8], 3), MLP(6, [8], 3)
    teacher = FrozenTeacher(encoder)
    method = ClusterGate(ClusterGateConfig(teacher_feature="body", feature="body", n_clusters=3, n_init=2))
    method.use_views([INPUT])
    method.wrap_student(student, x[:2], "mlp")
    teacher.use_taps(method.teacher_taps())
    taps = Taps(student, method.student_taps()).attach()
    probe = next(iter(loader.epoch(0)))
    s_out = model_outputs(student, probe, [INPUT], taps)
    info = SetupInfo(student, 3, 160, len(loader), 2, loader=loader, teacher=teacher)
    method.setup(s_out, None, info)
    return method, teacher, student, taps, loader, split


def test_pseudo_labels_are_kmeans_of_the_frozen_encoder_keyed_by_stable_index():
    method, teacher, _, _, loader, split = _setup()
    ids = torch.cat([b.index for b in loader.epoch(0)])  # setup embeds the samples in epoch 0's order
    rows = ids - 100
    with torch.no_grad():
        feats = teacher.model.body(split.x[rows])
    expected = kmeans_labels(feats.double().numpy(), 3, 0, 2, normalize=True)
    assert torch.equal(method.pseudo[ids], torch.from_numpy(expected))
    assert len(set(expected.tolist())) == 3
    assert (method.pseudo[:100] == -1).all()  # ids that are not training samples get no label
    assert method.pseudo.shape == (160,)


def test_gate_keeps_pseudo_labels_below_it_and_corrects_the_rest():
    method, teacher, student, taps, loader, _ = _setup()
    batch = next(iter(loader.epoch(0)))
    assert batch.target is None  # no label reaches the method
    out = {INPUT: ModelOutput(None, {"body": student.body(student.flatten(batch.input))})}
    logits = method.classifier(out[INPUT].features["body"])
    pseudo = method.pseudo[batch.index]
    ctx = StepContext(0, 0, 10, 4)
    loss_open = method(out, None, batch, ctx).loss  # epoch 0: gate +inf, every pseudo-label used
    assert math.isclose(loss_open.item(), F.cross_entropy(logits, pseudo).item(), rel_tol=1e-6)
    method.gate.fill_(-math.inf)  # everything above the gate: label correction trains on the arg-max
    loss_closed = method(out, None, batch, ctx).loss
    assert math.isclose(loss_closed.item(), F.cross_entropy(logits, logits.argmax(-1)).item(), rel_tol=1e-6)
    assert (method.sample_seen[batch.index]).all()  # this epoch's losses were recorded for the next gate
