"""Faulty data is refused when the data is built (issue 9): non-finite inputs, bad labels, degenerate
datasets and files that are not .npz archives, each with one line naming the source and what to change."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from alambic.data.splits import build_data, bundle_from_arrays
from alambic.errors import AlambicError
from alambic.recipe.schema import DataSpec


def _npz(tmp_path, x, y, name="d.npz"):
    path = tmp_path / name
    np.savez(path, x=x, y=y)
    return path


def _build(path, **options):
    return build_data(DataSpec(name="npz", path=str(path), **options))


def _xy(n=60, classes=2, features=4):
    return np.random.default_rng(0).normal(size=(n, features)), np.arange(n) % classes


def _one_line(info) -> str:
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ----------------------------------------------------------------------------------------- non-finite x
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_in_an_npz_are_refused_naming_file_and_row(tmp_path, bad):
    x, y = _xy()
    x[13, 2] = bad
    x[40, 0] = bad
    path = _npz(tmp_path, x, y)
    with pytest.raises(AlambicError) as info:
        _build(path)
    msg = _one_line(info)
    assert str(path) in msg and "sample 13" in msg and "2 of 60 samples" in msg


def test_values_that_overflow_float32_are_refused(tmp_path):
    x, y = _xy()
    x[7, 0] = 1e300  # finite in float64, inf once cast to float32
    with pytest.raises(AlambicError, match="sample 7"):
        _build(_npz(tmp_path, x, y))


def test_non_finite_arrays_are_refused_by_bundle_from_arrays():
    x, y = _xy()
    x[5, 1] = np.nan
    with pytest.raises(AlambicError, match=r"bundle_from_arrays: x.*sample 5") as info:
        bundle_from_arrays(x, y)
    _one_line(info)


# ----------------------------------------------------------------------------------------------- labels
def test_non_integer_npz_labels_name_the_first_bad_row(tmp_path):
    x, y = _xy()
    y = y.astype(float)
    y[9] = 0.5
    with pytest.raises(AlambicError, match=r"labels must be integers.*sample 9") as info:
        _build(_npz(tmp_path, x, y))
    assert str(tmp_path / "d.npz") in _one_line(info)


def test_nan_npz_labels_name_the_first_bad_row(tmp_path):
    x, y = _xy()
    y = y.astype(float)
    y[11] = np.nan
    with pytest.raises(AlambicError, match=r"sample 11"):
        _build(_npz(tmp_path, x, y))


def test_npz_labels_outside_the_class_names_name_the_first_bad_row(tmp_path):
    x, y = _xy()
    y[17] = 5
    with pytest.raises(AlambicError, match=r"sample 17.*label 5.*0\.\.1") as info:
        _build(_npz(tmp_path, x, y), class_names=["a", "b"])
    _one_line(info)


# ------------------------------------------------------------------------------------ degenerate datasets
def test_a_one_class_dataset_is_refused():
    x, _ = _xy()
    with pytest.raises(AlambicError, match=r"only one class.*at least 2 classes") as info:
        bundle_from_arrays(x, np.zeros(len(x), int))
    _one_line(info)


def test_one_class_in_an_npz_names_the_file(tmp_path):
    x, _ = _xy()
    path = _npz(tmp_path, x, np.full(len(x), 3))
    with pytest.raises(AlambicError, match="only one class") as info:
        _build(path)
    assert str(path) in str(info.value)


def test_a_five_sample_dataset_says_how_many_samples_are_needed():
    x, y = _xy(5)
    with pytest.raises(AlambicError, match=r"5 samples.*at least 2") as info:
        bundle_from_arrays(x, y)
    _one_line(info)


def test_a_test_split_of_one_sample_is_refused():
    x, y = _xy(20)
    with pytest.raises(AlambicError, match=r"test split.*1 sample.*test_fraction") as info:
        bundle_from_arrays(x, y, test_fraction=0.05)
    _one_line(info)


def test_small_but_sufficient_datasets_still_build():
    b = bundle_from_arrays(*_xy(10))
    assert len(b.val) >= 2 and len(b.test) >= 2


# ------------------------------------------------------------------------------------------- bad files
def test_a_file_that_is_not_a_zip_is_not_a_valid_npz(tmp_path):
    path = tmp_path / "text.npz"
    path.write_text("x,y\n1,2\n")
    with pytest.raises(AlambicError, match=r"not a valid \.npz \(zip\) file") as info:
        _build(path)
    msg = _one_line(info)
    assert str(path) in msg and "pickle" not in msg


class _Boom:
    def __reduce__(self):
        return (open, ("/dev/null",))  # harmless, but proves the file would have run code if unpickled


def test_a_pickle_disguised_as_npz_is_never_unpickled(tmp_path, monkeypatch):
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps({"x": _Boom()}))
    calls = []
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(AlambicError, match=r"not a valid \.npz \(zip\) file"):
        _build(path)
    assert not calls


def test_a_single_npy_array_saved_as_npz_is_not_a_valid_npz(tmp_path):
    path = tmp_path / "one.npz"
    with open(path, "wb") as f:
        np.save(f, np.zeros((4, 2)))
    with pytest.raises(AlambicError, match=r"not a valid \.npz \(zip\) file"):
        _build(path)
