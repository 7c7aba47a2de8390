"""Probes of frozen features: extraction through taps, weighted kNN, linear probe, collapse monitors.

Expected values are computed by hand (math / NumPy) here, never by calling the function under test.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from alambic.errors import AlambicError, ShapeMismatchError
from alambic.eval.probes import (
    extract_features, knn_accuracy, knn_predict, linear_probe, output_entropy, representation_stats,
)


def close(actual, expected, rtol=1.3e-6, atol=1e-5) -> None:
    """Elementwise closeness (NumPy's, cheaper to import than torch.testing)."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol)


# --- kNN --------------------------------------------------------------------------------------------

def test_knn_votes_match_hand_computed_weights():
    # train: (1,0) class 0, (0,1) class 1, (1,1) class 1, (-1,0) class 1; scaled to check the normalisation
    train = torch.tensor([[2.0, 0.0], [0.0, 0.5], [3.0, 3.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 1])
    query = torch.tensor([[5.0, 0.0], [0.0, 3.0]])
    t = 0.5
    votes = knn_predict(train, labels, query, num_classes=2, k=2, temperature=t)
    # query (1,0): cosines 1, 0, 1/√2, −1 -> neighbours 0 (class 0) and 2 (class 1)
    # query (0,1): cosines 0, 1, 1/√2, 0  -> neighbours 1 and 2, both class 1
    expected = torch.tensor([
        [math.exp(1 / t), math.exp(1 / math.sqrt(2) / t)],
        [0.0, math.exp(1 / t) + math.exp(1 / math.sqrt(2) / t)],
    ])
    close(votes, expected, rtol=1e-5, atol=1e-6)
    # k beyond the training set: every sample votes (the (−1, 0) sample with weight e^{−1/T})
    all_votes = knn_predict(train, labels, query[:1], num_classes=2, k=100, temperature=t)
    close(
        all_votes,
        torch.tensor([[math.exp(1 / t), math.exp(0.0) + math.exp(1 / math.sqrt(2) / t) + math.exp(-1 / t)]]),
        rtol=1e-5, atol=1e-6,
    )
    # batching does not change anything
    close(knn_predict(train, labels, query, 2, k=2, temperature=t, batch_size=1), votes)


def test_knn_exclude_self_on_a_duplicated_set():
    # rows 0 and 1 are the same point with different labels; row 2 has cosine 0.6 with them
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.8]])
    y = torch.tensor([0, 1, 1])
    t = 0.5
    e1, e6 = math.exp(1 / t), math.exp(0.6 / t)
    loo = knn_predict(x, y, x, num_classes=2, k=2, temperature=t, exclude_self=True)
    expected = torch.tensor([[0.0, e1 + e6], [e1, e6], [e6, e6]])  # each row's own entry never votes
    close(loo, expected, rtol=1e-5, atol=1e-6)
    with_self = knn_predict(x, y, x, num_classes=2, k=2, temperature=t)
    close(with_self[:2], torch.tensor([[e1, e1], [e1, e1]]), rtol=1e-5, atol=1e-6)
    # k larger than the others: all other samples vote
    close(knn_predict(x, y, x, 2, k=50, temperature=t, exclude_self=True), expected,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(AlambicError, match="exclude_self"):
        knn_predict(x, y, x[:2], 2, exclude_self=True)


def test_knn_errors():
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 2])
    with pytest.raises(AlambicError, match=r"train_labels must be class ids in \[0, 2\)"):
        knn_predict(x, y, x, num_classes=2)
    with pytest.raises(ShapeMismatchError, match="feature dims"):
        knn_predict(x, y, torch.randn(2, 4), num_classes=3)
    with pytest.raises(ShapeMismatchError, match="train_labels"):
        knn_predict(x, y[:4], x, num_classes=3)


def test_knn_accuracy_separated_clusters_and_random_labels():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:4] * 10
    y_train, y_query = torch.randint(0, 4, (200,), generator=g), torch.randint(0, 4, (100,), generator=g)
    x_train = centers[y_train] + torch.randn(200, 8, generator=g)
    x_query = centers[y_query] + torch.randn(100, 8, generator=g)
    assert knn_accuracy(x_train, y_train, x_query, y_query, num_classes=4) == 1.0
    # random features and labels: about chance (1/10)
    x_train, x_query = torch.randn(500, 16, generator=g), torch.randn(500, 16, generator=g)
    y_train, y_query = torch.randint(0, 10, (500,), generator=g), torch.randint(0, 10, (500,), generator=g)
    assert knn_accuracy(x_train, y_train, x_query, y_query, num_classes=10) < 0.2


# --- linear probe -----------------------------------------------------------------------------------

def _imbalanced(n, g):
    """80% class 0; class 1 is shifted along dim 0. A tiny C zeroes the weights -> predicts class 0 only."""
    y = (torch.rand(n, generator=g) < 0.2).long()
    x = torch.randn(n, 5, generator=g)
    x[:, 0] += 4.0 * y
    return x, y


