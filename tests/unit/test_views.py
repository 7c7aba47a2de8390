"""Views: pure functions of the generator, crops that land where they say, masks with exact counts."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from alambic.data import INPUT, Split, TensorLoader
from alambic.data.views import (
    AugmentedLoader,
    AugmentSpec,
    ViewMaker,
    ViewsSpec,
    apply_mask,
    disjoint_mask,
    patch_mask,
    random_resized_crop,
    rotate90,
    view_names,
)
from alambic.errors import AlambicError


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int = 16, side: int = 8, c: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, c, side, side, generator=gen(seed))


FULL = {
    "groups": {
        "global": {"count": 2, "scale": [0.4, 1.0], "flip": 0.5, "rotate": 15, "jitter": 0.4, "blur": 0.5,
                   "solarize": 0.2, "noise": 0.1, "dropout": 0.1, "erase": 0.5},
        "local": {"count": 3, "scale": [0.05, 0.4], "size": 4, "flip": 0.5, "jitter": 0.4},
    },
    "mask": {"views": ["global"], "patch_size": 2, "ratio": 0.5, "mode": "block", "teacher": "disjoint"},
}


def assert_same(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    for da, db in zip(a, b):
        assert da.keys() == db.keys()
        for k in da:
            assert torch.equal(da[k], db[k]), k


# --------------------------------------------------------------------------------------- determinism
def test_views_are_a_pure_function_of_the_generator_seed():
    maker, x = ViewMaker(ViewsSpec.model_validate(FULL), (1, 8, 8)), images()
    first = maker(x, gen(3))
    assert_same(first, maker(x, gen(3)))
    other = maker(x, gen(4))
    for k in first[0]:
        assert not torch.equal(first[0][k], other[0][k]), k
    for k in first[1]:
        assert not torch.equal(first[1][k], other[1][k]), k


def test_augmented_loader_resumes_mid_epoch_and_leaves_the_global_rng_alone():
    x = torch.rand(50, 1, 8, 8, generator=gen(0))
    split = Split(x, torch.arange(50) % 3, torch.arange(50), torch.ones(50, dtype=torch.bool))
    loader = AugmentedLoader(TensorLoader(split, 16, seed=1), ViewMaker(ViewsSpec.model_validate(FULL), (1, 8, 8)),
                             seed=7)
    assert len(loader) == 4 and loader.split is split and loader.batch_size == 16  # forwarded
    before = torch.get_rng_state()
    full = list(loader.epoch(2))
    tail = list(loader.epoch(2, start=2))
    assert torch.equal(torch.get_rng_state(), before)
    assert len(tail) == 2
    for a, b in zip(full[2:], tail):
        assert torch.equal(a.index, b.index)
        assert_same((dict(a.views), dict(a.extras)), (dict(b.views), dict(b.extras)))
    b0 = full[0]
    assert list(b0.views) == [INPUT, *loader.maker.names]
    assert torch.equal(b0.views[INPUT], x[b0.index])  # the input view stays unaugmented
    assert not torch.equal(b0.views["global_0"], next(iter(loader.epoch(3))).views["global_0"])


# --------------------------------------------------------------------------------------------- crops
def test_identity_crop_returns_the_input():
    x = images(4, 8, c=3)
    out = random_resized_crop(x, 8, (1.0, 1.0), (1.0, 1.0), gen(0))
    assert torch.allclose(out, x, atol=1e-5)
    const = torch.full((4, 2, 8, 8), 0.7)
    assert torch.allclose(random_resized_crop(const, 5, (0.05, 0.5), (0.5, 2.0), gen(1)), torch.full((4, 2, 5, 5), 0.7))


@pytest.mark.parametrize("area,ratio", [(0.25, 1.0), (0.36, 2.0), (0.16, 0.5)])
def test_crop_box_has_the_drawn_area_and_aspect(area, ratio):
    side, size = 32, 16
    cols = torch.arange(side, dtype=torch.float64).expand(side, side)  # x[i, j] = j
    x = torch.stack([cols, cols.T]).expand(64, 2, side, side)  # channel 1: x[i, j] = i
    out = random_resized_crop(x, size, (area, area), (ratio, ratio), gen(0))
    span = out.amax((2, 3)) - out.amin((2, 3))  # [B, 2]: sampled pixel-centre extent of the box
    w, h = math.sqrt(area * ratio) * side, math.sqrt(area / ratio) * side
    # centres of `size` output pixels cover (size - 1) / size of the box; the box stays inside the image
    assert torch.allclose(span[:, 0], torch.full((64,), w * (size - 1) / size, dtype=torch.float64), atol=0.51)
    assert torch.allclose(span[:, 1], torch.full((64,), h * (size - 1) / size, dtype=torch.float64), atol=0.51)
    assert out.min() >= 0 and out.max() <= side - 1
    assert out[:, 0, :, 0].std() > 1  # boxes sit at different places in different samples


def test_crop_area_stays_in_the_scale_range():
    side = 32
    cols = torch.arange(side, dtype=torch.float64).expand(side, side)
    x = torch.stack([cols, cols.T]).expand(256, 2, side, side)
    out = random_resized_crop(x, side, (0.1, 0.5), (0.75, 4 / 3), gen(2))
    span = (out.amax((2, 3)) - out.amin((2, 3))) * side / (side - 1)  # box extents in pixels
    frac = span[:, 0] * span[:, 1] / side**2
    assert frac.min() > 0.1 - 0.03 and frac.max() < 0.5 + 0.03
    assert frac.max() - frac.min() > 0.25  # drawn over the range, not stuck at one value


# --------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("mode", ["random", "block"])
@pytest.mark.parametrize("ratio,grid", [(0.5, (8, 8)), (0.3, (7, 7)), (0.75, (2, 2)), (0.6, (4, 6))])
def test_patch_mask_masks_exactly_round_ratio_n(mode, ratio, grid):
    m = patch_mask(64, grid, ratio, mode, gen(0))
    n = grid[0] * grid[1]
    assert m.shape == (64, n) and m.dtype == torch.bool
    assert (m.sum(1) == round(ratio * n)).all()


def adjacent_pairs(m: torch.Tensor, side: int) -> torch.Tensor:
    g = m.view(-1, side, side)
    return (g[:, 1:] & g[:, :-1]).flatten(1).sum(1) + (g[:, :, 1:] & g[:, :, :-1]).flatten(1).sum(1)


def test_block_masks_are_contiguous_rectangles():
    block = patch_mask(128, (8, 8), 0.5, "block", gen(0))
    rand = patch_mask(128, (8, 8), 0.5, "random", gen(0))
    assert (adjacent_pairs(block, 8) >= 1).all()
    # 32 patches as a few rectangles share far more edges than a uniform subset (about 27.6 expected)
    assert adjacent_pairs(block, 8).float().mean() > 1.3 * adjacent_pairs(rand, 8).float().mean()
    assert not torch.equal(block[0], block[1])


@pytest.mark.parametrize("ratio,grid", [(0.5, (8, 8)), (0.75, (7, 7))])
def test_disjoint_mask_leaves_disjoint_patches_visible(ratio, grid):
    student = patch_mask(64, grid, ratio, "random", gen(0))
    teacher = disjoint_mask(student, gen(1))
    assert not (~student & ~teacher).any()
    assert torch.equal(teacher.sum(1), student.sum(1))


def test_disjoint_mask_overlaps_least_below_one_half():
    student = patch_mask(32, (8, 8), 0.25, "random", gen(0))
    teacher = disjoint_mask(student, gen(1))
    assert torch.equal(teacher.sum(1), student.sum(1))
    assert not (student & teacher).any()  # every student-masked patch is teacher-visible
    assert ((~student & ~teacher).sum(1) == 64 - 2 * 16).all()  # the smallest possible overlap


@pytest.mark.parametrize("teacher", ["same", "disjoint", "unmasked"])
def test_masked_views_and_teacher_masks(teacher):
    spec = ViewsSpec.model_validate({"groups": {"global": {"count": 2, "scale": [0.5, 1]}},
                                     "mask": {"patch_size": 4, "ratio": 0.5, "teacher": teacher}})
    maker, x = ViewMaker(spec, (1, 8, 8)), images() + 1  # no zero pixels before masking
    views, extras = maker(x, gen(0))
    for v in ("global_0", "global_1"):
        mask = extras[f"mask:{v}"]
        assert mask.shape == (16, 4) and (mask.sum(1) == 2).all()
        assert torch.equal(views[f"masked_{v}"], apply_mask(views[v], mask, 4))
        if teacher == "unmasked":
            assert f"teacher_masked_{v}" not in views and f"teacher_mask:{v}" not in extras
            continue
        tmask = extras[f"teacher_mask:{v}"]
        assert torch.equal(views[f"teacher_masked_{v}"], apply_mask(views[v], tmask, 4))
        assert torch.equal(tmask, mask) == (teacher == "same")
        if teacher == "disjoint":
            assert not (~tmask & ~mask).any()
    assert not torch.equal(extras["mask:global_0"], extras["mask:global_1"])


def test_apply_mask_zeroes_exactly_the_masked_patches():
    x = images(8, 8, c=3) + 1
    mask = patch_mask(8, (4, 4), 0.5, "random", gen(0))
    out = apply_mask(x, mask, 2)
    pix = mask.view(8, 1, 4, 1, 4, 1).expand(8, 3, 4, 2, 4, 2).reshape(8, 3, 8, 8)
    assert (out[pix] == 0).all()
    assert torch.equal(out[~pix], x[~pix])
    assert int((out == 0).sum()) == 8 * 8 * 3 * 4  # 8 masked patches of 2x2 pixels, 3 channels


# ----------------------------------------------------------------------------------------- rotations
def test_rotate90_is_exact_and_per_sample():
    x = images(8, 6, c=2)
    assert torch.equal(rotate90(x, torch.full((8,), 4)), x)
    y = x
    for _ in range(4):
        y = rotate90(y, torch.ones(8, dtype=torch.long))
    assert torch.equal(y, x)
    k = torch.tensor([0, 1, 2, 3, 1, 5, -1, 2])
    out = rotate90(x, k)
    for i in range(8):
        assert torch.equal(out[i], torch.rot90(x[i], int(k[i]), dims=(-2, -1)))


# ---------------------------------------------------------------------------------- names and shapes
def test_view_names_and_shapes():
    spec = ViewsSpec.model_validate(FULL)
    names = ["global_0", "global_1", "local_0", "local_1", "local_2",
             "masked_global_0", "teacher_masked_global_0", "masked_global_1", "teacher_masked_global_1"]
    assert view_names(spec) == names
    weak_strong = ViewsSpec.model_validate({"groups": {"weak": {}, "strong": {"jitter": 0.5}},
                                            "mask": {"views": ["strong"], "patch_size": 2}})
    assert view_names(weak_strong) == ["weak", "strong", "masked_strong"]
    maker = ViewMaker(spec, (1, 8, 8))
    assert maker.names == names
    views, extras = maker(images(5), gen(0))
    assert list(views) == names
    assert views["global_0"].shape == (5, 1, 8, 8) and views["local_2"].shape == (5, 1, 4, 4)
    assert all(views[n].shape[1:] == maker.shapes[n] for n in names)
    assert set(extras) == {"mask:global_0", "mask:global_1", "teacher_mask:global_0", "teacher_mask:global_1"}
    assert extras["mask:global_0"].shape == (5, 16)
    x64 = images(5).double()
    assert all(v.dtype == torch.float64 for v in maker(x64, gen(0))[0].values())


def test_flat_vectors_take_noise_and_dropout_only():
    spec = ViewsSpec.model_validate({"groups": {"a": {"count": 2, "noise": 0.5, "dropout": 0.3}}})
    x = torch.randn(64, 10, generator=gen(0)) * 3
    views, _ = ViewMaker(spec, (10,))(x, gen(1))
    assert views["a_0"].shape == (64, 10) and not torch.equal(views["a_0"], views["a_1"])
    zeros = (views["a_0"] == 0).float().mean()
    assert 0.2 < zeros < 0.4
    kept = views["a_0"] != 0
    rel = (views["a_0"] - x)[kept].std() / x.std()
    assert 0.35 < rel < 0.65  # noise std relative to each sample's std


@pytest.mark.parametrize(
    "spec,shape,message",
    [
        ({"groups": {"crops": {"scale": [0.5, 1]}}}, (10,), r"views\.groups\.crops\.scale.*\[B, 10\]"),
        ({"groups": {"weak": {"flip": 0.5}}}, (64,), r"views\.groups\.weak\.flip"),
        ({"groups": {"g": {}}}, (1, 8, 6), r"views\.groups\.g\.size.*8x6"),
        ({"groups": {"g": {"size": 6}}, "mask": {"views": ["g"], "patch_size": 4}}, (1, 8, 8),
         r"patch_size 4 does not divide the side 6 of group 'g'"),
        ({"groups": {"g": {}}, "mask": {"views": ["g"]}}, (16,), r"views\.mask needs images"),
        ({"groups": {"g": {}}}, (8, 8), r"x\.shape\[1:\]"),
    ],
)
def test_maker_errors_name_the_culprit(spec, shape, message):
    with pytest.raises(AlambicError, match=message):
        ViewMaker(ViewsSpec.model_validate(spec), shape)


@pytest.mark.parametrize(
    "spec,message",
    [
        ({"groups": {}}, "at least one"),
        ({"groups": {"input": {}}}, "'input'"),
        ({"groups": {"masked_a": {}}}, "'masked_a'"),
        ({"groups": {"teacher_a": {}}}, "'teacher_a'"),
        ({"groups": {"two words": {}}}, "identifier"),
        ({"groups": {"a": {"count": 2}, "a_1": {}}}, "'a_1'"),
        ({"groups": {"a": {}}, "mask": {"views": ["b"]}}, "unknown group 'b'"),
        ({"groups": {"a": {"scale": [0.5, 0.2]}}}, "scale"),
        ({"groups": {"a": {"crop": 1}}}, "crop"),
    ],
)
def test_spec_rejects_bad_names_and_values(spec, message):
    with pytest.raises(ValidationError, match=message):
        ViewsSpec.model_validate(spec)


# ---------------------------------------------------------------------------------- the pipeline
def test_flip_one_mirrors_the_crop_and_zero_strengths_leave_the_crop():
    x = images(16, 8)
    crop = {"scale": [0.3, 0.9], "size": 6}
    plain = ViewMaker(ViewsSpec(groups={"g": AugmentSpec(**crop)}), (1, 8, 8))(x, gen(5))[0]["g"]
    assert torch.equal(plain, random_resized_crop(x, 6, (0.3, 0.9), (0.75, 1.3333), gen(5)))
    flipped = ViewMaker(ViewsSpec(groups={"g": AugmentSpec(**crop, flip=1.0)}), (1, 8, 8))(x, gen(5))[0]["g"]
    assert torch.equal(flipped, torch.flip(plain, dims=[-1]))
    same = ViewMaker(ViewsSpec(groups={"g": {}}), (1, 8, 8))(x, gen(5))[0]["g"]
    assert torch.equal(same, x)  # nothing set: the view is the input


def test_photometric_stages_do_what_they_say():
    x = images(32, 8) * 0.5 + 0.25
    dims = (1, 2, 3)

    def make(**kw) -> torch.Tensor:
        return ViewMaker(ViewsSpec(groups={"g": AugmentSpec(**kw)}), (1, 8, 8))(x, gen(0))[0]["g"]

    sol = make(solarize=1.0)
    lo, hi = x.amin(dims, keepdim=True), x.amax(dims, keepdim=True)
    assert torch.allclose(sol, torch.where(x > (lo + hi) / 2, lo + hi - x, x))
    blurred = make(blur=1.0)
    ratio = blurred.std(dims) / x.std(dims)  # smoothing shrinks the spread (sigma 0.1: barely)
    assert (ratio <= 1 + 1e-6).all() and ratio.mean() < 0.7
    assert torch.allclose(blurred.mean(), x.mean(), atol=0.02)
    jit = make(jitter=0.5)
    c = jit.std(dims) / x.std(dims)  # contrast factor c ~ U(0.5, 1.5), brightness b ~ U(-0.5, 0.5) * std
    b = (jit.mean(dims) - x.mean(dims)) / x.std(dims)
    centred = lambda t: t - t.mean(dims, keepdim=True)  # noqa: E731
    assert torch.allclose(centred(jit), centred(x) * c.view(-1, 1, 1, 1), atol=1e-5)
    assert (c >= 0.5).all() and (c <= 1.5).all() and c.std() > 0.1
    assert (b.abs() <= 0.5 + 1e-5).all() and b.std() > 0.1
    erased = make(erase=1.0)
    changed = (erased != x).flatten(1).float().mean(1)
    assert (changed > 0).all() and (changed <= 0.25).all()
    rotated = make(rotate=30.0)
    assert not torch.allclose(rotated, x) and rotated.shape == x.shape
