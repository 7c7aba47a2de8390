"""``comodo`` and ``instance_nce`` through the paired batch: the queue, the loss, what learns, and a resume.

Expected values are computed with NumPy from COMODO's objective (Chen et al., arXiv:2503.07259, §3; the keys
are ``[Q; z_t]``, τ_t = 0.1 on the teacher, τ_s = 0.05 on the student) and InfoNCE (arXiv:1807.03748, Eq. 4),
never by calling the losses under test. Everything here runs without any extra package: the teacher's
embeddings are a paired view made in the test (the way ``emoji_text`` carries MiniLM's), or a small frozen CNN.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from alambic.data import RawData
from alambic.data.batch import INPUT
from alambic.data.loader import TensorLoader
from alambic.data.paired import PairedData, PairedLoader
from alambic.data.splits import bundle
from alambic.errors import AlambicError
from alambic.methods.base import StepContext
from alambic.methods.comodo import COMODO, COMODOConfig
from alambic.methods.instance_nce import InstanceNCE, InstanceNCEConfig
from alambic.models.zoo import SmallCNN
from alambic.recipe.schema import TrainSpec
from alambic.registry import DATASETS, Entry, NoOptions
from alambic.teachers.base import ModelOutput
from alambic.teachers.frozen import FrozenTeacher
from alambic.train import state as st
from alambic.train.loop import Trainer
from tests.conftest import KillAt

CTX = StepContext(step=0, epoch=0, total_steps=1, steps_per_epoch=1)
D = 4


def np_softmax(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_comodo(z_s, z_t, queue, tau_s=0.05, tau_t=0.1) -> float:
    keys = np.concatenate([queue, z_t])
    p_t = np_softmax(z_t @ keys.T / tau_t)
    log_p_s = np.log(np_softmax(unit(z_s) @ keys.T / tau_s))
    return float(-(p_t * log_p_s).sum() / len(z_s))


def paired(n: int = 24, seed: int = 0) -> tuple[PairedData, torch.Tensor]:
    """n tiny images (the student's modality) and a 'text' view of unit embeddings (the teacher's, cached)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=1)
    raw = RawData(torch.rand(n, 1, 4, 4, generator=g), torch.arange(n) % 2, ["a", "b"], f"fp{seed}")
    return PairedData(raw, {"text": z.float()}), z


def loader_of(data: PairedData, batch_size: int = 4) -> PairedLoader:
    split = bundle(data.raw, val_fraction=0.2, test_fraction=0.2, labeled_fraction=1.0, split_seed=0).train
    return PairedLoader(TensorLoader(split, batch_size=batch_size, seed=3), data)


def ready(method, loader, width: int = 5):
    """``method`` set up on the loader (no teacher: the 'text' view is the embedding), with an identity head
    when the representation has the teacher's width, so the student embedding is the tapped feature itself."""
    method.use_views([INPUT, "text"])
    student = {INPUT: ModelOutput(None, {"pool": torch.zeros(2, width)})}
    method.setup(student, None, SimpleNamespace(loader=loader, teacher=None))
    if width == D:
        method.projector = nn.Identity()
    return method


def step_inputs(batch, seed: int = 1, grad: bool = False):
    feats = torch.randn(len(batch), D, generator=torch.Generator().manual_seed(seed), requires_grad=grad)
    return {INPUT: ModelOutput(None, {"pool": feats})}, feats


# --- the queue --------------------------------------------------------------------------------------------------

def test_the_queue_starts_full_with_the_teacher_embeddings_of_the_last_samples_of_epoch_0_oldest_first():
    data, z = paired()
    loader = loader_of(data)
    m = ready(COMODO(COMODOConfig(queue_size=6, feature="pool")), loader, width=D)
    order = torch.cat([b.index for b in loader.epoch(0)])
    assert m.queue.shape == (6, D) and int(m.queue_ptr) == 0
    torch.testing.assert_close(m.queue, z[order[-6:]].float())
    # the first batches of epoch 0 push exactly those rows out before their samples come
    n_first = len(order) - 6
    assert set(order[:n_first].tolist()).isdisjoint(order[-6:].tolist())


def test_a_queue_longer_than_the_training_set_is_one_line_naming_the_option():
    data, _ = paired(n=10)
    with pytest.raises(AlambicError, match=r"method.queue_size: 50 is more than the 6 training samples") as e:
        ready(COMODO(COMODOConfig(queue_size=50, feature="pool")), loader_of(data), width=D)
    assert "\n" not in str(e.value)