def test_linear_probe_chooses_c_on_val_and_never_on_test():
    g = torch.Generator().manual_seed(0)
    (xtr, ytr), (xva, yva), (xte, yte) = _imbalanced(400, g), _imbalanced(200, g), _imbalanced(200, g)
    grid = (1e-6, 1.0)
    result = linear_probe(xtr, ytr, xva, yva, xte, yte, num_classes=2, c_grid=grid)
    assert result["c"] == 1.0  # the tiny C underfits (majority class only) on val
    assert result["val_accuracy"] > 0.95 and result["test_accuracy"] > 0.95
    assert linear_probe(xtr, ytr, xva, yva, xte, yte, num_classes=2, c_grid=grid) == result  # deterministic

    permuted = yte[torch.randperm(len(yte), generator=g)]
    assert linear_probe(xtr, ytr, xva, yva, xte, permuted, c_grid=grid)["c"] == 1.0
    # test labels on which the tiny C would win (all majority class): still chosen on val
    majority = torch.zeros_like(yte)
    adversarial = linear_probe(xtr, ytr, xva, yva, xte, majority, c_grid=grid)
    assert adversarial["c"] == 1.0 and adversarial["test_accuracy"] < 1.0
    no_test = linear_probe(xtr, ytr, xva, yva, c_grid=grid)
    assert no_test["test_accuracy"] is None and no_test["c"] == 1.0

    # with the tiny C alone, val accuracy is the majority share: the underfit is real
    tiny = linear_probe(xtr, ytr, xva, yva, c_grid=(1e-6,))
    assert tiny["val_accuracy"] == pytest.approx((yva == 0).double().mean().item())
    with pytest.raises(AlambicError, match="both test_features and test_labels"):
        linear_probe(xtr, ytr, xva, yva, xte)


# --- extract_features -------------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.drop(self.body(x)))


def test_extract_features_eval_mode_tap_and_restore():
    torch.manual_seed(0)
    net = _Net()
    net.body(torch.randn(32, 4) * 3 + 1)  # give BatchNorm non-trivial running statistics
    net.train()
    net.head.eval()  # a submodule deliberately left in eval mode must stay so
    x = torch.randn(7, 4)
    reference = copy.deepcopy(net).eval()
    with torch.no_grad():
        manual, logits = reference.body(x), reference(x)
        # a train-mode forward differs (BatchNorm on batch statistics, dropout): eval mode matters here
        assert not torch.allclose(copy.deepcopy(net).body(x), manual, atol=1e-3)
    feats = extract_features(net, x, feature="body.2", batch_size=3)
    out = extract_features(net, x, batch_size=2)
    assert net.training and net.body[1].training and net.drop.training and not net.head.training  # restored
    assert feats.dtype == torch.float32 and feats.shape == (7, 6)
    close(feats, manual)
    close(out, logits)
    with pytest.raises(AlambicError, match="no submodule 'nope'"):
        extract_features(net, x, feature="body.nope")
    assert net.training and not net._forward_hooks and not net.body[2]._forward_hooks  # no hook left behind


def test_extract_features_flattens_token_outputs():
    net = nn.Sequential(nn.Linear(4, 5), nn.Unflatten(1, (5, 1)))
    feats = extract_features(net, torch.randn(3, 4), feature="1")
    assert feats.shape == (3, 5)


# --- collapse monitors ------------------------------------------------------------------------------

def test_representation_stats_collapsed_and_isotropic():
    collapsed = torch.randn(1, 16).repeat(100, 1)
    stats = representation_stats(collapsed)
    assert stats["feature_std"] == pytest.approx(0.0, abs=1e-7)
    assert stats["rank"] == pytest.approx(1.0, abs=1e-6)
    d = 64
    iso = representation_stats(torch.randn(4000, d, generator=torch.Generator().manual_seed(0)))
    assert iso["feature_std"] == pytest.approx(1 / math.sqrt(d), rel=0.1)
    assert 0.9 * d < iso["rank"] <= d
    # two orthogonal directions with equal energy: singular values (a, a) -> rank exactly 2
    two = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).repeat(10, 1)
    assert representation_stats(two)["rank"] == pytest.approx(2.0, rel=1e-6)


def test_output_entropy_values():
    k = 6
    stats = output_entropy(torch.zeros(5, k))
    assert stats == pytest.approx({"entropy": math.log(k), "mean_entropy": math.log(k), "max": math.log(k)})
    one_dim = torch.zeros(4, k)
    one_dim[:, 2] = 100.0  # every sample one-hot on the same dimension: both ≈ 0
    collapsed = output_entropy(one_dim)
    assert collapsed["entropy"] < 1e-6 and collapsed["mean_entropy"] < 1e-6
    diverse = torch.eye(k) * 100.0  # confident and spread: per-sample ≈ 0, batch mean uniform
    spread = output_entropy(diverse)
    assert spread["entropy"] < 1e-6 and spread["mean_entropy"] == pytest.approx(math.log(k), rel=1e-6)
    logits = np.array([[1.0, 2.0, 0.0], [0.5, -1.0, 2.0]])
    t = 2.0
    p = np.exp(logits / t) / np.exp(logits / t).sum(1, keepdims=True)
    expected_entropy = float((-(p * np.log(p)).sum(1)).mean())
    m = p.mean(0)
    got = output_entropy(torch.tensor(logits), temperature=t)
    assert got["entropy"] == pytest.approx(expected_entropy, rel=1e-12)
    assert got["mean_entropy"] == pytest.approx(float(-(m * np.log(m)).sum()), rel=1e-12)
