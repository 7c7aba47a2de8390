"""CurioSFT's wiring: the self-copy is made at setup, re-synced exactly at the positive multiples of sync_every (with
the configured mix), gets no gradient and stays in eval mode, travels in the method's state_dict; the loss is
curio_sft_loss with the copy's temperatures; near-deterministic tokens get tau_min, flat ones tau_max."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.text import TOKENS
from alambic.losses.policy import curio_sft_loss
from alambic.methods.base import SetupInfo, StepContext
from alambic.methods.curio_sft import CurioSFT, CurioSFTConfig
from alambic.methods.token_kd import token_nll
from alambic.teachers.base import ModelOutput

V = 12


class ToyLM(nn.Module):
    """Token ids [B, T] -> logits [B, T, V]: an embedding, dropout and a linear head (``scale`` sharpens them)."""

    def __init__(self, seed: int = 0, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.drop, self.head = nn.Embedding(V, 8), nn.Dropout(0.5), nn.Linear(8, V)
        self.register_buffer("scale", torch.tensor(scale))

    def forward(self, ids):
        return self.head(self.drop(self.emb(ids))) * self.scale


def _batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(V, (3, 6), generator=g)
    target = torch.cat([ids[:, 1:], torch.full((3, 1), IGNORE_INDEX)], 1)
    target[:, :2] = IGNORE_INDEX  # a prompt of two tokens
    target[2, 4:] = IGNORE_INDEX  # a shorter row
    return Batch(views={TOKENS: ids}, index=torch.arange(3), target=target)


def _method(net: nn.Module, **cfg) -> CurioSFT:
    m = CurioSFT(CurioSFTConfig(**cfg))
    m.setup({}, None, SetupInfo(student=net, num_classes=0, num_samples=3, steps_per_epoch=1, epochs=1))
    return m


def _out(m: CurioSFT, net: nn.Module, batch: Batch, step: int = 0):
    return m({TOKENS: ModelOutput(net(batch.views[TOKENS]))}, None, batch, StepContext(step, 0, 10, 10))


def _params(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_the_copy_resyncs_after_every_sync_every_steps_and_nowhere_else():
    net = ToyLM()
    m = _method(net, sync_every=3, sync_mix=1.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    held = _params(net)  # what the copy must hold: the student as it was at the last re-sync
    assert all(torch.equal(m.ref.state_dict()[k], v) for k, v in held.items())
    for step in range(8):
        m.prepare(_batch(step), StepContext(step, 0, 8, 8))
        if step in (3, 6):
            held = _params(net)
        assert all(torch.equal(m.ref.state_dict()[k], v) for k, v in held.items()), step
        opt.zero_grad()
        _out(m, net, _batch(step), step).loss.backward()
        opt.step()
    assert not torch.equal(held["head.weight"], net.head.weight)  # the student did move


def test_a_resync_mixes_with_sync_mix():
    net = ToyLM()
    m = _method(net, sync_every=2, sync_mix=0.99)
    before = _params(m.ref)
    with torch.no_grad():
        net.head.weight.add_(1.0)
    m.prepare(_batch(), StepContext(1, 0, 8, 8))  # not a sync step
    assert torch.equal(m.ref.head.weight, before["head.weight"])
    m.prepare(_batch(), StepContext(2, 0, 8, 8))
    assert torch.allclose(m.ref.head.weight, 0.01 * before["head.weight"] + 0.99 * net.head.weight, atol=1e-6)
    assert torch.equal(m.ref.emb.weight, before["emb.weight"])  # unchanged student weights: lerp of equals


def test_the_copy_gets_no_gradient_stays_in_eval_mode_and_is_checkpointed():
    net = ToyLM()
    m = _method(net)
    m.train()
    assert not m.ref.training and all(not p.requires_grad for p in m.ref.parameters())
    assert not [p for p in m.parameters() if p.requires_grad]  # nothing of the method goes to the optimizer
    out = _out(m, net, _batch())
    out.loss.backward()
    assert all(p.grad is None for p in m.ref.parameters())
    assert net.head.weight.grad is not None and net.head.weight.grad.abs().sum() > 0
    # the copy in eval mode: no dropout, so its logits are a pure function of the ids
    ids = _batch().views[TOKENS]
    assert torch.equal(m.reference_logits(ids, torch.float32), m.reference_logits(ids, torch.float32))
    # the state dict carries the copy; a fresh method loads it back
    with torch.no_grad():
        m.ref.head.weight.mul_(3)
    state = m.state_dict()
    assert {k for k in state if k.startswith("ref.")} == {f"ref.{k}" for k in net.state_dict()}
    fresh = _method(ToyLM(seed=1))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.ref.head.weight, m.ref.head.weight)


def test_the_loss_is_curio_sft_loss_against_the_copy_with_its_temperatures():
    net = ToyLM()
    net.eval()  # the same logits on both sides of the comparison
    m = _method(net, kd_coef=0.7)
    b = _batch()
    logits = net(b.views[TOKENS])
    out = m({TOKENS: ModelOutput(logits)}, None, b, StepContext(0, 0, 1, 1))
    mask = b.target != IGNORE_INDEX
    ref = m.ref(b.views[TOKENS])
    loss, terms = curio_sft_loss(logits, ref, b.target.clamp_min(0), mask, kd_coef=0.7)
    assert torch.allclose(out.loss, loss, atol=1e-6, rtol=1e-6)
    assert torch.allclose(out.terms["nll"], terms["nll"]) and torch.allclose(out.terms["kd"], 0.7 * terms["kd"])
    assert torch.allclose(out.monitors["tau"], terms["tau"])
    assert 1.1 <= float(out.monitors["tau"]) <= 1.5
    p = torch.softmax(logits[mask], -1)
    assert torch.allclose(out.monitors["entropy"], -(p * p.log()).sum(-1).mean(), atol=1e-6)


def test_tau_one_and_an_identical_copy_leave_plain_sft():
    net = ToyLM()
    net.eval()
    m = _method(net, tau_min=1.0, tau_max=1.0)
    b = _batch()
    out = _out(m, net, b)
    assert out.terms["kd"] == 0 and torch.allclose(out.loss, token_nll(net(b.views[TOKENS]), b.target), atol=1e-6)


def test_near_deterministic_tokens_get_tau_min_and_flat_ones_tau_max():
    sharp = ToyLM(scale=1e4)  # the copy's top token has all the mass: entropy ~ 0 <= 0.03
    sharp.eval()
    m = _method(sharp, tau_min=1.1, tau_max=1.5)
    assert float(_out(m, sharp, _batch()).monitors["tau"]) == pytest.approx(1.1, abs=1e-6)
    flat = ToyLM(scale=0.0)  # uniform: no temperature reaches the target entropy above log V
    flat.eval()
    m = _method(flat, tau_min=1.1, tau_max=1.5)
    assert float(_out(m, flat, _batch()).monitors["tau"]) == pytest.approx(1.5, abs=1e-6)


def test_a_bad_temperature_range_is_refused():
    with pytest.raises(ValueError, match="tau_min .1.6. must not exceed tau_max .1.5."):
        CurioSFTConfig(tau_min=1.6)
    with pytest.raises(Exception, match="curio_sft: the self-copy is made in setup"):
        CurioSFT().prepare(_batch(), StepContext(0, 0, 1, 1))
