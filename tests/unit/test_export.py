"""alambic.export: bit-exact safetensors round trips, actionable load errors, ONNX files checked against eager."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

from alambic.errors import AlambicError
from alambic.export import export_onnx, export_safetensors, load_weights
from alambic.export import onnx as onnx_export


class _Awkward(nn.Module):
    """Tied weights, a non-contiguous parameter, BatchNorm buffers (float and int64)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4, bias=False)
        self.head = nn.Linear(4, 4, bias=False)
        self.head.weight = self.embed.weight  # tied: two names, one storage
        self.transposed = nn.Parameter(torch.randn(3, 4).t())  # stride (1, 4)
        self.bn = nn.BatchNorm1d(4)


def _trained_awkward():
    torch.manual_seed(0)
    model = _Awkward()
    model.bn.train()
    model.bn(torch.randn(16, 4) * 3 + 1)  # running stats and num_batches_tracked move off their defaults
    return model


def test_safetensors_round_trip_is_bit_exact(tmp_path):
    model = _trained_awkward()
    path = export_safetensors(model, tmp_path / "sub" / "w.safetensors", metadata={"method": "kd"})
    fresh = _Awkward()
    load_weights(fresh, path)
    for key, value in model.state_dict().items():
        got = fresh.state_dict()[key]
        assert got.dtype == value.dtype, key
        assert torch.equal(got, value), key
    assert fresh.state_dict()["bn.num_batches_tracked"].item() == 1
    assert fresh.head.weight is fresh.embed.weight  # loading keeps the model's own tying
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    assert "alambic.digest" in header  # the integrity digest that load_weights checks (tests/unit/test_integrity.py)
    assert {k: v for k, v in header.items() if k != "alambic.digest"} == {"format": "pt", "method": "kd"}
    assert [p.name for p in path.parent.iterdir()] == ["w.safetensors"]  # no temp file left behind


def test_failed_export_leaves_existing_file_untouched(tmp_path):
    path = export_safetensors(nn.Linear(2, 2), tmp_path / "w.safetensors")
    before = path.read_bytes()
    with pytest.raises(AlambicError, match="str to str"):
        export_safetensors(nn.Linear(3, 3), path, metadata={"epochs": 3})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_load_weights_names_key_and_both_shapes(tmp_path):
    path = export_safetensors(nn.Sequential(nn.Linear(4, 3)), tmp_path / "w.safetensors")
    with pytest.raises(AlambicError) as err:
        load_weights(nn.Sequential(nn.Linear(5, 3)), path)
    assert "0.weight: file (3, 4) vs model (3, 5)" in str(err.value)
    assert "0.bias" not in str(err.value)  # the bias fits


def test_load_weights_names_missing_and_unexpected_keys(tmp_path):
    path = export_safetensors(nn.Sequential(nn.Linear(4, 3)), tmp_path / "w.safetensors")
    model = nn.Sequential(nn.Identity(), nn.Linear(4, 3))
    with pytest.raises(AlambicError) as err:
        load_weights(model, path)
    message = str(err.value)
    assert "missing keys: 1.bias, 1.weight" in message
    assert "unexpected keys: 0.bias, 0.weight" in message
    with pytest.raises(AlambicError, match="not found"):
        load_weights(model, tmp_path / "nope.safetensors")


# ---------------------------------------------------------------- ONNX


def _mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))


def _cnn():
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


@pytest.mark.parametrize("build", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_onnx_export_agrees_with_eager_on_other_batch_sizes(tmp_path, build):
    import onnxruntime as ort

    torch.manual_seed(0)
    model = build()
    if isinstance(model[1], nn.BatchNorm2d):
        model[1].running_mean.uniform_(-1, 1)  # non-trivial statistics, so a train-mode export would differ
        model[1].running_var.uniform_(0.5, 2)
    model.train()
    path = export_onnx(model, torch.randn(1, 1, 8, 8), tmp_path / "m.onnx")
    assert model.training  # mode restored

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 1, 8, 8)  # a batch size the exporter never saw
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4, rtol=1e-3)


class _Drifting(nn.Module):
    """Adds how often it has been called: the traced graph freezes the count, the eager model does not."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.linear(x) + float(self.calls)


def test_onnx_export_that_disagrees_with_eager_raises_and_removes_file(tmp_path):
    path = tmp_path / "m.onnx"
    with pytest.raises(AlambicError, match="max abs difference"):
        export_onnx(_Drifting(), torch.randn(2, 4), path)
    assert not path.exists()


def test_onnx_check_honours_atol(tmp_path, monkeypatch):
    # an eager reference shifted by 0.01 fails the default atol=1e-4 (as the drifting model shows) but is
    # inside atol=0.02; if atol were ignored this export would raise
    real = onnx_export._eager
    monkeypatch.setattr(onnx_export, "_eager", lambda model, x: real(model, x) + 0.01)
    assert export_onnx(_mlp(), torch.randn(3, 64), tmp_path / "m.onnx", atol=0.02).exists()


def test_onnx_without_the_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(AlambicError, match=r"pip install 'alambic\[onnx\]'"):
        export_onnx(_mlp(), torch.randn(2, 64), tmp_path / "m.onnx")
