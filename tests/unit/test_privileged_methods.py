"""pi-Distill / OPSD steps (arXiv:2602.04942) on a tiny random char llama: the privileged context is the template
around the task's information (the plain prompt when that is empty), pi-Distill samples in the privileged
context and OPSD in the plain one, the KL terms vanish with empty privileged information, each term's gradient
reaches only the forward the paper differentiates, alpha's endpoints are the two objectives, OPSD's dense
reward is minus beta times the per-token reverse KL."""

from __future__ import annotations

import copy

import pydantic
import pytest
import torch

pytest.importorskip("transformers")

from alambic.data.batch import IGNORE_INDEX
from alambic.data.tasks import TaskExample
from alambic.data.text import TOKENS, collate, tokenize_example
from alambic.errors import AlambicError
from alambic.generation.sampling import sample
from alambic.losses.policy import opsd_token_rewards
from alambic.methods.base import SetupInfo, StepContext
from alambic.methods.grpo import ADVANTAGES, GRPO, group_sample_id
from alambic.methods.opsd import OPSD
from alambic.methods.pi_distill import PiDistill, PiDistillConfig
from alambic.methods.privileged import PRIVILEGED, PRIVILEGED_TARGET
from alambic.models.causal_lm import CausalLMLogits, causal_lm_from_config
from alambic.tasks.tiny_lm import TINY_ARITH_LLAMA, char_tokenizer
from alambic.teachers.base import ModelOutput
from alambic.teachers.causal_lm import CausalLMTeacher

PARITY = "tests.unit.test_grpo:parity_reward"
CONSTANT = "tests.unit.test_grpo:constant_reward"
CTX = StepContext(0, 0, 1, 1)


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def _lm(tok, seed=0):
    return causal_lm_from_config(dict(TINY_ARITH_LLAMA), tok, seed=seed)


def _texts(hints, checker=PARITY):
    return [TaskExample(f"What is {a} + {a + 1}?", f"{a} + {a + 1} = {2 * a + 1}", str(2 * a + 1), checker,
                        {"hint": h}) for a, h in enumerate(hints)]


def _method(cls, tok, lm, hints=("add", "odd", "", "7"), checker=PARITY, **cfg):
    texts = _texts(hints, checker)
    method = cls(cls.Config(max_new_tokens=6, **cfg))
    method.texts, method.shared_vocab, method.run_seed = texts, len(tok), 0
    method.use_views([TOKENS])
    method.setup({}, None, SetupInfo(student=CausalLMLogits(lm), num_classes=0, num_samples=len(texts),
                                     steps_per_epoch=1, epochs=1, teacher=CausalLMTeacher(copy.deepcopy(lm), tok)))
    batch = collate([tokenize_example(tok, t, 48) for t in texts], range(len(texts)), tok.pad_token_id)
    return method, batch


def _outputs(lm, batch, views):
    return {v: ModelOutput(lm(input_ids=batch.views[v], use_cache=False).logits) for v in views}


def _rows(batch, view=TOKENS):
    """Each row's real tokens (up to its last completion token) of a view."""
    ids = batch.views[view]
    target = batch.target if view == TOKENS else batch.extras[PRIVILEGED_TARGET]
    out = []
    for b in range(len(batch)):
        last = int(torch.nonzero(target[b] != IGNORE_INDEX).flatten()[-1]) + 1
        out.append(ids[b, : last + 1].tolist())
    return out


def _grads(loss, params):
    return torch.autograd.grad(loss, params, allow_unused=True)


# ------------------------------------------------------------------------------------- the privileged context


def test_the_teacher_prompt_is_the_template_around_the_information_and_empty_information_leaves_the_prompt(tok):
    lm = _lm(tok)
    method, _ = _method(PiDistill, tok, lm, privileged="hint", template="[{privileged}] {prompt}")
    assert method.contexts.text(0) == "[add] What is 0 + 1?"
    assert method.contexts.text(2) is None  # empty hint: no template at all
    plain = _plain_prompts(tok, method.texts)
    priv = method.contexts.prompts(plain, [0, 1, 2, 3])
    assert priv[0] == [tok.bos_token_id] + tok("[add] What is 0 + 1?", add_special_tokens=False)["input_ids"]
    assert priv[2] == plain[2] and priv[1] != plain[1]
    answer, _ = _method(OPSD, tok, lm, privileged="answer")
    assert answer.contexts.text(3) == "Hint: 7\nWhat is 3 + 4?"  # the default template, the task's answer
    solution, _ = _method(OPSD, tok, lm, privileged="solution")
    assert solution.contexts.text(1) == "Hint: 1 + 2 = 3\nWhat is 1 + 2?"