def test_the_queue_is_fifo_of_constant_length_and_holds_the_batch_as_its_newest_column():
    data, z = paired()
    loader = loader_of(data)
    m = ready(COMODO(COMODOConfig(queue_size=6, feature="pool")), loader, width=D).train()
    official = m.queue.clone()  # the official code's shifted queue: Q <- cat(Q, z_t)[B:]
    for i, batch in enumerate(loader.epoch(0)):
        student, _ = step_inputs(batch, seed=i)
        m(student, None, batch, CTX)
        official = torch.cat([official, z[batch.index].float()])[len(batch):]
        assert m.queue.shape == (6, D)
        oldest_first = torch.roll(m.queue, -int(m.queue_ptr), 0)
        torch.testing.assert_close(oldest_first, official)
        torch.testing.assert_close(oldest_first[-len(batch):], z[batch.index].float())  # the batch, in order
    before = m.queue.clone()
    m.eval()(step_inputs(batch)[0], None, batch, CTX)  # evaluation never touches the queue
    assert torch.equal(m.queue, before)


# --- the loss ---------------------------------------------------------------------------------------------------

def test_comodo_loss_is_the_formula_over_the_queue_and_the_batch_with_the_paper_temperatures():
    data, z = paired()
    loader = loader_of(data)
    m = ready(COMODO(COMODOConfig(queue_size=6, feature="pool")), loader, width=D).train()
    batch = next(loader.epoch(0))
    queue = m.queue.double().numpy().copy()
    student, feats = step_inputs(batch)
    out = m(student, None, batch, CTX)
    want = np_comodo(feats.double().numpy(), z[batch.index].numpy(), queue)
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    # the student on the softer temperature and the teacher on the sharper would be another number
    assert np_comodo(feats.double().numpy(), z[batch.index].numpy(), queue, 0.1, 0.05) != pytest.approx(want)


def test_a_student_equal_to_its_teacher_picks_its_own_key():
    data, z = paired()
    loader = loader_of(data)
    m = ready(COMODO(COMODOConfig(queue_size=6, feature="pool")), loader, width=D).train()
    batch = next(loader.epoch(0))
    out = m({INPUT: ModelOutput(None, {"pool": 3 * z[batch.index].float()})}, None, batch, CTX)
    assert out.monitors["own_key_top1"].item() == 1.0


def test_instance_nce_is_infonce_of_the_normalised_student_against_the_batch_teacher_embeddings():
    data, z = paired()
    loader = loader_of(data)
    batch = next(loader.epoch(0))
    s = torch.randn(len(batch), D, generator=torch.Generator().manual_seed(4))
    a, t = unit(s.double().numpy()), z[batch.index].numpy()
    for symmetric in (False, True):
        m = ready(InstanceNCE(InstanceNCEConfig(feature="pool", symmetric=symmetric)), loader, width=D)
        logits = a @ t.T / 0.1
        one = -np.mean(np.diag(np.log(np_softmax(logits))))
        other = -np.mean(np.diag(np.log(np_softmax(logits.T))))
        want = (one + other) / 2 if symmetric else one
        out = m({INPUT: ModelOutput(None, {"pool": s})}, None, batch, CTX)
        assert out.loss.item() == pytest.approx(want, rel=1e-5)


# --- what learns ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [COMODO, InstanceNCE])
def test_gradient_reaches_the_student_and_its_head_never_the_teacher_embeddings_or_the_queue(cls):
    data, _ = paired()
    data.views["text"].requires_grad_(True)  # the cached embeddings: a gradient would show here
    loader = loader_of(data)
    cfg = cls.Config(feature="pool", **({"queue_size": 6} if cls is COMODO else {}))
    m = ready(cls(cfg), loader, width=5).train()
    batch = next(loader.epoch(0))
    feats = torch.randn(len(batch), 5, requires_grad=True)
    m({INPUT: ModelOutput(None, {"pool": feats})}, None, batch, CTX).loss.backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.projector.parameters())
    assert data.views["text"].grad is None
    if cls is COMODO:
        assert not m.queue.requires_grad and m.queue.grad is None


