"""GRPO / TRRD steps on a tiny random char llama: the loss is clipped_policy_loss of the step's own samples, draws
are keyed by (seed, step, sample id, g), equal rewards give no gradient, TRRD with alpha = 1 is GRPO."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from alambic.data.batch import IGNORE_INDEX
from alambic.data.tasks import TaskExample
from alambic.data.text import TOKENS, collate, tokenize_example
from alambic.errors import AlambicError
from alambic.losses.policy import clipped_policy_loss
from alambic.methods.base import SetupInfo, StepContext
from alambic.methods.grpo import ADVANTAGES, GRPO, TRRD, group_sample_id
from alambic.models.causal_lm import CausalLMLogits, causal_lm_from_config
from alambic.tasks.tiny_lm import TINY_ARITH_LLAMA, char_tokenizer
from alambic.teachers.base import ModelOutput
from alambic.teachers.causal_lm import CausalLMTeacher

PARITY = "tests.unit.test_grpo:parity_reward"
CONSTANT = "tests.unit.test_grpo:constant_reward"


def parity_reward(completion: str, answer: str) -> float:
    """A checker whose rewards vary even for a random model: 1 when the completion's character codes sum to an
    even number."""
    return float(sum(map(ord, completion)) % 2 == 0)


def constant_reward(completion: str, answer: str) -> float:
    return 1.0


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _lm(tok, seed=0):
    return causal_lm_from_config(dict(TINY_ARITH_LLAMA), tok, seed=seed)


def _method(cls, tok, lm, checker=PARITY, teacher_lm=None, **cfg):
    texts = [TaskExample(f"What is {a} + {a + 1}?", str(2 * a + 1), str(2 * a + 1), checker) for a in range(4)]
    method = cls(cls.Config(max_new_tokens=6, **cfg))
    method.texts, method.shared_vocab, method.run_seed = texts, len(tok), 0
    teacher = CausalLMTeacher(teacher_lm if teacher_lm is not None else copy.deepcopy(lm), tok)
    method.setup({}, None, SetupInfo(student=CausalLMLogits(lm), num_classes=0, num_samples=4, steps_per_epoch=1,
                                     epochs=1, teacher=teacher))
    batch = collate([tokenize_example(tok, t, 48) for t in texts], range(4), tok.pad_token_id)
    return method, batch, teacher


def _loss(method, lm, batch, teacher=None, step=0):
    out = {TOKENS: ModelOutput(lm(input_ids=batch.views[TOKENS], use_cache=False).logits)}
    t = teacher.outputs(batch, (TOKENS,)) if teacher is not None else None
    return method(out, t, batch, StepContext(step, 0, 1, 1))


def test_one_step_loss_is_the_clipped_loss_of_its_own_samples_and_rewards(tok):
    lm = _lm(tok)
    method, batch, _ = _method(GRPO, tok, lm, group_size=3)
    b = method.prepare(batch, StepContext(0, 0, 1, 1))
    assert len(b) == 12 and b.index.tolist() == [i for i in range(4) for _ in range(3)]
    # rewards by hand: decode each row's completion (without its EOS) and apply the checker
    mask = b.target != IGNORE_INDEX
    rewards = []
    for r in range(len(b)):
        comp = [t for t in b.target[r][mask[r]].tolist() if t != tok.eos_token_id]
        rewards.append(parity_reward(tok.decode(comp, skip_special_tokens=True), ""))
    r = torch.tensor(rewards).view(4, 3)
    adv = (r - r.mean(1, keepdim=True)).view(-1)  # Dr. GRPO: no std division
    assert torch.equal(b.extras[ADVANTAGES], adv) and adv.abs().sum() > 0
    out = _loss(method, lm, b)
    logits = lm(input_ids=b.views[TOKENS], use_cache=False).logits[..., : len(tok)]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, b.target.clamp_min(0)[..., None]).squeeze(-1)
    expected = clipped_policy_loss(logp, logp.detach(), adv, mask).loss
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    # ratio 1 (pi_old is the step's own policy): the loss is -sum_t A_t / tokens
    torch.testing.assert_close(out.loss, -(adv[:, None] * mask).sum() / mask.sum(), rtol=1e-5, atol=1e-6)
    assert out.monitors["ratio"] == 1.0 and out.monitors["clip_low"] == 0 and out.monitors["clip_high"] == 0
    assert float(out.monitors["reward"]) == pytest.approx(float(r.mean()))


def test_draws_are_keyed_by_seed_step_sample_id_and_g_not_by_the_batch(tok):
    lm = _lm(tok)
    method, batch, _ = _method(GRPO, tok, lm, group_size=2)
    whole = method.prepare(batch, StepContext(5, 0, 9, 9))
    part = method.prepare(batch.select(torch.tensor([2, 0])), StepContext(5, 0, 9, 9))
    rows = {(int(i), g): whole.views[TOKENS][k][whole.extras["attention_mask"][k].bool()].tolist()
            for k, (i, g) in enumerate((i, g) for i in range(4) for g in range(2))}
    for k, (i, g) in enumerate((i, g) for i in (2, 0) for g in range(2)):
        assert part.views[TOKENS][k][part.extras["attention_mask"][k].bool()].tolist() == rows[(i, g)]
    other = method.prepare(batch, StepContext(6, 0, 9, 9))
    assert other.views[TOKENS].tolist() != whole.views[TOKENS].tolist()  # another step, other draws
    assert group_sample_id(3, 1) == 3 * 2**16 + 1


def test_a_group_whose_rewards_are_all_equal_has_zero_advantage_and_no_gradient(tok):
    lm = _lm(tok)
    method, batch, _ = _method(GRPO, tok, lm, checker=CONSTANT, group_size=3)
    b = method.prepare(batch, StepContext(0, 0, 1, 1))
    assert torch.equal(b.extras[ADVANTAGES], torch.zeros(12))
    out = _loss(method, lm, b)
    out.loss.backward()
    assert float(out.loss.detach()) == 0.0 and float(out.monitors["zero_var"]) == 1.0
    grads = [p.grad for p in lm.parameters() if p.grad is not None]
    assert grads and all(torch.count_nonzero(g) == 0 for g in grads)


def test_trrd_alpha_one_is_grpo_exactly_and_alpha_below_one_anchors_on_the_teacher(tok):
    lm, teacher_lm = _lm(tok), _lm(tok, seed=1)
    grpo, batch, _ = _method(GRPO, tok, lm, group_size=2)
    b = grpo.prepare(batch, StepContext(0, 0, 1, 1))
    results = {}
    for alpha in (1.0, 0.5):
        trrd, _, teacher = _method(TRRD, tok, lm, teacher_lm=teacher_lm, group_size=2, alpha=alpha)
        assert torch.equal(trrd.prepare(batch, StepContext(0, 0, 1, 1)).views[TOKENS], b.views[TOKENS])
        lm.zero_grad()
        out = _loss(trrd, lm, b, teacher)
        out.loss.backward()
        results[alpha] = (out, [p.grad.clone() for p in lm.parameters()])
    lm.zero_grad()
    ref = _loss(grpo, lm, b)
    ref.loss.backward()
    out, grads = results[1.0]
    assert torch.equal(out.loss, ref.loss) and all(torch.equal(g, p.grad) for g, p in zip(grads, lm.parameters()))
    # alpha = 0.5 against a different teacher: the ratio (pi_theta / pi_T)^(1/2) is no longer 1
    half = results[0.5][0]
    assert float(half.monitors["ratio"]) != 1.0 and float(half.monitors["kl_teacher"]) != 0.0


def test_trrd_ratio_is_one_when_student_and_teacher_agree(tok):
    lm = _lm(tok)
    trrd, batch, teacher = _method(TRRD, tok, lm, group_size=2, alpha=0.3)  # the teacher: a copy of the student
    b = trrd.prepare(batch, StepContext(0, 0, 1, 1))
    out = _loss(trrd, lm, b, teacher)
    assert float(out.monitors["ratio"]) == pytest.approx(1.0, abs=1e-5)
    assert float(out.monitors["approx_kl"]) == pytest.approx(0.0, abs=1e-6)


def test_plain_text_data_is_refused_in_one_line(tok):
    lm = _lm(tok)
    method = GRPO()
    method.texts = []
    with pytest.raises(AlambicError, match="verifiable task") as err:
        method.setup({}, None, SetupInfo(student=CausalLMLogits(lm), num_classes=0, num_samples=1, steps_per_epoch=1,
                                         epochs=1, teacher=CausalLMTeacher(lm, tok)))
    assert "\n" not in str(err.value)
