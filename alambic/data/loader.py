"""Batches with stable sample indices, in an order that is a pure function of (seed, epoch).

A killed run resumes mid-epoch bit-identically only if the batches after the checkpoint are exactly the
ones the uninterrupted run would have seen. So the order of epoch ``e`` is drawn from a private
``torch.Generator`` seeded with ``(seed, e)`` and nothing else (the global RNG, which augmentations and
dropout consume, is never touched), and ``epoch(e, start=k)`` skips the first ``k`` batches without
drawing anything. :class:`TensorLoader` serves an in-memory :class:`~alambic.data.splits.Split` by direct
tensor indexing (no DataLoader, no per-sample Python); :class:`DatasetLoader` wraps any
``torch.utils.data.Dataset`` with the same semantics, in worker processes if asked.

Every data source of a recipe (digits, MNIST, npz, image folders, glyphs, text) is decoded once, into memory,
when the run starts, so recipe runs use :class:`TensorLoader` (or the text loader) and have no per-item work
for DataLoader workers to take over: workers would only add inter-process copies of rows already in memory.
Workers are for a ``torch.utils.data.Dataset`` that reads files per item (the Python API:
``make_loader(dataset, batch_size, num_workers=N)``). On a CUDA device the Trainer asks the loader for
page-locked batches (``train.pin_memory``): :class:`TensorLoader` gathers rows straight into pinned memory,
:class:`DatasetLoader` pins in DataLoader's pinning thread.

A partly labelled split can be served in *composed* batches (``labeled_per_batch=k``): every batch holds
``k`` labelled and ``batch_size - k`` unlabelled samples, as FixMatch's separate labelled and unlabelled
batches do (Sohn et al., "FixMatch", 2020, arXiv:2001.07685, Sec. 3 and Algorithm 1: B labelled and μB
unlabelled images per step). Drawn uniformly from a split with 5 % of labels, a batch of 64 holds about 3
labelled samples, so a loss averaged over the labelled rows is noisy and the labelled set is seen only
about as often as any other sample; composed batches fix the labelled share instead.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from alambic.data.batch import IGNORE_INDEX, INPUT, Batch
from alambic.data.splits import Split


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of one epoch; distinct (seed, epoch) pairs give distinct seeds for any sane range."""
    return (int(seed) * 1_000_003 + int(epoch)) % 2**63


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> Tensor:
    """[n] int64 positions in the order epoch ``epoch`` visits them."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def composed_count(unlabeled: int, batch_size: int, labeled_per_batch: int, drop_last: bool = False) -> int:
    """Batches in an epoch of composed batches: the unlabelled rows, ``batch_size - labeled_per_batch`` at a
    time (a last partial batch counts unless ``drop_last``)."""
    per = batch_size - labeled_per_batch
    if per < 1 or labeled_per_batch < 1:
        raise ValueError(f"labeled_per_batch must be in 1..batch_size-1 ({batch_size - 1}), got {labeled_per_batch}")
    return unlabeled // per if drop_last else math.ceil(unlabeled / per)


def composed_batches(labeled: Tensor, batch_size: int, labeled_per_batch: int, seed: int, epoch: int,
                     drop_last: bool = False) -> list[Tensor]:
    """Positions of each batch of epoch ``epoch`` when every batch holds ``labeled_per_batch`` labelled rows.

    ``labeled`` is the split's [N] bool mask. An epoch is one pass over the unlabelled rows in a seeded
    random order, ``batch_size - labeled_per_batch`` per batch (the last batch may hold fewer unless
    ``drop_last``); the labelled rows are spread evenly through each batch and are drawn from back-to-back random
    permutations of the labelled set, fresh each epoch, so within an epoch every labelled row is used
    either ⌊m⌋ or ⌈m⌉ times (m = labelled draws / labelled rows). A pure function of (seed, epoch).
    """
    lab = labeled.nonzero().flatten()
    unl = (~labeled).nonzero().flatten()
    if len(lab) == 0 or len(unl) == 0:
        raise ValueError("composed batches need both labelled and unlabelled rows")
    n = composed_count(len(unl), batch_size, labeled_per_batch, drop_last)
    per = batch_size - labeled_per_batch
    gen = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    unl = unl[torch.randperm(len(unl), generator=gen)]
    need = n * labeled_per_batch
    stream = torch.cat([lab[torch.randperm(len(lab), generator=gen)] for _ in range(max(1, -(-need // len(lab))))])
    batches = []
    for i in range(n):
        u = unl[i * per : (i + 1) * per]
        b = labeled_per_batch + len(u)
        # labelled rows spread evenly (at ⌊j·b/k⌋), so the chunks of gradient accumulation hold equal shares
        at = torch.zeros(b, dtype=torch.bool)
        at[torch.arange(labeled_per_batch) * b // labeled_per_batch] = True
        rows = torch.empty(b, dtype=torch.int64)
        rows[at], rows[~at] = stream[i * labeled_per_batch : (i + 1) * labeled_per_batch], u
        batches.append(rows)
    return batches


class _EpochLoader:
    """Shared bookkeeping: batch count and the range check on ``start``."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = n, batch_size, shuffle, seed, drop_last

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def _check_start(self, start: int) -> None:
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be in 0..{len(self)} (batches per epoch), got {start}")

    def _positions(self, epoch: int, start: int) -> Tensor:
        """Positions of batches ``start..`` of the epoch (the dropped tail already removed)."""
        self._check_start(start)
        order = epoch_order(self.n, self.seed, epoch, self.shuffle)
        return order[start * self.batch_size : len(self) * self.batch_size]