@pytest.mark.parametrize("cls", [COMODO, InstanceNCE])
def test_one_training_step_with_a_frozen_image_teacher_moves_the_student_not_the_teacher(cls):
    """A cross-modal teacher network that sees a paired image view: its tap is the embedding; it gets no gradient
    and keeps its weights and BatchNorm statistics."""
    torch.manual_seed(0)
    n = 24
    raw = RawData(torch.rand(n, 1, 6, 6), torch.arange(n) % 2, ["a", "b"], "fp")
    data = PairedData(raw, {"image": torch.rand(n, 1, 8, 8)})
    loader = loader_of(data)
    encoder = SmallCNN(1, (8, 8), [4, 6], 2)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    student = SmallCNN(1, (6, 6), [4], 2)
    cfg = cls.Config(feature="pool", hidden=8, **({"queue_size": 6} if cls is COMODO else {}))
    method = cls(cfg)
    method.use_views([INPUT, "image"])
    trainer = Trainer(student, method, loader, TrainSpec(epochs=1, lr=0.05), teacher=FrozenTeacher(encoder),
                      progress=False)
    assert method.projector.net[-1].out_features == 6  # the teacher's pooled width
    student0 = student.features.block0[0].weight.detach().clone()
    trainer.train_step(next(loader.epoch(0)), CTX)
    assert all(not q.requires_grad and q.grad is None for q in encoder.parameters())
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())
    assert not torch.equal(student.features.block0[0].weight, student0)


def test_without_a_teacher_an_image_view_is_refused_in_one_line():
    data = PairedData(RawData(torch.rand(12, 1, 4, 4), torch.arange(12) % 2, ["a", "b"], "fp"),
                      {"image": torch.rand(12, 1, 4, 4)})
    m = COMODO(COMODOConfig(queue_size=2, feature="pool"))
    m.use_views([INPUT, "image"])
    with pytest.raises(AlambicError, match=r"reads the paired view 'image' as embeddings \[B, D\]"):
        m.setup({INPUT: ModelOutput(None, {"pool": torch.zeros(2, 3)})}, None,
                SimpleNamespace(loader=loader_of(data), teacher=None))


def test_the_teacher_view_must_be_named_when_the_data_has_several():
    with pytest.raises(AlambicError, match="set method.teacher_view"):
        COMODO(COMODOConfig()).use_views([INPUT, "image", "text"])
    m = COMODO(COMODOConfig(teacher_view="text"))
    m.use_views([INPUT, "image", "text"])
    assert m.teacher_views == ("text",)


# --- resume -----------------------------------------------------------------------------------------------------

@pytest.fixture
def paired_digits(monkeypatch):
    """A paired dataset registered for this test only: the digits images with a fixed random 16-d code of each
    image as the cached teacher embedding (what ``emoji_text`` does with MiniLM), so no extra is needed."""
    from alambic.data.sources import load_digits

    raw = load_digits()
    code = torch.nn.functional.normalize(raw.x.flatten(1) @ torch.randn(64, 16, generator=torch.Generator()
                                                                        .manual_seed(0)), dim=1)
    data = PairedData(raw, {"text": code})
    entry = Entry("_paired_digits", lambda options=None: raw, NoOptions, "test", "", {"paired": lambda options: data})
    monkeypatch.setitem(DATASETS._entries, "_paired_digits", entry)
    return "_paired_digits"


def test_a_killed_comodo_run_resumes_bit_identically_with_its_queue(paired_digits, tmp_path, monkeypatch):
    import importlib

    from alambic.recipe import load_recipe
    from alambic.run import run

    run_module = importlib.import_module("alambic.run")  # the final probes are not under test
    monkeypatch.setattr(run_module, "finish_representation", lambda out, recipe, data, student, feature, teacher,
                        fit_info, **_: {"train": fit_info})
    recipe = load_recipe({
        "name": "comodo-resume", "seed": 0, "data": {"name": paired_digits},
        "student": {"arch": "cnn", "channels": [4, 8]},
        "method": {"name": "comodo", "queue_size": 200, "hidden": 16},
        "train": {"epochs": 2, "batch_size": 128, "lr": 0.003, "log_every": 3, "checkpoint_every": 4},
        "eval": {"latency_repeats": 1, "probe_every": 0},
    })
    straight = run(recipe, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "killed", progress=False, callbacks=[KillAt(7)])
    resumed = run(recipe, tmp_path / "killed", resume=True, progress=False)
    assert straight["train"]["resumed_from_step"] is None and resumed["train"]["resumed_from_step"] == 4

    a, meta = st.load(tmp_path / "straight" / "checkpoint.safetensors")
    b, _ = st.load(tmp_path / "killed" / "checkpoint.safetensors")
    assert meta["step"] == 20 and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    n_train = straight["train"]["train_samples"]
    assert a["method.queue"].shape == (200, 16)
    assert int(a["method.queue_ptr"]) == (2 * n_train) % 200 != 0  # two epochs of keys went through the ring
    losses = lambda d: [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
                        if r["split"] == "train" and r["step"] > 7]
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight") and all(map(math.isfinite,
                                                                                    losses(tmp_path / "straight")))
