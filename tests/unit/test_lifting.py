"""``lifting`` (3D-OVS feature lifting) and the affine views it reads: what is rendered, what is matched, what
learns; and that a view moves each point's pixel with the image.

Expected values are computed with NumPy from 3D-OVS's definitions (arXiv:2305.14093: ``1 − cos`` of rendered and
teacher features; the shifted-correlation term) on a hand-made batch, never by calling the losses under test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alambic.data import RawData
from alambic.data import glyph_outlines as O
from alambic.data.batch import INPUT, Batch
from alambic.data.loader import TensorLoader
from alambic.data.paired import (
    PairedData,
    PairedLoader,
    move_pairs,
    move_regions,
    pair_key,
    random_affines,
    region_key,
    warp_images,
    with_affine_views,
)
from alambic.data.splits import bundle
from alambic.errors import AlambicError
from alambic.methods.base import StepContext
from alambic.methods.lifting import Lifting, LiftingConfig
from alambic.models.pointnet import PointNet
from alambic.models.zoo import SmallCNN
from alambic.recipe.schema import TrainSpec
from alambic.teachers.base import ModelOutput
from alambic.teachers.frozen import FrozenTeacher
from alambic.train.loop import Trainer
from tests.unit.test_crossmodal_methods import with_identity_projector
from tests.unit.test_glyph_outlines import font_dir  # noqa: F401  (a fixture: the test fonts, skipped when missing)

D, H = 3, 2
CTX = StepContext(step=0, epoch=0, total_steps=1, steps_per_epoch=1)
VIEWS = ("image", "image_1")


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def scene(seed: int = 0):
    """Two samples of 3 points, two 2x2 views each. In ``image`` sample 0's point 2 is unpaired and sample 1's
    points 0 and 1 share pixel (1, 0); in ``image_1`` every point has its own pixel."""
    rng = np.random.default_rng(seed)
    points = rng.normal(size=(2, 3, D))
    fmaps = {v: rng.normal(size=(2, D, H, H)) for v in VIEWS}  # teacher maps at the image's resolution
    pairs = {"image": torch.tensor([[[0, 0, 0], [1, 0, 1], [-1, -1, -1]], [[0, 1, 0], [1, 1, 0], [2, 0, 0]]]),
             "image_1": torch.tensor([[[0, 1, 1], [1, 0, 0], [2, 1, 0]], [[0, 0, 1], [1, 1, 1], [2, 0, 0]]])}
    return points, fmaps, pairs


def rendered_at(points, pairs):
    """(covered pixels (b, row, col) in order, the mean of the points landing on each) of one view, in NumPy."""
    groups: dict[tuple[int, int, int], list[np.ndarray]] = {}
    for b in range(pairs.shape[0]):
        for e, r, c in pairs[b].tolist():
            if e >= 0:
                groups.setdefault((b, r, c), []).append(points[b, e])
    keys = sorted(groups)
    return keys, [np.mean(groups[k], axis=0) for k in keys]


def covered(points, fmap, pairs):
    """(rendered [U, D], teacher [U, D]) over the covered pixels of one view."""
    keys, rendered = rendered_at(points, pairs)
    return np.stack(rendered), np.stack([fmap[b, :, r, c] for b, r, c in keys])


def np_lifting(points, fmaps, pairs) -> tuple[float, dict[str, float]]:
    per = {}
    for v in VIEWS:
        rendered, target = covered(points, fmaps[v], pairs[v])
        per[v] = float(np.mean(np.sum(unit(rendered) * unit(target), axis=1)))
    return float(np.mean([1 - c for c in per.values()])), per


def method_on(points, fmaps, config=None, grad: bool = False):
    """The method set up on the scene's shapes with an identity projector (so projected = the point features)."""
    teacher = {v: ModelOutput(None, {"features.block1": torch.tensor(f)}) for v, f in fmaps.items()}
    m = Lifting(config or LiftingConfig(views=1, correlation_weight=0.0))
    return with_identity_projector(m, points, teacher, grad)