def gather(t: Tensor, rows: Tensor, pin: bool = False) -> Tensor:
    """``t[rows]`` (rows of dim 0), written straight into page-locked memory when ``pin``: the batch a CUDA
    run copies with ``non_blocking=True``, without a second copy into a pinned buffer."""
    if not pin:
        return t.index_select(0, rows)
    return torch.index_select(t, 0, rows, out=pinned_empty((len(rows), *t.shape[1:]), t.dtype))


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised page-locked CPU tensor (torch's caching host allocator reuses freed blocks, so a batch
    of the same size costs no new allocation); needs CUDA."""
    return torch.empty(shape, dtype=dtype, pin_memory=True)


def request_pinned(loader: Any) -> bool:
    """Ask ``loader``, or the loader it wraps (``AugmentedLoader``, ``WithoutLabels``: ``.loader``), to yield
    batches in page-locked memory: what the Trainer does on a CUDA device with ``train.pin_memory``. True
    when one took it; a loader without a ``pin_memory`` attribute is left alone (the Trainer pins its batches
    on the way to the device instead)."""
    while loader is not None:
        attrs = getattr(loader, "__dict__", {})
        if "pin_memory" in attrs:
            loader.pin_memory = True
            return True
        loader = attrs.get("loader")
    return False


class TensorLoader(_EpochLoader):
    """Batches of a :class:`Split`: ``Batch(views={"input": x}, index=ids, target=y, labeled=mask)``.

    ``labeled`` is None when the whole split is labelled; ``Batch.labeled_mask()`` answers either way.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 labeled_per_batch: int | None = None, pin_memory: bool = False):
        super().__init__(len(split), batch_size, shuffle, seed, drop_last)
        self.split = split
        self.pin_memory = pin_memory  # gather each batch straight into page-locked memory (CUDA runs)
        # a fully labelled split needs no mask per batch (Batch.labeled_mask() derives it from the targets)
        self._labeled = None if bool(split.labeled.all()) else split.labeled
        # composition applies only to a split with both kinds of row; a fully labelled or fully unlabelled
        # one is served uniformly, so one recipe runs in every label setting of a suite
        mixed = self._labeled is not None and bool(split.labeled.any())
        self.labeled_per_batch = labeled_per_batch if mixed else None
        if self.labeled_per_batch is not None:
            if not shuffle:
                raise ValueError("labeled_per_batch needs shuffle=True (composed batches are drawn at random)")
            self._len = composed_count(int((~split.labeled).sum()), batch_size, labeled_per_batch, drop_last)

    def __len__(self) -> int:
        return self._len if self.labeled_per_batch is not None else super().__len__()

    def _composed(self, epoch: int, start: int) -> list[Tensor]:
        self._check_start(start)
        assert self.labeled_per_batch is not None
        return composed_batches(self.split.labeled, self.batch_size, self.labeled_per_batch, self.seed, epoch,
                                self.drop_last)[start:]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        s, bs, pin = self.split, self.batch_size, self.pin_memory
        if self.labeled_per_batch is not None:
            for rows in self._composed(epoch, start):
                pick = lambda t: gather(t, rows, pin)  # noqa: E731
                yield Batch(views={INPUT: pick(s.x)}, index=pick(s.index), target=pick(s.y), labeled=pick(s.labeled))
            return
        pos = self._positions(epoch, start)
        for i in range(0, len(pos), bs):
            if self.shuffle or pin:  # index_select: about twice as fast as x[rows] on CPU
                rows = pos[i : i + bs]
                pick = lambda t: gather(t, rows, pin)  # noqa: E731
                yield Batch(views={INPUT: pick(s.x)}, index=pick(s.index), target=pick(s.y),
                            labeled=None if self._labeled is None else pick(self._labeled))
            else:  # contiguous rows: slices are views, no copy
                a = int(pos[i])
                sl = slice(a, a + len(pos[i : i + bs]))
                yield Batch(views={INPUT: s.x[sl]}, index=s.index[sl], target=s.y[sl],
                            labeled=None if self._labeled is None else self._labeled[sl])


