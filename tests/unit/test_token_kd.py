"""token_kd: its loss against the direct formula, the frozen teacher, the prompt boundary, and gradient
accumulation that is token-exact (one big batch normalised by the step's token count)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from alambic.data.batch import IGNORE_INDEX, Batch  # noqa: E402
from alambic.data.text import TOKENS, TextLoader, TokenizedExample, collate  # noqa: E402
from alambic.methods.base import Method, StepContext  # noqa: E402
from alambic.methods.token_kd import TokenKD, TokenKDConfig  # noqa: E402
from alambic.models.causal_lm import CausalLMLogits, causal_lm_from_config, tiny_tokenizer  # noqa: E402
from alambic.recipe.schema import TrainSpec  # noqa: E402
from alambic.teachers.base import ModelOutput  # noqa: E402
from alambic.teachers.causal_lm import CausalLMTeacher  # noqa: E402
from alambic.train.loop import Trainer  # noqa: E402

TINY = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}


def outputs(logits):
    return {TOKENS: ModelOutput(logits)}


def batch_of(target):
    return Batch(views={TOKENS: torch.zeros(target.shape, dtype=torch.long)}, index=torch.arange(target.shape[0]),
                 target=target)


def test_the_loss_is_the_direct_formula_on_the_shared_vocabulary():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 7, generator=g)  # the student has one padded output row
    t = torch.randn(2, 3, 6, generator=g)
    target = torch.tensor([[IGNORE_INDEX, 2, 5], [1, IGNORE_INDEX, IGNORE_INDEX]])
    m = TokenKD(TokenKDConfig(divergence="forward_kl", kd_weight=0.7, nll_weight=0.3, temperature=2.0))
    m.shared_vocab = 6
    out = m(outputs(s), outputs(t), batch_of(target), None)
    # by hand: mean over the 3 valid tokens of KL(p_T‖p_S) at τ = 2, and of −log p_S(target) at τ = 1
    kl, nll = 0.0, 0.0
    for b, i in [(0, 1), (0, 2), (1, 0)]:
        ps = torch.softmax(s[b, i, :6].double() / 2, -1)
        pt = torch.softmax(t[b, i].double() / 2, -1)
        kl += float((pt * (pt.log() - ps.log())).sum())
        nll += -float(torch.log_softmax(s[b, i, :6].double(), -1)[target[b, i]])
    assert math.isclose(float(out.terms["kd"]), 0.7 * kl / 3, rel_tol=1e-5)
    assert math.isclose(float(out.terms["nll"]), 0.3 * nll / 3, rel_tol=1e-5)
    assert math.isclose(float(out.loss), 0.7 * kl / 3 + 0.3 * nll / 3, rel_tol=1e-5)


@pytest.mark.parametrize("divergence", ["reverse_kl", "generalized_jsd", "skew_kl", "total_variation"])
def test_every_divergence_is_zero_when_the_student_is_the_teacher(divergence):
    t = torch.randn(2, 4, 9)
    target = torch.tensor([[1, 2, IGNORE_INDEX, 3], [4, 5, 6, IGNORE_INDEX]])
    out = TokenKD(TokenKDConfig(divergence=divergence))(outputs(t.clone()), outputs(t), batch_of(target), None)
    assert abs(float(out.loss)) < 1e-6


def test_prompt_and_padding_positions_carry_no_loss():
    """Whatever the logits hold where the target is IGNORE_INDEX (prompt, padding), loss and gradient are equal."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    target = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, 3, 4]])
    m = TokenKD(TokenKDConfig(nll_weight=1.0))
    loss_grads = []
    for perturb in (False, True):
        s2, t2 = s.clone(), t.clone()
        if perturb:
            ignored = target == IGNORE_INDEX
            s2[ignored] += 100 * torch.randn(int(ignored.sum()), 8)
            t2[ignored] = float("nan")
        s2.requires_grad_(True)
        out = m(outputs(s2), outputs(t2), batch_of(target), None)
        out.loss.backward()
        loss_grads.append((out.loss.detach(), s2.grad[target != IGNORE_INDEX]))
    assert torch.equal(loss_grads[0][0], loss_grads[1][0])
    assert torch.equal(loss_grads[0][1], loss_grads[1][1])


def test_the_boundary_token_carries_the_loss_and_a_prompt_token_does_not():
    """Batch built by collate: the last prompt token's position predicts the first completion token."""
    tok = tiny_tokenizer()
    ids = (1, 10, 11, 12, 13, 2)  # prompt = first 3 tokens
    batch = collate([TokenizedExample(ids, 3)], [0], 0)
    assert batch.target[0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 12, 13, 2, IGNORE_INDEX]
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 6, len(tok), generator=g), torch.randn(1, 6, len(tok), generator=g)
    m = TokenKD(TokenKDConfig())
    base = float(m(outputs(s), outputs(t), batch, None).loss)
    s_boundary, s_prompt = s.clone(), s.clone()
    s_boundary[0, 2] += 5 * torch.randn(len(tok), generator=g)  # position 2 predicts token 3 (completion)
    s_prompt[0, 1] += 5 * torch.randn(len(tok), generator=g)  # position 1 predicts token 2 (prompt)
    assert float(m(outputs(s_boundary), outputs(t), batch, None).loss) != base
    assert float(m(outputs(s_prompt), outputs(t), batch, None).loss) == base