def batch_of(pairs) -> Batch:
    views = {INPUT: torch.zeros(2, 3, 2), **{v: torch.zeros(2, 1, H, H) for v in VIEWS}}
    return Batch(views=views, index=torch.arange(2), extras={pair_key(INPUT, v): p for v, p in pairs.items()})


def test_the_cosine_term_is_one_minus_the_mean_cosine_of_rendered_pixels_averaged_over_views():
    points, fmaps, pairs = scene()
    m, s, t, _ = method_on(points, fmaps)
    out = m(s, t, batch_of(pairs), CTX)
    want, per_view = np_lifting(points, fmaps, pairs)
    assert out.loss.item() == pytest.approx(want, rel=1e-9)
    for v in VIEWS:  # each view's own cosine, as monitored
        assert out.monitors[f"cos_{v}"].item() == pytest.approx(per_view[v], rel=1e-9)
    assert set(out.terms) == {"feature"}  # correlation_weight 0: no correlation term


def test_the_cosine_term_is_zero_when_the_projected_features_equal_the_teachers_in_every_view():
    points, fmaps, pairs = scene()
    for scale, v in zip((2.0, 0.5), VIEWS):  # the teacher holds, at each covered pixel, a multiple of what lands there
        fmaps[v] = fmaps[v].copy()
        for (b, r, c), f in zip(*rendered_at(points, pairs[v])):
            fmaps[v][b, :, r, c] = scale * f
    m, s, t, _ = method_on(points, fmaps)
    assert m(s, t, batch_of(pairs), CTX).loss.item() == pytest.approx(0.0, abs=1e-12)


def test_each_view_contributes_and_gradients_reach_every_point_it_pairs():
    points, fmaps, pairs = scene()
    m, s, t, pts = method_on(points, fmaps, grad=True)
    base = m(s, t, batch_of(pairs), CTX).loss
    changed = {v: f.copy() for v, f in fmaps.items()}
    changed["image_1"][0, :, 1, 0] *= -1  # the teacher of one view only, at sample 0's point 2 (unpaired in image)
    m2, s2, t2, _ = method_on(points, changed)
    assert m2(s2, t2, batch_of(pairs), CTX).loss.item() != pytest.approx(base.item(), rel=1e-6)
    base.backward()
    assert pts.grad[0, 2].abs().sum() > 0  # it learns from the view that sees it
    alone = {"image": pairs["image"], "image_1": torch.full_like(pairs["image_1"], -1)}
    alone["image_1"][1] = pairs["image_1"][1]  # without image_1's pairs of sample 0, point 2 is in no view
    pts.grad = None
    m(s, t, batch_of(alone), CTX).loss.backward()
    assert pts.grad[0, 2].abs().sum() == 0


def np_js_pairwise(p):
    m = (p[:, None, :] + p[None, :, :]) / 2
    kl = lambda a, b: np.sum(a * (np.log(a) - np.log(b)), axis=-1)
    return 0.5 * kl(p[:, None, :], m) + 0.5 * kl(p[None, :, :], m)


def test_the_correlation_term_uses_the_teachers_shifted_similarity_over_the_sample_views_where_every_point_lands():
    points, fmaps, pairs = scene()
    cfg = LiftingConfig(views=1, correlation_weight=0.5, shift=0.2, pos_weight=3.0, neg_weight=0.5,
                        prototypes=2, prototype_temperature=0.3)
    m, s, t, _ = method_on(points, fmaps, cfg)
    anchors = unit(np.array([[1.0, 0.0, 0.5], [-0.2, 1.0, 0.0]]))
    m.anchors = torch.tensor(anchors)
    out = m(s, t, batch_of(pairs), CTX)
    logits = unit(points) @ anchors.T / 0.3
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # [2, 3, K] per point, whatever the view
    pos_sum = neg_sum = 0.0
    n_pos = n_neg = 0
    kept = [(1, "image"), (0, "image_1"), (1, "image_1")]  # sample 0 has an unpaired point in image
    for b, v in kept:
        at = np.stack([fmaps[v][b, :, r, c] for _, r, c in pairs[v][b].tolist()])
        corr = unit(at) @ unit(at).T - 0.2
        d = np_js_pairwise(probs[b])
        pos_sum += np.sum(np.maximum(corr, 0) * d)
        neg_sum += np.sum(np.minimum(corr, 0) * d)
        n_pos, n_neg = n_pos + int(np.sum(corr > 0)), n_neg + int(np.sum(corr < 0))
    want = 0.5 * (3.0 * pos_sum / n_pos + 0.5 * neg_sum / n_neg)
    assert out.terms["correlation"].item() == pytest.approx(want, rel=1e-9)
    assert out.monitors["correlation_patches"].item() == 3


