"""Fixed, seeded, stratified (or group-preserving) splits and the labelled fraction of the training split.

Comparisons between distillation methods only mean something on identical data, so the split is a pure
function of (labels, fractions, seed): numpy generators seeded explicitly, no Python hashing, no global
RNG. Each class is shuffled on its own and cut into test, val and train, so every split keeps the class
proportions. Semi-supervised recipes then hide the labels of all but ``labeled_fraction`` of each class
of the training split; a hidden label is replaced by ``IGNORE_INDEX`` in the :class:`Split` itself, so no
loss, teacher or callback can reach it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alambic.data.batch import IGNORE_INDEX
from alambic.data.sources import RawData, check_finite, fingerprint, normalize_labels
from alambic.errors import AlambicError, RecipeError
from alambic.registry import DATASETS

_SPLIT_STREAM, _LABEL_STREAM, _GROUP_STREAM = 0, 1, 2  # independent random streams derived from one user seed


@dataclass
class Split:
    """One in-memory split. ``index`` holds the stable sample ids (row numbers in the :class:`RawData`);
    ``y`` holds ``IGNORE_INDEX`` where ``labeled`` is False."""

    x: Tensor
    y: Tensor
    index: Tensor
    labeled: Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def subset(self, rows: Tensor) -> "Split":
        """The rows picked by a bool mask or an integer index tensor (ids travel with the rows)."""
        rows = torch.as_tensor(rows)
        return Split(self.x[rows], self.y[rows], self.index[rows], self.labeled[rows])

    def labeled_only(self) -> "Split":
        return self.subset(self.labeled)


@dataclass
class DataBundle:
    """The three splits of a dataset and what a model needs to know about them."""

    train: Split
    val: Split
    test: Split
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 8, 8)
    class_names: list[str]
    fingerprint: str  # raw content + split settings: same value <=> same samples in the same splits


def _rng(seed: int, stream: int) -> np.random.Generator:
    # SeedSequence wants non-negative entropy; the stream keeps split and label draws independent.
    return np.random.default_rng([int(seed) % 2**64, stream])


def _apportion(counts: np.ndarray, fraction: float, total: int) -> np.ndarray:
    """Per-class shares of ``total`` proportional to ``counts``: floor, then the remainder to the largest
    fractional parts (ties to the lower class id), so the shares sum to ``total`` exactly."""
    share = fraction * counts
    out = np.floor(share).astype(np.int64)
    rest = total - int(out.sum())
    if rest > 0:  # never negative: the sum of floors is at most floor(fraction * N) <= total
        order = np.argsort(-(share - out), kind="stable")
        out[order[:rest]] += 1
    return out


def _as_numpy_labels(y: Tensor | np.ndarray) -> np.ndarray:
    y = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    return y.astype(np.int64, copy=False).reshape(-1)


def stratified_split(
    y: Tensor | np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(train, val, test) int64 index tensors, each sorted, disjoint and together covering ``0..N-1``.

    Val and test get ``round(fraction * N)`` samples (at least 1 each), shared among the classes in
    proportion to their counts; each class is permuted with a generator seeded by ``seed`` alone, so the
    result is identical across processes and machines. A class keeps at least one training sample, so a
    class with a single sample appears only in train.
    """
    y = _as_numpy_labels(y)
    n = len(y)
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise AlambicError(
            f"split fractions must be in (0, 1) with a sum below 1, got val {val_fraction}, test {test_fraction}"
        )
    if n < 3:
        raise AlambicError(f"cannot split {n} samples into train, val and test (need at least 3)")
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    n_test = _apportion(counts, test_fraction, max(1, round(test_fraction * n)))
    n_val = _apportion(counts, val_fraction, max(1, round(val_fraction * n)))
    # keep >= 1 training sample per class: trim val first, then test
    over = np.maximum(n_test + n_val - (counts - 1), 0)
    cut = np.minimum(over, n_val)
    n_val -= cut
    n_test -= over - cut
    rng = _rng(seed, _SPLIT_STREAM)
    train, val, test = [], [], []
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(inverse == c))
        test.append(idx[: n_test[c]])
        val.append(idx[n_test[c] : n_test[c] + n_val[c]])
        train.append(idx[n_test[c] + n_val[c] :])
    as_t = lambda parts: torch.from_numpy(np.sort(np.concatenate(parts)).astype(np.int64))  # noqa: E731
    return as_t(train), as_t(val), as_t(test)


