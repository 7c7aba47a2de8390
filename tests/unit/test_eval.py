"""alambic.eval: exact metric values on hand-computed tensors, mode/thread restoration."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alambic.errors import AlambicError, ShapeMismatchError
from alambic.eval import (
    accuracy,
    agreement,
    cpu_latency_ms,
    expected_calibration_error,
    nll,
    parameter_count,
    predict,
    reliability_bins,
    size_on_disk,
)
from alambic.export import export_safetensors

# Five two-class samples given by their probabilities (logits = log p, so softmax(logits) = p).
# confidence (max p) / prediction / target / correct:
#   0.95 -> 0, target 0, correct
#   0.85 -> 0, target 1, wrong
#   0.70 -> 1, target 1, correct
#   0.65 -> 0, target 0, correct
#   0.55 -> 1, target 0, wrong
PROBS = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.30, 0.70], [0.65, 0.35], [0.45, 0.55]], dtype=torch.float64)
LOGITS = PROBS.log()
TARGET = torch.tensor([0, 1, 1, 0, 0])


def test_accuracy_counts_argmax_hits():
    assert accuracy(LOGITS, TARGET) == pytest.approx(3 / 5)


def test_ece_matches_hand_computation():
    # 5 bins: (0,.2] (.2,.4] (.4,.6] (.6,.8] (.8,1]
    #   bin (.4,.6]: {0.55 wrong}          acc 0,  conf 0.55  -> 1/5 * 0.55  = 0.11
    #   bin (.6,.8]: {0.70 ok, 0.65 ok}    acc 1,  conf 0.675 -> 2/5 * 0.325 = 0.13
    #   bin (.8,1]:  {0.95 ok, 0.85 wrong} acc .5, conf 0.90  -> 2/5 * 0.40  = 0.16
    # ECE = 0.11 + 0.13 + 0.16 = 0.40
    assert expected_calibration_error(LOGITS, TARGET, n_bins=5) == pytest.approx(0.40, abs=1e-12)
    bins = reliability_bins(LOGITS, TARGET, n_bins=5)
    assert bins["count"] == [0, 0, 1, 2, 2]
    assert bins["accuracy"][2:] == pytest.approx([0.0, 1.0, 0.5])
    assert bins["confidence"][2:] == pytest.approx([0.55, 0.675, 0.90])
    assert math.isnan(bins["accuracy"][0]) and math.isnan(bins["confidence"][1])
    # one bin: |acc - mean conf| = |0.6 - 0.74|
    assert expected_calibration_error(LOGITS, TARGET, n_bins=1) == pytest.approx(0.14, abs=1e-12)


def test_ece_bin_edges_follow_guo_intervals():
    # confidence exactly 1.0 lands in the last bin; exactly 0.5 in the lower of the bins sharing that edge
    logits = torch.tensor([[100.0, 0.0], [0.0, 0.0]])
    bins = reliability_bins(logits, torch.tensor([0, 0]), n_bins=2)
    assert bins["count"] == [1, 1]
    assert bins["confidence"] == [0.5, 1.0]


def _reference_ece(logits, target, n_bins):
    """Loop over bins with the paper's interval definition, independent of the vectorised code."""
    prob = logits.double().softmax(1)
    conf, pred = prob.max(1)
    total = 0.0
    for m in range(1, n_bins + 1):
        lo, hi = (m - 1) / n_bins, m / n_bins
        members = [i for i in range(len(conf)) if lo < conf[i].item() <= hi]
        if members:
            acc = sum(float(pred[i] == target[i]) for i in members) / len(members)
            avg = sum(conf[i].item() for i in members) / len(members)
            total += len(members) / len(conf) * abs(acc - avg)
    return total


def test_ece_matches_reference_on_random_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 7, generator=g) * 3
    target = torch.randint(0, 7, (200,), generator=g)
    for n_bins in (1, 10, 15):
        assert expected_calibration_error(logits, target, n_bins) == pytest.approx(
            _reference_ece(logits, target, n_bins), abs=1e-12
        )


def test_nll_is_mean_negative_log_prob_of_target():
    expected = -(math.log(0.95) + math.log(0.15) + math.log(0.70) + math.log(0.65) + math.log(0.45)) / 5
    assert nll(LOGITS, TARGET) == pytest.approx(expected, abs=1e-12)


def test_agreement_is_fraction_of_equal_top1():
    a = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]])  # top-1: 0 1 2 1
    b = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 0]])  # top-1: 0 2 2 0
    assert agreement(a, b) == 0.5
    assert agreement(a, a) == 1.0


def test_metrics_reject_bad_shapes():
    with pytest.raises(ShapeMismatchError, match=r"\[5\]"):
        accuracy(LOGITS, TARGET[:4])
    with pytest.raises(ShapeMismatchError):
        agreement(LOGITS, LOGITS[:, :1])
    with pytest.raises(AlambicError, match="empty"):
        expected_calibration_error(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))


class _Probe(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.dropout = nn.Dropout(p=0.9)
        self.frozen_bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.frozen_bn(self.dropout(self.linear(x)))


def test_predict_disables_dropout_and_restores_each_module_mode():
    torch.manual_seed(0)
    model = _Probe().train()
    model.frozen_bn.eval()  # a deliberately frozen BatchNorm inside a training model must stay frozen
    x = torch.randn(10, 4)
    out = predict(model, [x[:4], x[4:]])
    assert out.shape == (10, 3) and not out.requires_grad
    model.eval()
    expected = model(x).detach()
    model.train()
    model.frozen_bn.eval()
    torch.testing.assert_close(out, expected)  # deterministic: dropout was off
    torch.testing.assert_close(predict(model, [x]), out)
    assert model.training and model.linear.training and model.dropout.training
    assert not model.frozen_bn.training


def test_predict_restores_mode_after_an_error():
    model = nn.Sequential(nn.Linear(4, 3)).train()
    with pytest.raises(RuntimeError):
        predict(model, [torch.randn(2, 5)])
    assert model.training


def test_parameter_count_counts_shared_parameters_once():
    shared = nn.Linear(3, 3)  # 12 parameters
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.BatchNorm1d(3))  # + 6 (BN weight, bias)
    assert parameter_count(model) == 18


def test_size_on_disk_equals_exported_file_size(tmp_path):
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    path = export_safetensors(model, tmp_path / "m.safetensors")
    assert size_on_disk(model) == path.stat().st_size


class _ThreadSpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append((torch.get_num_threads(), self.training, torch.is_grad_enabled(), x.shape[0]))
        return self.linear(x)


def test_cpu_latency_measures_under_requested_settings_and_restores_them():
    before = torch.get_num_threads()
    outer = 2 if before != 2 else 3
    torch.set_num_threads(outer)
    try:
        model = _ThreadSpy().train()
        ms = cpu_latency_ms(model, torch.randn(8, 4), batch_size=3, repeats=4, warmup=2, threads=1)
        assert ms > 0 and math.isfinite(ms)
        assert torch.get_num_threads() == outer
        assert model.training
        assert model.seen == [(1, False, False, 3)] * 6  # 2 warmup + 4 timed, batch of 3
    finally:
        torch.set_num_threads(before)