def item_seed(seed: int, epoch: int, position: int) -> int:
    """The torch seed dataset item ``position`` is read under in epoch ``epoch`` (:class:`DatasetLoader`)."""
    return (epoch_seed(seed, epoch) * 1_000_033 + int(position)) % 2**63


class _Indexed(Dataset):
    """Prepends the dataset position to each item, so the batch knows its stable indices, and reads the item
    under torch's RNG seeded by (seed, epoch, position), restored afterwards: a random per-item transform
    draws the same values in any worker, with any number of workers, and after a resume."""

    def __init__(self, dataset: Dataset, seed: int, epoch: int):
        self.dataset, self.seed, self.epoch = dataset, seed, epoch

    def __getitem__(self, i: int) -> tuple[int, Any]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, self.epoch, i))
            return i, self.dataset[i]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]


def _collate(items: list[tuple[int, Sequence[Any]]]) -> dict[str, Any]:
    """The fields of a :class:`Batch`, as a mapping (what DataLoader's pinning thread knows how to pin)."""
    index = torch.tensor([i for i, _ in items], dtype=torch.int64)
    first = items[0][1]
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        raise TypeError(f"DatasetLoader wants items (x, y) or (x, y, ...), got {type(first).__name__}")
    cols = default_collate([tuple(item) for _, item in items])
    x, y = cols[0], torch.as_tensor(cols[1]).long()
    labeled = y != IGNORE_INDEX if y.ndim == 1 else None
    extras = {f"item_{k}": c for k, c in enumerate(cols[2:], start=2) if isinstance(c, Tensor)}
    return {"views": {INPUT: x}, "index": index, "target": y, "labeled": labeled, "extras": extras}


class DatasetLoader(_EpochLoader):
    """Any ``torch.utils.data.Dataset`` whose items are ``(x, y)`` or ``(x, y, ...)``.

    ``y`` may be ``IGNORE_INDEX`` for an unlabelled sample (``labeled`` is then False). The stable index is
    the dataset position. Further tensor items land in ``Batch.extras`` as ``item_2``, ``item_3`` ...

    This is the loader for data decoded per item (files read and transformed in ``__getitem__``), where
    ``num_workers`` worker processes pay: each item is read under torch's RNG seeded by (seed, epoch,
    position) (:func:`item_seed`), so the batches are the same with 0, 1 or N workers and after a resume
    (transforms drawing from Python's ``random`` or numpy are not covered). ``pin_memory`` (set by the
    Trainer on a CUDA device) pins each batch in DataLoader's pinning thread, off the training loop's path.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(len(dataset), batch_size, shuffle, seed, drop_last)  # type: ignore[arg-type]
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        pos = self._positions(epoch, start).tolist()
        batches = [pos[i : i + self.batch_size] for i in range(0, len(pos), self.batch_size)]
        loader = DataLoader(
            _Indexed(self.dataset, self.seed, epoch),
            batch_sampler=batches,
            collate_fn=_collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            # DataLoader draws a worker base seed from this generator, or from the global RNG without one.
            generator=torch.Generator().manual_seed(epoch_seed(self.seed, epoch)),
        )
        for fields in loader:
            yield Batch(**fields)


def make_loader(data: Split | Dataset, batch_size: int, **kw: Any) -> TensorLoader | DatasetLoader:
    """A :class:`TensorLoader` for a :class:`Split`, a :class:`DatasetLoader` for a torch ``Dataset``.

    ``labeled_per_batch`` (composed batches) needs a :class:`Split`, whose labelled mask is known up front.
    """
    if isinstance(data, Split):
        return TensorLoader(data, batch_size, **kw)
    if kw.pop("labeled_per_batch", None) is not None:
        raise TypeError("labeled_per_batch needs an in-memory Split (its labelled mask), not a torch Dataset")
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return DatasetLoader(data, batch_size, **kw)  # type: ignore[arg-type]
    raise TypeError(f"make_loader wants a Split or a torch Dataset, got {type(data).__name__}")


class WithoutLabels:
    """A loader whose batches carry no target at all: what a self-supervised method trains on.

    Wraps any loader with ``epoch(e, start)``; ``Batch.target`` and ``Batch.labeled`` are None, so no loss
    can read a label, by construction rather than by care. Other attributes are the wrapped loader's.
    """

    def __init__(self, loader: Any):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for b in self.loader.epoch(epoch, start):
            yield Batch(views=b.views, index=b.index, target=None, labeled=None, extras=b.extras)