def _canonical(n=16, p=12, size=8) -> PairedData:
    rng = np.random.default_rng(0)
    raw = RawData(torch.from_numpy(rng.uniform(-1, 1, size=(n, p, 2))).float(), torch.arange(n) % 2, ["a", "b"], "fp")
    rc = torch.from_numpy(rng.integers(2, size - 2, size=(n, p, 2)))
    pairs = torch.cat([torch.arange(p).expand(n, p)[..., None], rc], dim=2)
    regions = torch.from_numpy(rng.integers(0, 4, size=(n, size, size)))
    images = torch.from_numpy(rng.uniform(size=(n, 1, size, size))).float()
    return PairedData(raw, {"image": images}, {pair_key(INPUT, "image"): pairs, region_key("image"): regions})


def _paired_views(views=2) -> PairedData:
    return with_affine_views(_canonical(), "image", views, rotate=20, scale=(0.9, 1.0), shift=0.05, seed=1)


def test_gradients_reach_the_student_and_projector_and_never_the_frozen_teacher():
    torch.manual_seed(0)
    paired = _paired_views()
    data = bundle(paired.raw, val_fraction=0.25, test_fraction=0.25, labeled_fraction=1.0, split_seed=0)
    loader = PairedLoader(TensorLoader(data.train, batch_size=8, seed=0), paired)
    encoder = SmallCNN(1, (8, 8), [4, 6], 2)
    teacher = FrozenTeacher(encoder)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    student = PointNet(2, 2, [8, 16], point_dim=5)
    method = Lifting(LiftingConfig(views=2, prototypes=4))
    assert method.teacher_views == ("image", "image_1", "image_2")
    trainer = Trainer(student, method, loader, TrainSpec(epochs=1, lr=0.05), teacher=teacher, progress=False)
    projector0, anchors0 = method.projector.fc.weight.detach().clone(), method.anchors.clone()
    student0 = student.point_head[1].weight.detach().clone()
    log = trainer.train_step(next(loader.epoch(0)), CTX)
    assert set(log["terms"]) == {"feature", "correlation"}
    assert all(not q.requires_grad and q.grad is None for q in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert not encoder.training
    assert not torch.equal(method.projector.fc.weight, projector0)
    assert not torch.equal(student.point_head[1].weight, student0)
    assert torch.equal(method.anchors, anchors0)  # fixed anchors, like 3D-OVS's text embeddings


def test_views_the_data_lacks_are_one_line():
    with pytest.raises(AlambicError, match=r"method lifting reads views \['image_2'\].*data.views: 2"):
        Lifting(LiftingConfig(views=2)).use_views([INPUT, "image", "image_1"])


# ------------------------------------------------------------------------------------------ affine views
def test_a_quarter_turn_and_a_whole_pixel_shift_move_each_pair_onto_the_very_same_value():
    """Maps that permute pixels exactly: the paired pixel of the moved view holds exactly the canonical value, and
    the moved region map gives it the same region; pairs pushed out of the image become padding."""
    n, s = 4, 6
    images = torch.rand(n, 1, s, s, dtype=torch.float64)
    regions = torch.randint(0, 5, (n, s, s))
    rc = torch.cartesian_prod(torch.arange(s), torch.arange(s))  # every pixel paired
    pairs = torch.cat([torch.arange(s * s)[:, None], rc], 1).expand(n, -1, -1).clone()
    turn = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)  # +90 degrees (x right, y down)
    shift = torch.tensor([[1.0, 0.0, 2 * 2 / s], [0.0, 1.0, 0.0]], dtype=torch.float64)  # 2 pixels to the right
    for forward, lost in ((turn, 0), (shift, 2 * s)):
        forward = forward.expand(n, 2, 3)
        warped, moved = warp_images(images, forward), move_pairs(pairs, forward, s)
        moved_regions = move_regions(regions, forward)
        keep = moved[..., 0] >= 0
        assert int((~keep).sum()) == lost * n
        b = torch.arange(n)[:, None].expand(-1, s * s)[keep]
        old, new = pairs[keep], moved[keep]
        assert torch.allclose(warped[b, 0, new[:, 1], new[:, 2]], images[b, 0, old[:, 1], old[:, 2]], atol=1e-12)
        assert torch.equal(moved_regions[b, new[:, 1], new[:, 2]], regions[b, old[:, 1], old[:, 2]])
        assert torch.equal(new[:, 0], old[:, 0])  # the element keeps its index


