"""multi_teacher: per-teacher weighted KD, similarity scores and weights, and its errors.

Expected values are computed with numpy / math here, never by calling the function under test.
"""

from __future__ import annotations


import numpy as np
import pydantic
import pytest
import torch

from alambic.data.batch import IGNORE_INDEX, INPUT, Batch
from alambic.data.splits import Split
from alambic.errors import AlambicError, RecipeError
from alambic.methods import SetupInfo, StepContext
from alambic.methods.kd import KD, KDConfig
from alambic.methods.multi_teacher import (
    MultiTeacher,
    MultiTeacherConfig,
    nearest_centroid_accuracy,
    similarity_weights,
)
from alambic.registry import METHODS
from alambic.teachers import AnalyticTeacher
from alambic.teachers.base import ModelOutput
from alambic.teachers.ensemble import TeacherEnsemble
from tests.reference import np_ce, np_kd, np_softmax

CTX = StepContext(step=0, epoch=0, total_steps=10, steps_per_epoch=5)

S = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 0.0, 0.0], [0.5, 0.5, -1.0]]
T0 = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0], [0.0, 3.0, 0.0], [-1.0, 0.0, 1.0]]
T1 = [[0.0, 1.0, 2.0], [3.0, -1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 2.0, -2.0]]
T2 = [[-1.0, 0.5, 0.0], [0.0, 0.0, 2.0], [2.0, -2.0, 1.0], [1.0, 1.0, 0.0]]
Y = [2, IGNORE_INDEX, 0, IGNORE_INDEX]