def _plain_prompts(tok, texts):
    """Each example's prompt ids as the data tokenises them."""
    return [list(e.ids[: e.completion_start]) for e in (tokenize_example(tok, t, 48) for t in texts)]


def test_a_missing_privileged_field_and_a_bad_template_are_one_line_errors(tok):
    with pytest.raises(AlambicError, match="method.privileged 'hint2'") as err:
        _method(PiDistill, tok, _lm(tok), privileged="hint2")
    assert "\n" not in str(err.value) and "data.fields" in str(err.value)
    for bad in ("{prompt}", "{privileged} {prompt} {answer}", "{privileged} {prompt", "{privileged}{prompt}{prompt}"):
        with pytest.raises(pydantic.ValidationError, match="template"):
            PiDistillConfig(template=bad)
    assert PiDistillConfig(template="{{literal}} {privileged}: {prompt}").template.startswith("{{")
    with pytest.raises(pydantic.ValidationError, match="alpha"):
        PiDistillConfig(alpha=1.5)


def test_pi_distill_samples_in_the_privileged_context_and_opsd_in_the_plain_one(tok):
    lm = _lm(tok)
    G = 2
    for cls in (PiDistill, OPSD):
        method, batch = _method(cls, tok, lm, privileged="hint", group_size=G)
        b = method.prepare(batch, CTX)
        assert len(b) == 4 * G and set(b.views) == {TOKENS, PRIVILEGED}
        plain = _plain_prompts(tok, method.texts)
        priv = method.contexts.prompts(plain, [0, 1, 2, 3])
        rows, priv_rows = _rows(b), _rows(b, PRIVILEGED)
        for r in range(len(b)):
            i = r // G
            assert rows[r][: len(plain[i])] == plain[i] and priv_rows[r][: len(priv[i])] == priv[i]
            assert rows[r][len(plain[i]):] == priv_rows[r][len(priv[i]):]  # the same completion after each prompt
        context = priv if cls is PiDistill else plain  # where the completions were drawn
        keys = [group_sample_id(i, g) for i in range(4) for g in range(G)]
        comp = sample(lm, [p for p in context for _ in range(G)], max_new_tokens=6, seed=0, step=0, sample_ids=keys,
                      eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, vocab_size=len(tok))
        assert [rows[r][len(plain[r // G]):] for r in range(len(b))] == [comp.row(r, with_eos=True)
                                                                          for r in range(len(b))]


# ------------------------------------------------------------------------------------------ the paper's properties


@pytest.mark.parametrize("cls,cfg", [(PiDistill, {"alpha": 0.5}), (PiDistill, {"alpha": 1.0}),
                                     (PiDistill, {"alpha": 0.0}), (OPSD, {})])
def test_empty_privileged_information_makes_the_kl_terms_vanish_and_the_step_is_grpo(tok, cls, cfg):
    lm = _lm(tok)
    method, batch = _method(cls, tok, lm, hints=("", "", " ", ""), privileged="hint", group_size=3, beta=0.7, **cfg)
    grpo, _ = _method(GRPO, tok, lm, group_size=3)
    b, g = method.prepare(batch, CTX), grpo.prepare(batch, CTX)
    assert torch.equal(b.views[PRIVILEGED], b.views[TOKENS])  # the teacher's context is the student's
    assert torch.equal(b.views[TOKENS], g.views[TOKENS]) and torch.equal(b.extras[ADVANTAGES], g.extras[ADVANTAGES])
    assert b.extras[ADVANTAGES].abs().sum() > 0
    params = list(lm.parameters())
    out = method(_outputs(lm, b, (TOKENS, PRIVILEGED)), None, b, CTX)
    ref = grpo(_outputs(lm, g, (TOKENS,)), None, g, CTX)
    assert float(out.monitors["kl"]) == 0.0
    if cls is PiDistill:
        assert float(out.terms["kl"]) == 0.0
    else:
        assert float(out.monitors["kl_reward"]) == 0.0
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-7)
    for a, r in zip(_grads(out.loss, params), _grads(ref.loss, params)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-7)


def test_rows_without_privileged_information_have_no_kl_beside_rows_with_it(tok):
    from alambic.methods.privileged import context_logprobs

    lm = _lm(tok)
    method, batch = _method(PiDistill, tok, lm, hints=("1", "", "33", ""), privileged="hint", group_size=2)
    b = method.prepare(batch, CTX)
    with torch.no_grad():
        logp, logp_t, mask = context_logprobs(_outputs(lm, b, (TOKENS, PRIVILEGED)), b, len(tok), 1.0)
    d = torch.where(mask, logp - logp_t, 0.0).abs().amax(1)
    empty = torch.tensor([i in (1, 3) for i in b.index.tolist()])
    assert float(d[empty].max()) < 1e-5 and float(d[~empty].min()) > 1e-3  # padding differs: rounding only


def _hand_made(method, batch, seed=0):
    """Leaf logits of both views (random, hand-made) and the completion log-probs of each, aligned by hand."""
    g = torch.Generator().manual_seed(seed)
    V = method.shared_vocab
    zs = torch.randn(*batch.views[TOKENS].shape, V, generator=g, dtype=torch.float64).requires_grad_()
    zt = torch.randn(*batch.views[PRIVILEGED].shape, V, generator=g, dtype=torch.float64).requires_grad_()
    mask = batch.target != IGNORE_INDEX
    pmask = batch.extras[PRIVILEGED_TARGET] != IGNORE_INDEX
    ls, lt = [], []
    for b in range(len(batch)):
        pos, ppos = torch.nonzero(mask[b]).flatten().tolist(), torch.nonzero(pmask[b]).flatten().tolist()
        for t, u in zip(pos, ppos):
            tokn = int(batch.target[b, t])
            assert int(batch.extras[PRIVILEGED_TARGET][b, u]) == tokn
            ls.append(torch.log_softmax(zs[b, t], -1)[tokn])
            lt.append(torch.log_softmax(zt[b, u], -1)[tokn])
    rows = torch.nonzero(mask)[:, 0]
    adv = batch.extras[ADVANTAGES][rows].double()
    return zs, zt, torch.stack(ls), torch.stack(lt), adv


def _step(method, batch, zs, zt):
    return method({TOKENS: ModelOutput(zs), PRIVILEGED: ModelOutput(zt)}, None, batch, CTX)


def _k3(d):
    return d.exp() - 1 - d


def test_each_term_reaches_only_the_forward_the_paper_differentiates(tok):
    lm = _lm(tok)
    grads = {}
    for alpha in (0.0, 0.5, 1.0):
        method, batch = _method(PiDistill, tok, lm, privileged="hint", group_size=2, alpha=alpha, beta=0.5)
        b = method.prepare(batch, CTX)
        zs, zt, *_ = _hand_made(method, b)
        out = _step(method, b, zs, zt)
        grads[alpha] = _grads(out.loss, (zs, zt))
    # alpha = 1 (J_T alone): nothing reaches the student forward; alpha = 0 (J_S alone): nothing the teacher's
    assert grads[1.0][0] is None and grads[1.0][1].abs().sum() > 0
    assert grads[0.0][1] is None and grads[0.0][0].abs().sum() > 0
    # the joint objective: the student forward gets J_S's gradient only, the teacher forward J_T's only
    torch.testing.assert_close(grads[0.5][0], 0.5 * grads[0.0][0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads[0.5][1], 0.5 * grads[1.0][1], rtol=1e-12, atol=1e-15)
    # OPSD: the teacher's log-probs are a constant
    method, batch = _method(OPSD, tok, lm, privileged="hint", group_size=2, beta=0.5)
    b = method.prepare(batch, CTX)
    zs, zt, *_ = _hand_made(method, b)
    gs, gt = _grads(_step(method, b, zs, zt).loss, (zs, zt))
    assert gt is None and gs.abs().sum() > 0


def test_alpha_endpoints_are_the_teacher_and_the_student_objectives(tok):
    lm = _lm(tok)
    beta, eps = 0.3, 0.2
    for alpha in (1.0, 0.0):
        method, batch = _method(PiDistill, tok, lm, privileged="hint", group_size=2, alpha=alpha, beta=beta)
        b = method.prepare(batch, CTX)
        zs, zt, ls, lt, adv = _hand_made(method, b, seed=1)
        out = _step(method, b, zs, zt)
        n = len(ls)
        kl = _k3((ls - lt).detach()).sum() / n  # k3 estimate of KL(π^T ‖ π^S) on the teacher's tokens
        if alpha == 1.0:  # J_T: GRPO in the privileged context (ratio 1: π_old is the step's own policy)
            expected = -adv.sum() / n + beta * kl
        else:  # J_S: the clipped ratio π^S / sg π^T on the teacher's samples
            r = (ls - lt).detach().exp()
            expected = -torch.minimum(r * adv, r.clamp(1 - eps, 1 + eps) * adv).sum() / n + beta * kl
        torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out.monitors["kl"], kl, rtol=1e-10, atol=1e-12)
        side = "teacher" if alpha == 1.0 else "student"
        assert set(out.terms) == {side, "kl"} and f"{side}_ratio" in out.monitors
        torch.testing.assert_close(sum(out.terms.values()), out.loss.detach(), rtol=1e-10, atol=1e-12)
    assert float(out.monitors["student_ratio"]) != 1.0


def test_opsd_dense_reward_is_minus_beta_times_the_per_token_reverse_kl(tok):
    lm = _lm(tok)
    beta = 0.4
    method, batch = _method(OPSD, tok, lm, privileged="hint", group_size=2, beta=beta)
    b = method.prepare(batch, CTX)
    zs, zt, ls, lt, adv = _hand_made(method, b, seed=2)
    out = _step(method, b, zs, zt)
    d = (ls - lt).detach()  # log π^S(o_t) − log π^T(o_t): the sampled-token estimate of the reverse KL
    n = len(ls)
    torch.testing.assert_close(out.loss.detach(), -(adv - beta * d).sum() / n, rtol=1e-10, atol=1e-12)  # ratio 1
    torch.testing.assert_close(out.monitors["kl"], d.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.monitors["kl_reward"], -beta * d.mean(), rtol=1e-10, atol=1e-12)
    # in expectation over the student's own next token, the dense reward is -β KL(π^S ‖ π^T) of that position
    s, t = torch.randn(2, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    every = torch.arange(7)[None]
    ls_v = torch.log_softmax(s, -1)[None].gather(-1, every)
    lt_v = torch.log_softmax(t, -1)[None].gather(-1, every)
    reward = opsd_token_rewards(ls_v, lt_v, beta=beta)
    p = ls_v.exp()
    torch.testing.assert_close((p * reward).sum(), -beta * torch.nn.functional.kl_div(
        torch.log_softmax(t, -1), torch.log_softmax(s, -1), log_target=True, reduction="sum"))


def test_a_constant_checker_leaves_only_the_kl_in_pi_distill(tok):
    lm = _lm(tok)
    method, batch = _method(PiDistill, tok, lm, checker=CONSTANT, privileged="hint", group_size=2, beta=0.5)
    b = method.prepare(batch, CTX)
    assert torch.equal(b.extras[ADVANTAGES], torch.zeros(len(b)))
    out = method(_outputs(lm, b, (TOKENS, PRIVILEGED)), None, b, CTX)
    assert float(out.terms["teacher"]) == 0.0 and float(out.terms["student"]) == 0.0
    assert float(out.terms["kl"]) > 0 and float(out.monitors["zero_var"]) == 1.0
    grads = [g for g in _grads(out.loss, list(lm.parameters())) if g is not None]
    assert any(torch.count_nonzero(g) for g in grads)  # the KL still distils