def test_affine_views_are_fixed_by_the_seed_and_leave_the_points_alone():
    a, b = _paired_views(), _paired_views()
    assert torch.equal(a.raw.x, _canonical().raw.x)
    assert all(torch.equal(a.views[k], b.views[k]) for k in a.views)
    assert all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)
    assert sorted(a.views) == ["image", "image_1", "image_2"]
    assert {pair_key(INPUT, "image_2"), region_key("image_2")} <= set(a.extras)
    maps = random_affines(3, 30.0, (0.8, 1.0), 0.1, torch.Generator().manual_seed(0))
    scales = torch.linalg.det(maps[:, :, :2]).sqrt()
    assert bool(((scales >= 0.8 - 1e-12) & (scales <= 1.0 + 1e-12)).all())
    assert bool((maps[:, :, 2].abs() <= 0.1).all())


@pytest.fixture(scope="module")
def glyph_views(font_dir, tmp_path_factory):  # noqa: F811  (the imported fixture)
    """The glyphs of ``test_glyph_outlines`` (its fonts, copied into a private folder), with 3 views and without."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ALAMBIC_CACHE", str(tmp_path_factory.mktemp("outline_cache")))
    try:
        kw = {"size": 16, "classes": "all", "font_dirs": [str(font_dir)], "points": 64, "superpixels": "grid"}
        yield (O.paired_glyph_outlines(O.GlyphOutlinesConfig(**kw, views=3)),
               O.paired_glyph_outlines(O.GlyphOutlinesConfig(**kw)))
    finally:
        mp.undo()


def test_in_each_glyph_view_a_points_pixel_holds_the_ink_it_held_in_the_canonical_image(glyph_views):
    """Tolerance: the canonical and moved pixels' ink (in [0, 1]) differ by at most 0.5 for >= 95 % of the pairs
    and by <= 0.25 on average (bilinear resampling of a 16x16 raster blurs by up to a pixel); the same pixels
    without moving the pairs miss the ink (the control, mean difference > 0.3)."""
    views, plain = glyph_views
    assert torch.equal(views.raw.x, plain.raw.x)  # the points are the canonical ones
    key = pair_key(INPUT, "image")
    p0, img = views.extras[key].long(), views.views["image"]
    n = len(views)
    b = torch.arange(n)[:, None].expand(-1, p0.shape[1])
    for v in ("image_1", "image_2", "image_3"):
        pv, iv = views.extras[pair_key(INPUT, v)].long(), views.views[v]
        both = (p0[..., 0] >= 0) & (pv[..., 0] >= 0)
        assert both.float().mean() > 0.99  # rotations up to 30 degrees at scale <= 1 keep almost every point inside
        ink0 = img[b[both], 0, p0[..., 1][both], p0[..., 2][both]]
        moved = iv[b[both], 0, pv[..., 1][both], pv[..., 2][both]]
        unmoved = iv[b[both], 0, p0[..., 1][both], p0[..., 2][both]]
        diff = (moved - ink0).abs()
        assert (diff <= 0.5).float().mean() >= 0.95 and diff.mean() <= 0.25
        assert (unmoved - ink0).abs().mean() > 0.3