def test_no_gradient_reaches_the_teacher_and_it_stays_in_eval_mode():
    tok = tiny_tokenizer()
    teacher_lm = causal_lm_from_config(TINY, tok, seed=0)
    teacher_lm.train()
    teacher = CausalLMTeacher(teacher_lm, tok)
    before = {k: v.clone() for k, v in teacher_lm.state_dict().items()}
    student = CausalLMLogits(causal_lm_from_config(TINY, tok, seed=1))
    batch = collate([TokenizedExample((1, 5, 6, 7, 2), 1), TokenizedExample((1, 8, 9, 2), 2)], [0, 1], 0)
    loader = TextLoader([TokenizedExample((1, 5, 6, 7, 2), 1), TokenizedExample((1, 8, 9, 2), 2)], [0, 1], 2, 0)
    trainer = Trainer(student, TokenKD(TokenKDConfig(nll_weight=0.5)), loader,
                      TrainSpec(epochs=1, batch_size=2, optimizer="sgd", lr=0.5), teacher=teacher, progress=False)
    trainer.train_step(batch, StepContext(0, 0, 1, 1))
    assert not teacher.model.training and not teacher_lm.training
    assert all(p.grad is None and not p.requires_grad for p in teacher_lm.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher_lm.state_dict().items())
    assert any(p.grad is None for p in student.parameters())  # zero_grad after the step
    # and the fingerprint covers the tokenizer: another tokenizer, another teacher
    other = tiny_tokenizer()
    other.add_tokens(["zebra"])
    assert CausalLMTeacher(teacher_lm, other).fingerprint() != teacher.fingerprint()


# -- token-exact gradient accumulation ------------------------------------------------------------------------

def _examples():
    """Four sequences of very different completion lengths (so rows share != token share)."""
    return [TokenizedExample((1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 2), 1),
            TokenizedExample((1, 5, 2), 2),
            TokenizedExample((1, 14, 15, 2), 1),
            TokenizedExample((1, 16, 17, 18, 19, 20, 2), 3)]


def _one_step(grad_accum: int) -> dict[str, torch.Tensor]:
    tok = tiny_tokenizer()
    teacher = CausalLMTeacher(causal_lm_from_config(TINY, tok, seed=0), tok)
    student = CausalLMLogits(causal_lm_from_config(TINY, tok, seed=1))
    ex = _examples()
    loader = TextLoader(ex, range(4), 4, 0, shuffle=False)
    cfg = TrainSpec(epochs=1, batch_size=4, grad_accum=grad_accum, optimizer="sgd", momentum=0.0, lr=1.0,
                    schedule="constant")
    method = TokenKD(TokenKDConfig(nll_weight=0.5, chunk_size=None))
    trainer = Trainer(student, method, loader, cfg, teacher=teacher, progress=False)
    before = {k: v.detach().clone() for k, v in student.named_parameters()}
    trainer.train_step(next(iter(loader.epoch(0))), StepContext(0, 0, 1, 1))
    return {k: before[k] - v.detach() for k, v in student.named_parameters()}  # lr 1: the gradient


def test_gradient_accumulation_is_token_exact(monkeypatch):
    whole = _one_step(1)
    accumulated = _one_step(2)
    for k in whole:
        assert torch.allclose(whole[k], accumulated[k], rtol=1e-4, atol=1e-7), k
    # the rows-share weighting of a per-row-mean loss would be wrong here: the check can fail
    monkeypatch.setattr(TokenKD, "chunk_weight", Method.chunk_weight)
    rows = _one_step(2)
    assert not all(torch.allclose(whole[k], rows[k], rtol=1e-4, atol=1e-7) for k in whole)


def test_chunk_weight_is_the_share_of_valid_tokens():
    b = collate(_examples(), range(4), 0)
    m = TokenKD()
    first, second = b.select(slice(0, 2)), b.select(slice(2, 4))
    assert m.chunk_weight(first, b) == 11 / 18 and m.chunk_weight(second, b) == 7 / 18  # (10 + 1), (3 + 4)
    empty = batch_of(torch.full((2, 3), IGNORE_INDEX))
    assert m.chunk_weight(empty.select(slice(0, 1)), empty) == 0.5


def test_nll_term_is_the_mean_cross_entropy_of_the_completion():
    from alambic.methods.token_kd import token_nll

    logits = torch.randn(2, 3, 5)
    target = torch.tensor([[1, IGNORE_INDEX, 2], [IGNORE_INDEX, IGNORE_INDEX, 4]])
    ref = F.cross_entropy(logits.reshape(-1, 5), target.reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(token_nll(logits, target), ref)
    assert float(token_nll(logits, torch.full((2, 3), IGNORE_INDEX))) == 0.0