def group_split(
    groups: Tensor | np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(train, val, test) sorted int64 index tensors in which every group lies in exactly one split.

    The groups are shuffled by a generator seeded with ``seed`` alone; test takes the shortest prefix of
    that order whose sample count is nearest ``test_fraction * N``, val the next one, train keeps the rest
    (each split gets at least one group). Class balance is not enforced (every glyph font holds every class).
    """
    g = groups.detach().cpu().numpy() if isinstance(groups, Tensor) else np.asarray(groups)
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise AlambicError(
            f"split fractions must be in (0, 1) with a sum below 1, got val {val_fraction}, test {test_fraction}"
        )
    uniq, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
    if len(uniq) < 3:
        raise AlambicError(f"cannot hold out whole groups: {len(uniq)} group(s), need at least 3 (one per split)")
    order = _rng(seed, _GROUP_STREAM).permutation(len(uniq))
    n = len(g)

    def take(start: int, target: float, leave: int) -> int:
        cum = np.cumsum(counts[order[start:]])[: len(uniq) - start - leave]
        return start + 1 + int(np.argmin(np.abs(cum - target)))

    cut_test = take(0, test_fraction * n, leave=2)
    cut_val = take(cut_test, val_fraction * n, leave=1)
    where = np.empty(len(uniq), dtype=np.int64)
    where[order[:cut_test]], where[order[cut_test:cut_val]], where[order[cut_val:]] = 2, 1, 0
    split_of = where[inverse]
    train, val, test = (torch.from_numpy(np.flatnonzero(split_of == s).astype(np.int64)) for s in (0, 1, 2))
    return train, val, test


def labeled_mask(y: Tensor | np.ndarray, fraction: float, seed: int) -> Tensor:
    """[N] bool: which samples keep their label. Each class keeps ``round(fraction * count)`` labels, at
    least one; ``fraction == 1`` keeps all.

    The kept samples are a prefix of a per-class permutation that does not depend on ``fraction``, so for
    one seed the labelled set at 10% is contained in the labelled set at 20%: a sweep over label budgets
    adds labels instead of drawing a new set each time.
    """
    y = _as_numpy_labels(y)
    if not 0 < fraction <= 1:
        raise AlambicError(f"labeled_fraction must be in (0, 1], got {fraction}")
    mask = np.zeros(len(y), dtype=bool)
    if fraction >= 1:
        mask[:] = True
        return torch.from_numpy(mask)
    rng = _rng(seed, _LABEL_STREAM)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        keep = min(len(idx), max(1, round(fraction * len(idx))))
        mask[idx[:keep]] = True
    return torch.from_numpy(mask)


MIN_EVAL_SAMPLES = 2  # per val and test split: below it accuracy is 0 or 1 and ECE/NLL describe one sample


def bundle(
    raw: RawData, *, val_fraction: float, test_fraction: float, labeled_fraction: float, split_seed: int,
    source: str = "data",
) -> DataBundle:
    """Split a :class:`RawData` (whole groups per split when it has ``groups``); only train is partly labelled.

    Refused, with one line naming ``source`` (a file path or a dataset name): inputs holding NaN or inf (the
    first bad row is named), labels of only one class, and a val or test split of fewer than
    ``MIN_EVAL_SAMPLES`` samples.
    """
    check_finite(raw.x, source)
    present = torch.unique(raw.y)
    if len(present) < 2:
        only = f"label '{raw.class_names[int(present[0])]}'" if len(present) else "no label"
        raise AlambicError(f"{source}: all {len(raw)} samples have {only} (only one class): "
                           "a classifier needs at least 2 classes")
    if raw.groups is not None:
        tr, va, te = group_split(raw.groups, val_fraction, test_fraction, split_seed)
    else:
        tr, va, te = stratified_split(raw.y, val_fraction, test_fraction, split_seed)
    for name, rows, fraction in (("test", te, test_fraction), ("val", va, val_fraction)):
        if len(rows) < MIN_EVAL_SAMPLES:
            more = "more groups" if raw.groups is not None else "more samples"
            raise AlambicError(
                f"{source}: the {name} split holds {len(rows)} sample(s) ({len(raw)} samples, {name}_fraction "
                f"{fraction:g}); val and test need at least {MIN_EVAL_SAMPLES} samples each: "
                f"give {more} or raise {name}_fraction"
            )

    def make(rows: Tensor, labeled: Tensor | None = None) -> Split:
        y = raw.y[rows]
        if labeled is None:
            labeled = torch.ones(len(rows), dtype=torch.bool)
        else:
            y = torch.where(labeled, y, torch.full_like(y, IGNORE_INDEX))
        return Split(x=raw.x[rows], y=y, index=rows.clone(), labeled=labeled)

    settings: dict[str, Any] = dict(
        val_fraction=val_fraction, test_fraction=test_fraction, labeled_fraction=labeled_fraction, split_seed=split_seed
    )
    if raw.groups is not None:
        settings["split"] = f"groups:{fingerprint(raw.groups)}"
    return DataBundle(
        train=make(tr, labeled_mask(raw.y[tr], labeled_fraction, split_seed)),
        val=make(va),
        test=make(te),
        num_classes=raw.num_classes,
        input_shape=tuple(raw.x.shape[1:]),
        class_names=list(raw.class_names),
        fingerprint=hashlib.sha256(f"{raw.fingerprint}|{sorted(settings.items())}".encode()).hexdigest()[:16],
    )


def build_data(spec: Any) -> DataBundle:
    """The :class:`DataBundle` a ``data:`` recipe section (a :class:`~alambic.recipe.schema.DataSpec`) describes.

    A spec that did not go through the recipe loader has its options validated here against the dataset's
    ``Config``, so ``build_data(DataSpec(name="npz", path="a.npz"))`` works from Python too.
    """
    try:
        entry = DATASETS.get(spec.name)
    except KeyError as e:
        raise RecipeError(f"data.name: {e.args[0]}") from None
    options = getattr(spec, "_options", None)
    if options is None:
        from pydantic import ValidationError

        try:
            options = entry.config.model_validate(spec.raw_options())
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise RecipeError(f"data.{loc}: {err['msg']}") from None
    raw = entry.obj(options)
    path = getattr(options, "path", None)
    return bundle(
        raw,
        val_fraction=spec.val_fraction,
        test_fraction=spec.test_fraction,
        labeled_fraction=spec.labeled_fraction,
        split_seed=spec.split_seed,
        source=str(path) if path is not None else f"dataset '{spec.name}'",
    )


def bundle_from_arrays(
    x: Tensor | np.ndarray,
    y: Tensor | np.ndarray,
    *,
    val_fraction: float = 0.15,
    test_fraction: float = 0.2,
    labeled_fraction: float = 1.0,
    split_seed: int = 0,
    class_names: list[str] | None = None,
) -> DataBundle:
    """A :class:`DataBundle` from in-memory arrays (the Python API). ``x`` is cast to float32 as is (scale
    it yourself); labels are normalised as in :func:`~alambic.data.sources.normalize_labels`."""
    xn = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    yn = y.detach().cpu().numpy() if isinstance(y, Tensor) else np.asarray(y)
    if xn.ndim < 1 or yn.ndim < 1 or xn.shape[0] != yn.shape[0]:
        raise AlambicError(f"bundle_from_arrays: x {xn.shape} and y {yn.shape} must have the same number of samples")
    if xn.ndim == 1:
        xn = xn[:, None]
    if np.any(yn == IGNORE_INDEX):
        raise AlambicError(
            f"bundle_from_arrays: y holds IGNORE_INDEX ({IGNORE_INDEX}); pass every true label and hide some "
            "with labeled_fraction (the split must be stratified on real labels)"
        )
    yn, names = normalize_labels(yn, class_names, "bundle_from_arrays")
    xn = np.ascontiguousarray(xn, dtype=np.float32)
    fp = fingerprint(xn, yn, classes=names, source="arrays")
    raw = RawData(torch.from_numpy(xn), torch.from_numpy(yn), names, fp)
    return bundle(
        raw,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        labeled_fraction=labeled_fraction,
        split_seed=split_seed,
        source="bundle_from_arrays: x",
    )
