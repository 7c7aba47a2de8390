"""Self-supervised methods as mechanisms: view plans, DINO's center and temperature, stop-gradients into the
EMA teacher, BYOL's student-only predictor, SEED's FIFO queue, SwAV's codes, iBOT's masked tokens, the
EmbeddingNet wrapper and label-free loaders.

Expected values are computed with numpy / math here, never by calling the method under test.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from alambic.data.batch import INPUT, Batch
from alambic.data.loader import TensorLoader, WithoutLabels
from alambic.data.splits import Split
from alambic.data.views import AugmentedLoader, ViewMaker
from alambic.errors import AlambicError, ShapeMismatchError
from alambic.losses import sinkhorn
from alambic.methods import SetupInfo, StepContext
from alambic.methods._ssl import cross_view_plan, warmup_then_constant
from alambic.methods.byol import BYOL, BYOLConfig
from alambic.methods.dino import DINO, TEACHER_TEMPERATURE, DINOConfig
from alambic.methods.ibot import TOKENS, IBOT, IBOTConfig
from alambic.methods.seed import SEED, SEEDConfig
from alambic.methods.swav import SwAV, SwAVConfig
from alambic.models.heads import EmbeddingNet, MLPHead
from alambic.models.zoo import SmallCNN
from alambic.recipe import load_recipe
from alambic.recipe.schema import TrainSpec
from alambic.teachers.base import ModelOutput
from alambic.teachers.ema import EmaTeacher
from alambic.teachers.frozen import model_outputs
from alambic.train import Trainer
from tests.conftest import tiny_recipe
from tests.reference import np_softmax

CTX = StepContext(step=0, epoch=0, total_steps=10, steps_per_epoch=5)
TWO_GLOBALS = ["input", "global_0", "global_1"]


def outs(logits: dict[str, torch.Tensor], **features: dict[str, torch.Tensor]) -> dict[str, ModelOutput]:
    """ModelOutputs per view; ``features[name][view]`` is that view's tap ``name``."""
    return {v: ModelOutput(x, {k: f[v] for k, f in features.items() if v in f}) for v, x in logits.items()}