def f64(x, grad=False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def batch() -> Batch:
    target = torch.tensor(Y)
    return Batch(views={INPUT: torch.zeros(4, 2)}, index=torch.arange(4), target=target, labeled=target != IGNORE_INDEX)


def ensemble_out(*teachers) -> dict[str, ModelOutput]:
    """What a TeacherEnsemble gives: members, plus the mean-probability logits (unused by multi_teacher)."""
    return {INPUT: ModelOutput(torch.zeros(4, 3, dtype=torch.float64), {}, [ModelOutput(t) for t in teachers])}


def student_out(s) -> dict[str, ModelOutput]:
    return {INPUT: ModelOutput(s)}


def set_up(cfg: MultiTeacherConfig, k: int) -> MultiTeacher:
    m = MultiTeacher(cfg)
    info = SetupInfo(student=None, num_classes=3, num_samples=4, steps_per_epoch=1, epochs=1)
    m.setup(student_out(f64(S)), ensemble_out(*[f64(T0)] * k), info)
    return m


# ------------------------------------------------------------------------------------------- the loss


def test_loss_is_ce_plus_weighted_sum_of_per_teacher_kd():
    m = set_up(MultiTeacherConfig(weighting="fixed", weights=[0.5, 0.3, 0.2], temperature=2.0, alpha=0.6), 3)
    out = m(student_out(f64(S)), ensemble_out(f64(T0), f64(T1), f64(T2)), batch(), CTX)
    ce = 0.4 * np_ce(S, Y)
    kds = [0.6 * w * np_kd(S, t, 2.0) for w, t in zip([0.5, 0.3, 0.2], [T0, T1, T2])]
    assert set(out.terms) == {"ce", "kd_t0", "kd_t1", "kd_t2"}
    assert out.terms["ce"].item() == pytest.approx(ce, rel=1e-12)
    for i, kd in enumerate(kds):
        assert out.terms[f"kd_t{i}"].item() == pytest.approx(kd, rel=1e-12)
    assert out.loss.item() == pytest.approx(ce + sum(kds), rel=1e-12)
    # it averages divergences, it does not distil the ensemble's mean distribution
    p_mean = np.mean([np_softmax(np.asarray(t) / 2.0) for t in (T0, T1, T2)], axis=0)
    assert abs(sum(kds) - 0.6 * np_kd(S, np.log(p_mean) * 2.0, 2.0)) > 1e-3


def test_fixed_one_hot_weights_equal_single_teacher_kd_exactly():
    cfg = MultiTeacherConfig(weighting="fixed", weights=[1.0, 0.0], temperature=3.0, alpha=0.7)
    m = set_up(cfg, 2)
    out = m(student_out(f64(S)), ensemble_out(f64(T0), f64(T1)), batch(), CTX)
    kd = KD(KDConfig(temperature=3.0, alpha=0.7))(student_out(f64(S)), student_out(f64(T0)), batch(), CTX)
    assert out.loss.item() == kd.loss.item()  # bit for bit
    assert out.terms["kd_t1"].item() == 0.0


def test_nearest_equals_weighted_with_a_one_hot_weight():
    nearest = MultiTeacher(MultiTeacherConfig(weighting="nearest", temperature=2.0, alpha=0.5))
    scores = torch.tensor([0.7, 0.9, 0.8], dtype=torch.float64)
    nearest.weights = nearest.weights_from(scores, 3)
    assert nearest.weights.tolist() == [0.0, 1.0, 0.0]
    fixed = set_up(MultiTeacherConfig(weighting="fixed", weights=[0, 1, 0], temperature=2.0, alpha=0.5), 3)
    teachers = ensemble_out(f64(T0), f64(T1), f64(T2))
    a = nearest(student_out(f64(S)), teachers, batch(), CTX).loss.item()
    b = fixed(student_out(f64(S)), teachers, batch(), CTX).loss.item()
    assert a == b
    assert a == pytest.approx(0.5 * np_ce(S, Y) + 0.5 * np_kd(S, T1, 2.0), rel=1e-12)


def test_no_gradient_reaches_any_teacher():
    m = set_up(MultiTeacherConfig(weighting="average"), 3)
    s = f64(S, grad=True)
    ts = [f64(T0, grad=True), f64(T1, grad=True), f64(T2, grad=True)]
    m(student_out(s), ensemble_out(*ts), batch(), CTX).loss.backward()
    assert all(t.grad is None for t in ts)
    assert s.grad.abs().sum() > 0


def test_average_and_fixed_weights_are_normalised():
    assert set_up(MultiTeacherConfig(weighting="average"), 4).weights.tolist() == [0.25] * 4
    fixed = set_up(MultiTeacherConfig(weighting="fixed", weights=[3.0, 1.0]), 2)
    assert fixed.weights.tolist() == [0.75, 0.25]
    assert "weights" in fixed.state_dict() and "scores" in fixed.state_dict()  # checkpointed


# ---------------------------------------------------------------------------------------------- errors


def test_weights_length_mismatch_names_both_counts():
    with pytest.raises(RecipeError) as err:
        set_up(MultiTeacherConfig(weighting="fixed", weights=[0.5, 0.3, 0.2]), 2)
    msg = str(err.value)
    assert "3" in msg and "2 teachers" in msg and "\n" not in msg


def test_single_non_ensemble_teacher_is_a_clear_error():
    m = MultiTeacher(MultiTeacherConfig(weighting="average"))
    info = SetupInfo(student=None, num_classes=3, num_samples=4, steps_per_epoch=1, epochs=1)
    with pytest.raises(AlambicError, match="teachers: "):
        m.setup(student_out(f64(S)), {INPUT: ModelOutput(f64(T0))}, info)  # a plain teacher: no members
    with pytest.raises(AlambicError, match="teachers: "):
        m.setup(student_out(f64(S)), None, info)


@pytest.mark.parametrize("kwargs", [
    {"weighting": "fixed"},  # no weights
    {"weighting": "fixed", "weights": [0.5, -0.1]},  # negative
    {"weighting": "fixed", "weights": [0.0, 0.0]},  # zero sum
    {"weighting": "similarity", "weights": [0.5, 0.5]},  # weights without fixed
    {"weighting": "softmax"},
    {"weighting": "average", "temprature": 2.0},
])
def test_config_rejects_bad_options(kwargs):
    with pytest.raises(pydantic.ValidationError):
        MultiTeacherConfig(**kwargs)


# ----------------------------------------------------------------------------------- similarity scores


def brute_force_loo_centroid(f: np.ndarray, y: np.ndarray) -> float:
    hits = 0
    for i in range(len(f)):
        keep = np.arange(len(f)) != i
        best, best_d = None, np.inf
        for c in np.unique(y):  # ascending: ties go to the lower class
            rows = keep & (y == c)
            if not rows.any():
                continue
            d = ((f[i] - f[rows].mean(0)) ** 2).sum()
            if d < best_d:
                best, best_d = c, d
        hits += best == y[i]
    return hits / len(f)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_centroid_accuracy_is_leave_one_out(seed):
    rng = np.random.default_rng(seed)
    y = np.array([0] * 6 + [1] * 5 + [2] * 4 + [3])  # class 3 has a single sample: never predictable for it
    f = rng.normal(size=(len(y), 3)) + y[:, None] * 0.8
    got = nearest_centroid_accuracy(torch.tensor(f), torch.tensor(y))
    assert got == pytest.approx(brute_force_loo_centroid(f, y), abs=1e-12)


def test_nearest_centroid_accuracy_is_not_resubstitution():
    # two points per class, each nearer the other class's mean once it is left out
    f = torch.tensor([[0.0], [3.0], [1.0], [2.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    assert nearest_centroid_accuracy(f, y) == 0.0  # resubstitution would give 0.5


def test_similarity_weights_are_a_tempered_softmax():
    scores = torch.tensor([0.9, 0.7, 0.85], dtype=torch.float64)
    w = similarity_weights(scores, 0.05)
    e = np.exp(np.array([0.9, 0.7, 0.85]) / 0.05)
    np.testing.assert_allclose(w.numpy(), e / e.sum(), rtol=1e-12)
    assert (w >= 0).all() and w.sum().item() == pytest.approx(1.0, abs=1e-15)


def scoring_setup():
    """Three analytic teachers on 12 labelled + 4 unlabelled samples of 3 classes.

    x = one-hot(class) + noise; teacher A reads the class from x (perfect), B confuses class 2 with 1,
    C answers class 0 always. Unlabelled rows carry a class pattern every teacher gets wrong, so they
    would change the scores if they were (wrongly) used.
    """
    y_true = torch.tensor([0, 1, 2] * 4 + [0, 1, 2, 0])
    labeled = torch.tensor([True] * 12 + [False] * 4)
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.one_hot(y_true, 3).double() + 0.05 * torch.randn(16, 3, generator=g, dtype=torch.float64)
    x[12:] = torch.tensor([5.0, -5.0, 0.0], dtype=torch.float64)  # misleading unlabelled inputs
    y = torch.where(labeled, y_true, torch.full_like(y_true, IGNORE_INDEX))
    split = Split(x=x, y=y, index=torch.arange(16) * 2, labeled=labeled)
    loader = type("L", (), {"split": split})()

    def perfect(x):
        return 10 * x

    def confused(x):
        z = 10 * x.clone()
        z[:, 1] = z[:, 1] + z[:, 2]
        z[:, 2] = 0
        return z

    def constant(x):
        return torch.tensor([[1.0, 0.0, 0.0]], dtype=x.dtype).expand(len(x), 3) + 0 * x

    ens = TeacherEnsemble([AnalyticTeacher(fn) for fn in (perfect, confused, constant)])
    info = SetupInfo(student=None, num_classes=3, num_samples=32, steps_per_epoch=1, epochs=1, loader=loader, teacher=ens)
    probe = ens.outputs(Batch(views={INPUT: x[:4]}, index=split.index[:4]), [INPUT])
    return info, probe


def test_similarity_scores_use_labelled_data_only_and_weights_follow():
    info, probe = scoring_setup()
    m = MultiTeacher(MultiTeacherConfig(weighting="similarity", score="accuracy", weight_temperature=0.1, batch_size=5))
    m.setup(student_out(torch.zeros(4, 3)), probe, info)
    # own accuracy on the 12 labelled rows: A 12/12, B 8/12 (class 2 lost), C 4/12
    np.testing.assert_allclose(m.scores.numpy(), [1.0, 8 / 12, 4 / 12], rtol=1e-12)
    e = np.exp(np.array([1.0, 8 / 12, 4 / 12]) / 0.1)
    np.testing.assert_allclose(m.weights.numpy(), e / e.sum(), rtol=1e-12)
    assert m.weights.sum().item() == pytest.approx(1.0) and (m.weights >= 0).all()


def test_centroid_score_and_nearest_pick_the_most_similar_teacher():
    info, probe = scoring_setup()
    m = MultiTeacher(MultiTeacherConfig(weighting="nearest", score="centroid"))
    m.setup(student_out(torch.zeros(4, 3)), probe, info)
    split = info.loader.split
    lab = split.labeled_only()
    members = info.teacher.outputs(Batch(views={INPUT: lab.x}, index=lab.index), [INPUT])[INPUT].members
    expected = [brute_force_loo_centroid(t.logits.numpy(), lab.y.numpy()) for t in members]
    np.testing.assert_allclose(m.scores.numpy(), expected, rtol=1e-12)
    # A's logits separate all three classes; B merges classes 1 and 2; C's logits are constant
    assert expected[0] == 1.0 and max(expected[1:]) < 0.5
    assert m.weights.tolist() == [1.0, 0.0, 0.0]


def test_multi_teacher_is_registered_with_its_paper():
    entry = METHODS.get("multi_teacher")
    assert entry.obj is MultiTeacher and entry.config is MultiTeacherConfig
    assert "2304.12314" in entry.paper
    assert MultiTeacher.needs_teacher and MultiTeacher.uses_unlabeled
