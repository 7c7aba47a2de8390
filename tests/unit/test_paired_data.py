"""Paired multi-modal data: validation of the pairings, the loader that attaches them by sample index, and the
flat form the cross-modal losses take."""

from __future__ import annotations

import pytest
import torch

from alambic.data import RawData
from alambic.data.batch import INPUT, Batch
from alambic.data.loader import TensorLoader
from alambic.data.paired import (
    PairedData,
    PairedLoader,
    flatten_pairs,
    pair_key,
    paired_data,
    read_pairs,
    read_regions,
    region_key,
)
from alambic.data.splits import bundle
from alambic.errors import AlambicError, RecipeError, ShapeMismatchError
from alambic.recipe.schema import DataSpec

PAIRS, REGIONS = pair_key(INPUT, "image"), region_key("image")


def _paired(n: int = 12, p: int = 4, size: int = 3) -> PairedData:
    """n samples of p points [p, 2] and a [1, size, size] image; sample i pairs point j with pixel (j % size, i % size),
    except its last point, which is unpaired (-1 row)."""
    x = torch.arange(n * p * 2, dtype=torch.float32).reshape(n, p, 2)
    raw = RawData(x, torch.arange(n) % 2, ["a", "b"], "fp")
    images = torch.arange(n * size * size, dtype=torch.float32).reshape(n, 1, size, size)
    pairs = torch.full((n, p, 3), -1, dtype=torch.int16)
    for i in range(n):
        for j in range(p - 1):
            pairs[i, j] = torch.tensor([j, j % size, i % size])
    regions = torch.zeros(n, size, size, dtype=torch.int16)
    regions[:, 1:] = 1
    return PairedData(raw, {"image": images}, {PAIRS: pairs, REGIONS: regions})


def test_loader_attaches_each_samples_own_views_and_pairs_by_its_stable_index():
    paired = _paired()
    data = bundle(paired.raw, val_fraction=0.25, test_fraction=0.25, labeled_fraction=1.0, split_seed=0)
    loader = PairedLoader(TensorLoader(data.train, batch_size=2, seed=3), paired)
    seen = []
    for batch in loader.epoch(0):
        for row, idx in enumerate(batch.index.tolist()):
            assert torch.equal(batch.views[INPUT][row], paired.raw.x[idx])
            assert torch.equal(batch.views["image"][row], paired.views["image"][idx])
            assert torch.equal(batch.extras[PAIRS][row], paired.extras[PAIRS][idx].long())
            assert torch.equal(batch.extras[REGIONS][row], paired.extras[REGIONS][idx].long())
            seen.append(idx)
        assert batch.extras[PAIRS].dtype == torch.int64  # stored narrow, served as int64
    assert sorted(seen) == sorted(data.train.index.tolist())
    assert len(loader) == len(loader.loader) and loader.batch_size == 2  # the wrapped loader's attributes


def test_a_sub_batch_keeps_its_rows_pairs():
    batch = next(PairedLoader(TensorLoader(bundle(_paired().raw, val_fraction=0.25, test_fraction=0.25,
                                                  labeled_fraction=1.0, split_seed=0).train, 4, shuffle=False),
                              _paired()).epoch(0))
    sub = batch.select(slice(1, 3))
    assert torch.equal(sub.extras[PAIRS], batch.extras[PAIRS][1:3])
    assert torch.equal(sub.views["image"], batch.views["image"][1:3])


def test_flatten_pairs_gives_global_point_rows_and_image_triples_and_drops_padding():
    pairs = torch.tensor([[[2, 0, 1], [-1, -1, -1], [0, 1, 1]],
                          [[-1, -1, -1], [1, 2, 0], [-1, -1, -1]]])
    points, images = flatten_pairs(pairs, elements_per_sample=3)
    assert points.tolist() == [2, 0, 3 + 1]  # sample 1's point 1 is row 1·3 + 1 of the flattened [B·P, D]
    assert images.tolist() == [[0, 0, 1], [0, 1, 1], [1, 2, 0]]
    with pytest.raises(AlambicError, match="element 2 >= 2"):
        flatten_pairs(pairs, elements_per_sample=2)


def test_readers_name_what_is_missing():
    batch = Batch(views={INPUT: torch.zeros(1, 2, 2)}, index=torch.tensor([0]))
    with pytest.raises(AlambicError, match=r"no pairing 'pair:input->image'"):
        read_pairs(batch, INPUT, "image")
    with pytest.raises(AlambicError, match=r"no region map 'regions:image'"):
        read_regions(batch, "image")


@pytest.mark.parametrize("bad, message", [
    (lambda t: t.__setitem__((0, 0), torch.tensor([4, 0, 0], dtype=torch.int16)), "element outside 0..3"),
    (lambda t: t.__setitem__((0, 0), torch.tensor([0, 3, 0], dtype=torch.int16)), "row outside 0..2"),
    (lambda t: t.__setitem__((0, 0), torch.tensor([-1, 0, 0], dtype=torch.int16)), "padding rows must be"),
])
def test_out_of_range_pairs_are_refused_in_one_line(bad, message):
    p = _paired()
    pairs = p.extras[PAIRS].clone()
    bad(pairs)
    with pytest.raises(AlambicError, match=message):
        PairedData(p.raw, p.views, {PAIRS: pairs})


def test_shapes_and_names_are_checked():
    p = _paired()
    with pytest.raises(ShapeMismatchError, match="'image' has 5 rows, the samples 12"):
        PairedData(p.raw, {"image": p.views["image"][:5]})
    with pytest.raises(ShapeMismatchError, match="regions:image"):
        PairedData(p.raw, p.views, {REGIONS: torch.zeros(12, 2, 3, dtype=torch.int64)})
    with pytest.raises(AlambicError, match="names view 'depth'"):
        PairedData(p.raw, p.views, {pair_key(INPUT, "depth"): p.extras[PAIRS]})
    with pytest.raises(AlambicError, match="must hold integers"):
        PairedData(p.raw, p.views, {PAIRS: p.extras[PAIRS].float()})


def test_a_dataset_without_paired_modalities_is_refused_by_name():
    with pytest.raises(RecipeError, match="dataset 'digits' has no paired modalities.*glyph_outlines"):
        paired_data(DataSpec(name="digits"))