def randn(*shape, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def empty_batch(n: int = 4, **extras) -> Batch:
    return Batch(views={INPUT: torch.zeros(n, 1)}, index=torch.arange(n), extras=extras)


# ------------------------------------------------------------------------------------------ view plan


def test_cross_view_plan_puts_globals_first_in_teacher_order_and_locals_after():
    names = ["input", "local_0", "global_0", "local_1", "global_1"]
    student, teacher = cross_view_plan(names, "dino")
    assert teacher == ("global_0", "global_1")
    assert student == ("global_0", "global_1", "local_0", "local_1")  # student view i == teacher view i
    assert cross_view_plan(["input", "global"] + ["local"], "dino") == (("global", "local"), ("global",))


def test_cross_view_plan_treats_two_non_global_views_as_global():
    assert cross_view_plan(["input", "weak", "strong"], "byol") == (("weak", "strong"), ("weak", "strong"))
    assert cross_view_plan(["input", "a_0", "a_1"], "byol") == (("a_0", "a_1"), ("a_0", "a_1"))


@pytest.mark.parametrize("names", [["input"], ["input", "global"], ["input", "weak"], ["input", "a", "b", "c"]])
def test_cross_view_plan_refuses_fewer_than_two_usable_views(names):
    with pytest.raises(AlambicError, match="dino"):
        cross_view_plan(names, "dino")


def test_cross_view_plan_masked_gives_the_student_the_masked_globals():
    names = ["input", "global_0", "global_1", "local_0", "masked_global_0", "masked_global_1"]
    student, teacher = cross_view_plan(names, "ibot", masked=True)
    assert student == ("masked_global_0", "masked_global_1", "local_0")
    assert teacher == ("global_0", "global_1")
    # unmasked: the masked copies are not views of their own
    assert cross_view_plan(names, "dino") == (("global_0", "global_1", "local_0"), ("global_0", "global_1"))
    with pytest.raises(AlambicError, match=r"masked_global_1.*views.mask"):
        cross_view_plan(names[:-1], "ibot", masked=True)


# ------------------------------------------------------------------------------------------------ DINO


def _dino(k=5, **kw) -> DINO:
    m = DINO(DINOConfig(out_dim=k, **kw))
    m.use_views(["input", "global_0", "global_1", "local_0"])
    return m


def _dino_outputs(k=5, b=3):
    s = outs({v: randn(b, k, seed=i) for i, v in enumerate(["global_0", "global_1", "local_0"])})
    t = outs({v: randn(b, k, seed=10 + i) for i, v in enumerate(["global_0", "global_1"])})
    return s, t


def test_dino_training_forward_moves_the_center_by_its_ema_and_eval_does_not():
    method = _dino(center_momentum=0.8)
    c0 = randn(1, 5, seed=99)
    method.center.copy_(c0)
    s, t = _dino_outputs()
    method.train()
    method(s, t, empty_batch(), CTX)
    teacher_mean = np.concatenate([t["global_0"].logits.numpy(), t["global_1"].logits.numpy()]).mean(0)
    expected = 0.8 * c0.numpy() + 0.2 * teacher_mean
    np.testing.assert_allclose(method.center.numpy(), expected, rtol=1e-6, atol=1e-7)
    assert method.center.shape == (1, 5)
    before = method.center.clone()
    method.eval()
    method(s, t, empty_batch(), CTX)
    assert torch.equal(method.center, before)


def test_dino_loss_uses_the_center_before_its_update_and_the_scheduled_temperature():
    method = _dino(center_momentum=0.5, student_temperature=0.2)
    c0 = randn(1, 5, seed=7)
    method.center.copy_(c0)
    s, t = _dino_outputs()
    ctx = StepContext(0, 0, 10, 5, {TEACHER_TEMPERATURE: 0.3})
    loss = method.train()(s, t, empty_batch(), ctx).loss
    total, pairs = 0.0, 0
    for i, tv in enumerate(["global_0", "global_1"]):
        p_t = np_softmax((t[tv].logits.numpy().astype(np.float64) - c0.numpy()) / 0.3)
        for j, sv in enumerate(["global_0", "global_1", "local_0"]):
            if i == j:
                continue
            log_p_s = np.log(np_softmax(s[sv].logits.numpy().astype(np.float64) / 0.2))
            total += (-(p_t * log_p_s).sum(-1)).mean()
            pairs += 1
    assert pairs == 4
    assert float(loss) == pytest.approx(total / pairs, rel=1e-5)


def test_dino_uniform_outputs_give_ln_k_and_the_collapse_monitor_reads_one():
    k = 7
    method = _dino(k)
    method.center.copy_(randn(1, k, seed=3))  # the student is uniform: the target does not matter
    zeros = {v: torch.zeros(4, k) for v in ["global_0", "global_1", "local_0"]}
    out = method.train()(outs(zeros), outs({v: zeros[v] for v in ["global_0", "global_1"]}), empty_batch(), CTX)
    assert float(out.loss) == pytest.approx(math.log(k), rel=1e-6)
    assert float(out.monitors["loss_over_lnK"]) == pytest.approx(1.0, rel=1e-6)
    assert set(out.monitors) >= {"H_teacher", "H_mean", "loss_over_lnK"}


def test_dino_teacher_temperature_is_linear_over_the_warmup_then_constant():
    method = DINO(DINOConfig(warmup_teacher_temperature=0.02, teacher_temperature=0.07,
                             warmup_teacher_temperature_epochs=2))
    info = SetupInfo(None, 10, 100, steps_per_epoch=5, epochs=4)  # 20 steps, 10 of warm-up
    values = method.schedules(info)[TEACHER_TEMPERATURE]
    assert len(values) == 20
    expected = [0.02 + 0.05 * s / 10 for s in range(10)] + [0.07] * 10
    np.testing.assert_allclose(values, expected, rtol=0, atol=1e-12)
    assert method.teacher_temperature(StepContext(3, 0, 20, 5, {TEACHER_TEMPERATURE: values[3]})) == values[3]
    assert method.teacher_temperature(CTX) == 0.07  # no schedule handed over: the final value
    # without warm-up: constant; a fractional warm-up is counted in steps
    np.testing.assert_array_equal(warmup_then_constant(6, 3, 0.01, 0.04, 0.0), [0.04] * 6)
    np.testing.assert_allclose(warmup_then_constant(4, 4, 0.0, 1.0, 0.5), [0.0, 0.5, 1.0, 1.0])


# -------------------------------------------------------------------------- stop-gradient into the teacher


def _split(n=32, seed=0) -> Split:
    x = randn(n, 1, 8, 8, seed=seed)
    return Split(x=x, y=torch.arange(n) % 10, index=torch.arange(n), labeled=torch.ones(n, dtype=torch.bool))


def _ssl_loader(split: Split, batch_size=16) -> AugmentedLoader:
    maker = ViewMaker({"groups": {"global": {"count": 2, "scale": [0.5, 1.0], "jitter": 0.2}}}, (1, 8, 8))
    return AugmentedLoader(WithoutLabels(TensorLoader(split, batch_size, seed=0)), maker, seed=0)


def _wrapped(name: str):
    torch.manual_seed(0)
    cnn = SmallCNN(1, (8, 8), [4, 8], 10)
    method = {"dino": lambda: DINO(DINOConfig(out_dim=8, hidden=16, bottleneck=8)),
              "byol": lambda: BYOL(BYOLConfig(projection_dim=8, hidden=16, predictor_hidden=16))}[name]()
    method.use_views(TWO_GLOBALS)
    net = method.wrap_student(cnn, torch.zeros(2, 1, 8, 8), "cnn")
    return cnn, method, net


@pytest.mark.parametrize("name", ["dino", "byol"])
def test_no_gradient_reaches_the_ema_teacher_and_every_student_part_gets_one(name):
    cnn, method, net = _wrapped(name)
    assert isinstance(net, EmbeddingNet) and net.backbone is cnn
    teacher = EmaTeacher(net, momentum=0.9)
    batch = next(iter(_ssl_loader(_split()).epoch(0)))
    net.train(), method.train()
    t_out = teacher.outputs(batch, method.teacher_views)
    assert all(not o.logits.requires_grad for o in t_out.values())
    s_out = model_outputs(net, batch, method.student_views, None)
    method(s_out, t_out, batch, CTX).loss.backward()
    for pname, p in teacher.model.named_parameters():
        assert p.grad is None and not p.requires_grad, pname
    trained = [(n, p) for n, p in net.named_parameters() if not n.startswith("backbone.head.")]
    assert any(n.startswith("backbone.features.") for n, _ in trained)
    assert any(n.startswith("head.") for n, _ in trained)
    for pname, p in trained:  # backbone up to the representation, and the projection head
        assert p.grad is not None and p.grad.abs().sum() > 0, pname
    assert all(p.grad is None for p in net.backbone.head.parameters())  # the classifier after `pool` is unused
    if name == "byol":
        assert all(p.grad is not None for p in method.predictor.parameters())


@pytest.mark.parametrize("name", ["dino", "byol"])
def test_a_trainer_step_moves_the_teacher_toward_the_student_by_the_ema_formula(name):
    _, method, net = _wrapped(name)
    teacher = EmaTeacher(net, momentum=0.75)
    loader = _ssl_loader(_split())
    trainer = Trainer(net, method, loader, TrainSpec(epochs=1, batch_size=16, lr=0.05), teacher=teacher,
                      progress=False)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    batch = next(iter(loader.epoch(0)))
    trainer.train_step(batch, CTX)
    student, after = net.state_dict(), teacher.model.state_dict()
    moved = 0
    for k, t_new in after.items():
        if t_new.dtype.is_floating_point:
            torch.testing.assert_close(t_new, 0.75 * before[k] + 0.25 * student[k], rtol=1e-6, atol=1e-7)
            moved += not torch.equal(t_new, before[k])
        else:
            assert torch.equal(t_new, student[k]), k  # num_batches_tracked is copied
    assert moved > 0  # the student did change, so the check is not vacuous
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training


# ------------------------------------------------------------------------------------------------ BYOL


def test_byol_predictor_belongs_to_the_method_not_to_the_ema_teacher():
    _, method, net = _wrapped("byol")
    teacher = EmaTeacher(net)
    predictor = {id(p) for p in method.predictor.parameters()}
    assert predictor and predictor <= {id(p) for p in method.parameters()}
    assert not predictor & {id(p) for p in net.parameters()}
    assert not any("predictor" in n for n, _ in teacher.model.named_modules())
    assert not any("predictor" in k for k in teacher.model.state_dict())
    assert set(teacher.model.state_dict()) == set(net.state_dict())


def test_byol_loss_pairs_each_teacher_view_with_the_other_student_view_and_is_symmetric():
    method = BYOL(BYOLConfig(projection_dim=6, predictor_hidden=8))
    method.use_views(TWO_GLOBALS)
    method.eval()  # fixed BatchNorm statistics: the predictor is a fixed function here
    s = {"global_0": randn(5, 6, seed=1), "global_1": randn(5, 6, seed=2)}
    t = {"global_0": randn(5, 6, seed=3), "global_1": randn(5, 6, seed=4)}
    with torch.no_grad():
        loss = method(outs(s), outs(t), empty_batch(5), CTX).loss
        swapped = method(outs({"global_0": s["global_1"], "global_1": s["global_0"]}),
                         outs({"global_0": t["global_1"], "global_1": t["global_0"]}), empty_batch(5), CTX).loss
    assert float(loss) == pytest.approx(float(swapped), rel=1e-6)

    def np_byol(p, z):
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        return (2 - 2 * (p * z).sum(1)).mean()

    with torch.no_grad():
        q = {v: method.predictor(x).numpy() for v, x in s.items()}
    expected = (np_byol(q["global_1"], t["global_0"].numpy()) + np_byol(q["global_0"], t["global_1"].numpy())) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------ SEED


def test_seed_queue_is_fifo_wraps_and_returns_the_last_rows_oldest_first():
    method = SEED(SEEDConfig(queue_size=5))
    method.queue = torch.zeros(5, 3)
    rows = randn(7, 3, seed=0) * 4
    method.enqueue(rows[:3])
    torch.testing.assert_close(method.stored(), F.normalize(rows[:3], dim=-1))
    method.enqueue(rows[3:])
    torch.testing.assert_close(method.stored(), F.normalize(rows[2:7], dim=-1))
    assert int(method.queue_ptr) == 2 and int(method.queue_filled) == 5
    assert torch.allclose(method.stored().norm(dim=-1), torch.ones(5))
    method.enqueue(rows)  # more rows than the queue: only the last 5 stay
    torch.testing.assert_close(method.stored(), F.normalize(rows[2:7], dim=-1))


def test_seed_queue_position_and_fill_are_checkpointed():
    method = SEED(SEEDConfig(queue_size=5))
    method.queue = torch.zeros(5, 3)
    method.enqueue(randn(7, 3, seed=1))
    state = method.state_dict()
    assert {"queue", "queue_ptr", "queue_filled"} <= set(state)
    fresh = SEED(SEEDConfig(queue_size=5))
    fresh.queue = torch.zeros(5, 3)  # what setup sizes before a checkpoint is loaded
    fresh.load_state_dict(state)
    assert torch.equal(fresh.stored(), method.stored())
    assert int(fresh.queue_ptr) == int(method.queue_ptr) and int(fresh.queue_filled) == 5


def _seed(queue_size: int) -> tuple[SEED, dict, dict]:
    method = SEED(SEEDConfig(queue_size=queue_size, hidden=8, feature="pool", teacher_feature="emb"))
    method.use_views(["input", "global_0", "global_1"])
    assert method.student_views == method.teacher_views == ("global_0",)  # both see the same view
    s = outs({"global_0": torch.zeros(6, 10)}, pool={"global_0": randn(6, 4, seed=0)})
    t = outs({"global_0": torch.zeros(6, 10)}, emb={"global_0": randn(6, 3, seed=1)})
    method.setup(s, t, SetupInfo(None, 10, 6, 1, 1))
    return method, s, t


def test_seed_with_an_empty_queue_has_loss_exactly_zero():
    method, s, t = _seed(0)
    for _ in range(2):
        assert float(method.train()(s, t, empty_batch(6), CTX).loss.detach()) == 0.0
    assert method.stored().shape == (0, 3)


def test_seed_enqueues_the_teacher_embeddings_in_training_only():
    method, s, t = _seed(8)
    first = method.eval()(s, t, empty_batch(6), CTX).loss.detach()
    assert float(first) == 0.0 and int(method.queue_filled) == 0
    method.train()(s, t, empty_batch(6), CTX)
    torch.testing.assert_close(method.stored(), F.normalize(t["global_0"].features["emb"], dim=-1))
    assert float(method(s, t, empty_batch(6), CTX).loss.detach()) > 0  # now the queue is a support


# ------------------------------------------------------------------------------------------------ SwAV


def _swav(**kw) -> SwAV:
    m = SwAV(SwAVConfig(prototypes=6, **kw))
    m.use_views(TWO_GLOBALS)
    return m


def np_swav(student: dict, codes: dict, tau: float, hard: bool = False) -> float:
    total = 0.0
    for i, tv in enumerate(["global_0", "global_1"]):
        for j, sv in enumerate(["global_0", "global_1"]):
            if i == j:
                continue
            log_p = np.log(np_softmax(student[sv].numpy().astype(np.float64) / tau))
            q = codes[tv].numpy().astype(np.float64)
            if hard:
                q = np.eye(q.shape[1])[q.argmax(1)]
            total += (-(q * log_p).sum(1)).mean()
    return total / 2


def test_swav_codes_come_from_the_teacher_when_there_is_one():
    method = _swav()
    s = {v: randn(6, 6, seed=i) for i, v in enumerate(["global_0", "global_1"])}
    t1 = {v: randn(6, 6, seed=10 + i) for i, v in enumerate(["global_0", "global_1"])}
    t2 = {v: randn(6, 6, seed=20 + i) for i, v in enumerate(["global_0", "global_1"])}
    l1 = float(method(outs(s), outs(t1), empty_batch(6), CTX).loss)
    l2 = float(method(outs(s), outs(t2), empty_batch(6), CTX).loss)
    assert l1 != pytest.approx(l2)
    codes = {v: sinkhorn(x, 0.05, 3) for v, x in t1.items()}
    assert l1 == pytest.approx(np_swav(s, codes, 0.1), rel=1e-5)


def test_swav_without_a_teacher_uses_the_students_own_detached_scores():
    method = _swav()
    s = {v: randn(6, 6, seed=i).requires_grad_(True) for i, v in enumerate(["global_0", "global_1"])}
    loss = method(outs(s), None, empty_batch(6), CTX).loss
    codes = {v: sinkhorn(x.detach(), 0.05, 3) for v, x in s.items()}
    assert float(loss.detach()) == pytest.approx(np_swav({v: x.detach() for v, x in s.items()}, codes, 0.1), rel=1e-5)
    loss.backward()
    # the codes are constants: the gradient is that of the cross-entropy with fixed targets
    ref = {v: x.detach().clone().requires_grad_(True) for v, x in s.items()}
    manual = sum((-(codes[t] * F.log_softmax(ref[v] / 0.1, -1)).sum(-1)).mean()
                 for t, v in [("global_0", "global_1"), ("global_1", "global_0")]) / 2
    manual.backward()
    for v in s:
        torch.testing.assert_close(s[v].grad, ref[v].grad)


def test_swav_hard_codes_equal_soft_codes_when_the_codes_are_one_hot():
    perm = [torch.tensor([2, 0, 5, 1, 4, 3]), torch.tensor([1, 3, 0, 2, 5, 4])]
    # far-apart teacher scores over a permutation: Sinkhorn gives exactly one-hot, balanced codes
    t = {v: 100.0 * F.one_hot(p, 6).float() for v, p in zip(["global_0", "global_1"], perm)}
    assert all(torch.equal(sinkhorn(x, 0.05, 3), x / 100) for x in t.values())
    s = {v: randn(6, 6, seed=i) for i, v in enumerate(["global_0", "global_1"])}
    soft = float(_swav()(outs(s), outs(t), empty_batch(6), CTX).loss)
    hard = float(_swav(hard=True)(outs(s), outs(t), empty_batch(6), CTX).loss)
    assert hard == pytest.approx(soft, rel=1e-6)
    # on soft codes the two differ (so the flag is read)
    t_soft = {v: randn(6, 6, seed=30 + i) for i, v in enumerate(t)}
    soft2 = float(_swav()(outs(s), outs(t_soft), empty_batch(6), CTX).loss)
    hard2 = float(_swav(hard=True)(outs(s), outs(t_soft), empty_batch(6), CTX).loss)
    assert hard2 != pytest.approx(soft2, rel=1e-3)
    codes = {v: sinkhorn(x, 0.05, 3) for v, x in t_soft.items()}
    assert hard2 == pytest.approx(np_swav(s, codes, 0.1, hard=True), rel=1e-5)


# ------------------------------------------------------------------------------------------------ iBOT

IBOT_VIEWS = ["input", "global_0", "global_1", "masked_global_0", "masked_global_1"]
B, N, K = 3, 4, 5


def _ibot_inputs(cls_token: bool = True):
    n = N + int(cls_token)
    s = outs({v: randn(B, K, seed=i) for i, v in enumerate(["masked_global_0", "masked_global_1"])},
             **{TOKENS: {v: randn(B, n, K, seed=10 + i) for i, v in enumerate(["masked_global_0", "masked_global_1"])}})
    t = outs({v: randn(B, K, seed=20 + i) for i, v in enumerate(["global_0", "global_1"])},
             **{TOKENS: {v: randn(B, n, K, seed=30 + i) for i, v in enumerate(["global_0", "global_1"])}})
    masks = {"mask:global_0": torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool),
             "mask:global_1": torch.tensor([[0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)}
    return s, t, empty_batch(B, **masks)


def _ibot() -> IBOT:
    m = IBOT(IBOTConfig(out_dim=K, student_temperature=0.1, patch_temperature=0.07))
    m.use_views(IBOT_VIEWS)
    m.patch_center.copy_(randn(1, K, seed=77))
    return m.eval()  # centers frozen: repeated calls compare like with like


def np_patch(s, t, batch, center) -> float:
    """iBOT's masked-token term, class token dropped, mean over samples of the mean over masked patches."""
    per_view = []
    for sv, tv in [("masked_global_0", "global_0"), ("masked_global_1", "global_1")]:
        st = s[sv].features[TOKENS][:, 1:].numpy().astype(np.float64)
        tt = t[tv].features[TOKENS][:, 1:].numpy().astype(np.float64)
        m = batch.extras[f"mask:{tv}"].numpy().astype(np.float64)
        p_t = np_softmax((tt - center) / 0.07)
        ce = -(p_t * np.log(np_softmax(st / 0.1))).sum(-1)
        per_view.append(((ce * m).sum(1) / np.maximum(m.sum(1), 1)).mean())
    return float(np.mean(per_view))


def test_ibot_patch_term_reads_masked_tokens_only_and_drops_the_class_token():
    method = _ibot()
    s, t, batch = _ibot_inputs()
    out = method(s, t, batch, CTX)
    patch = float(out.terms["patch"])
    assert patch == pytest.approx(np_patch(s, t, batch, method.patch_center.numpy()), rel=1e-5)
    assert float(out.loss) == pytest.approx(float(out.terms["cls"]) + patch, rel=1e-6)
    tok = s["masked_global_0"].features[TOKENS]
    mask = batch.extras["mask:global_0"]
    changed = tok.clone()
    changed[:, 0] = 10 * randn(B, K, seed=5)  # the class token
    changed[:, 1:][~mask] = 10 * randn(int((~mask).sum()), K, seed=6)  # every unmasked patch
    s["masked_global_0"].features[TOKENS] = changed
    assert float(method(s, t, batch, CTX).terms["patch"]) == pytest.approx(patch, rel=1e-6)
    changed2 = changed.clone()
    changed2[:, 1:][mask] = 10 * randn(int(mask.sum()), K, seed=7)  # the masked patches: the term must move
    s["masked_global_0"].features[TOKENS] = changed2
    assert float(method(s, t, batch, CTX).terms["patch"]) != pytest.approx(patch, rel=1e-4)


def test_ibot_without_class_token_and_the_patch_center_update():
    method = _ibot()
    s, t, batch = _ibot_inputs(cls_token=False)
    c0 = method.patch_center.clone()
    method.train()(s, t, batch, CTX)
    tokens = torch.cat([t[v].features[TOKENS].reshape(-1, K) for v in ["global_0", "global_1"]])
    torch.testing.assert_close(method.patch_center, 0.9 * c0 + 0.1 * tokens.mean(0, keepdim=True))


def test_ibot_mask_token_count_mismatch_and_a_missing_mask_are_clear_errors():
    method = _ibot()
    s, t, batch = _ibot_inputs()
    for v in ("masked_global_0", "masked_global_1"):
        s[v].features[TOKENS] = randn(B, N + 3, K, seed=1)
    for v in ("global_0", "global_1"):
        t[v].features[TOKENS] = randn(B, N + 3, K, seed=2)
    with pytest.raises(ShapeMismatchError, match=r"7 tokens but the mask has 4 patches.*patch_size"):
        method(s, t, batch, CTX)
    s, t, batch = _ibot_inputs()
    with pytest.raises(AlambicError, match="no mask for view 'global_0'"):
        method(s, t, empty_batch(B), CTX)


# ------------------------------------------------------------------------------------------ EmbeddingNet


def test_a_deep_copy_of_an_embedding_net_carries_no_hooks_and_reads_its_own_backbone():
    torch.manual_seed(0)
    net = EmbeddingNet(SmallCNN(1, (8, 8), [4, 8], 10), "pool", MLPHead(8, 3, 8))
    net.eval()
    x = randn(4, 1, 8, 8, seed=0)
    y = net(x)
    twin = copy.deepcopy(net)
    torch.testing.assert_close(twin(x), y)
    with torch.no_grad():
        for p in twin.backbone.parameters():
            p.add_(1.0)
    y_twin = twin(x)
    torch.testing.assert_close(net(x), y)  # the original's output is untouched by the copy's forward
    assert not torch.allclose(y_twin, y)
    for model in (net, twin):
        for name, m in model.named_modules():
            assert not m._forward_hooks and not m._forward_pre_hooks, name
    feat, toks = twin.representation(x)
    assert feat.shape == (4, 8) and toks is None


def test_embedding_net_names_the_children_on_a_wrong_path():
    cnn = SmallCNN(1, (8, 8), [4, 8], 10)
    with pytest.raises(AlambicError, match=r"no submodule 'poool' \(children: features, pool, drop, head\)"):
        EmbeddingNet(cnn, "poool", MLPHead(8, 3))
    with pytest.raises(AlambicError, match=r"features has no submodule 'block7' \(children: block0, block1\)"):
        EmbeddingNet(cnn, "pool", MLPHead(8, 3), tokens="features.block7", share_token_head=True)
    with pytest.raises(AlambicError, match="token_head"):
        EmbeddingNet(cnn, "pool", MLPHead(8, 3), tokens="features.block1")


# ------------------------------------------------------------------------------------------ no labels


def test_without_labels_strips_target_and_labeled_and_keeps_everything_else():
    split = _split(20)
    split.labeled[::2] = False
    inner = TensorLoader(split, 8, seed=3)
    loader = WithoutLabels(inner)
    assert len(loader) == len(inner) == 3 and loader.split is split
    for a, b in zip(inner.epoch(1, start=1), loader.epoch(1, start=1)):
        assert b.target is None and b.labeled is None
        assert torch.equal(a.index, b.index) and torch.equal(a.views[INPUT], b.views[INPUT])


def _byol_recipe(labeled_fraction: float):
    return load_recipe(tiny_recipe(
        data={"name": "digits", "labeled_fraction": labeled_fraction},
        student={"arch": "cnn", "channels": [4, 8]},
        teacher={"ema": {"momentum": 0.9, "end_momentum": 1.0}},
        views={"groups": {"global": {"count": 2, "scale": [0.5, 1.0], "jitter": 0.2}}},
        method={"name": "byol", "projection_dim": 8, "hidden": 16, "predictor_hidden": 16},
        train={"steps": 5, "batch_size": 64, "lr": 0.01, "log_every": 2},
        eval={"latency_repeats": 1, "probe_every": 2},  # online probes read labels: they must not steer training
    ))


def test_self_supervised_training_is_independent_of_the_labels(tmp_path, monkeypatch):
    import alambic.probe
    import alambic.report

    from alambic.run import run

    # the plots and the (slow) logistic-regression probe are not under test here; the kNN probes run
    monkeypatch.setattr(alambic.report, "render_report", lambda run_dir: None)
    monkeypatch.setattr(alambic.probe, "linear_probe", lambda *a, **k: {"val_accuracy": None, "c": None})
    full = run(_byol_recipe(1.0), tmp_path / "full", progress=False)
    few = run(_byol_recipe(0.1), tmp_path / "few", progress=False)
    for s in (full, few):
        assert s["kind"] == "representation"
        assert s["train"]["labeled_train_samples"] == 0 and s["train"]["train_samples"] == 1168
    a, b = (load_file(str(tmp_path / d / "student.safetensors")) for d in ("full", "few"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the same representation, probed with 10x fewer labels: only the probes differ
    assert full["probe"]["feature_std"] == few["probe"]["feature_std"]
    assert full["test"]["knn_accuracy"] != few["test"]["knn_accuracy"]


@pytest.mark.parametrize("flag", [True, False])
def test_byol_makes_its_ema_target_use_batch_statistics(flag):
    """BYOL's target network normalises with batch statistics; with running ones the tiny runs collapse."""
    cnn = SmallCNN(1, (8, 8), [4, 8], 10)
    method = BYOL(BYOLConfig(projection_dim=8, hidden=16, predictor_hidden=16, target_batch_stats=flag))
    method.use_views(TWO_GLOBALS)
    net = method.wrap_student(cnn, torch.zeros(2, 1, 8, 8), "cnn")
    teacher = EmaTeacher(net)
    assert not teacher.batch_stats
    method.setup({}, None, SetupInfo(net, 8, 32, 2, 1, teacher=teacher))
    assert teacher.batch_stats is flag
