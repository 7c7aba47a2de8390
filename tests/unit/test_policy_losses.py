"""Policy and reasoning-distillation losses (``alambic.losses.policy``) against their formulas, written out here
token by token in float64, and the gradients that must and must not flow.

GRPO advantages ``(r − mean)/std`` and Dr. GRPO's ``r − mean`` (arXiv:2402.03300, 2503.20783); the clipped
surrogate ``min(r Â, clip(r, 1 − ε_low, 1 + ε_high) Â)`` with token-mean, sequence-mean and constant
aggregation (DAPO arXiv:2503.14476); TRRD's anchor ``α log π_old + (1 − α) log π_T`` (arXiv:2602.22495);
REDI ``−ℓ⁺/|y⁺| + α ℓ⁻/|y⁻|`` (arXiv:2505.24850); pi-Distill ``α J_T + (1 − α) J_S`` and OPSD's per-token
reverse-KL reward (arXiv:2602.04942); CurioSFT's bisected temperature and squared log-ratio (arXiv:2602.02244).
"""

from __future__ import annotations

import math

import pytest
import torch

from alambic.errors import ShapeMismatchError
from alambic.losses import (
    bisect_temperature,
    clipped_policy_loss,
    curio_sft_loss,
    curio_target_entropy,
    curio_temperature,
    group_advantages,
    length_normalized_logprob,
    opsd_loss,
    opsd_token_rewards,
    pi_distill_loss,
    redi_loss,
    sampled_token_logprobs,
    tempered_topk_entropy,
    trrd_anchor_logprobs,
    trrd_loss,
)


def grad(out, x):
    (g,) = torch.autograd.grad(out, [x], retain_graph=True, allow_unused=True)
    return g


def leaf(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype, requires_grad=True)


# log-probs of 2 completions of lengths 3 and 2 (the last position of row 1 is padding)
LOGP = [[-0.5, -1.0, -0.2], [-0.3, -2.0, 0.0]]
OLD = [[-0.6, -0.7, -0.2], [-0.1, -2.5, 0.0]]
MASK = torch.tensor([[True, True, True], [True, True, False]])
ADV = torch.tensor([1.0, -1.0], dtype=torch.float64)


def surrogate_by_hand(logp, old, adv, mask, eps_low, eps_high):
    """Per-token ``−min(r A, clip(r) A)`` and the list of valid (b, t), straight from the formula."""
    out = {}
    for b in range(len(logp)):
        for t in range(len(logp[b])):
            if not mask[b][t]:
                continue
            r = math.exp(logp[b][t] - old[b][t])
            a = float(adv[b])
            out[b, t] = -min(r * a, min(max(r, 1 - eps_low), 1 + eps_high) * a)
    return out


# -- advantages ------------------------------------------------------------------------------------------

def test_group_advantages_hand_made():
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    dr = group_advantages(r)                                                   # Dr. GRPO: r − mean
    assert torch.allclose(dr, torch.tensor([[0.5, -0.5, 0.5, -0.5], [0.25, 0.25, 0.25, -0.75], [0.0] * 4]))
    grpo = group_advantages(r, scale_std=True, eps=0.0 + 1e-6)
    std1 = math.sqrt(0.75 * 0.25)                                              # population std of [1, 1, 1, 0]
    expected = torch.tensor([[1.0, -1.0, 1.0, -1.0], [0.25 / std1] * 3 + [-0.75 / std1], [0.0] * 4])
    assert torch.allclose(grpo, expected, atol=1e-5)
    assert torch.equal(grpo[2], torch.zeros(4))                                # equal rewards: exactly 0
    unbiased = group_advantages(r[:1], scale_std=True, unbiased_std=True)
    assert torch.allclose(unbiased, torch.tensor([[1.0, -1.0, 1.0, -1.0]]) / math.sqrt(4 / 3), atol=1e-5)
    assert group_advantages(r).sum(1).abs().max() < 1e-6                       # centred per group
    with pytest.raises(ShapeMismatchError):
        group_advantages(torch.ones(4))


def test_dr_grpo_advantages_keep_the_reward_scale():
    """std normalisation makes a near-solved prompt's rare failure weigh more than a balanced prompt's."""
    r = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert group_advantages(r, scale_std=True)[1, 3].abs() > group_advantages(r, scale_std=True)[0].abs().max()
    assert group_advantages(r)[1, 3].abs() < 1.0


# -- clipped-ratio loss ----------------------------------------------------------------------------------

@pytest.mark.parametrize("eps_low, eps_high", [(0.2, None), (0.2, 0.28), (0.1, 0.5)])
def test_clipped_loss_token_mean_exact(eps_low, eps_high):
    logp = leaf(LOGP)
    out = clipped_policy_loss(logp, torch.tensor(OLD, dtype=torch.float64), ADV, MASK, eps_low=eps_low,
                              eps_high=eps_high)
    hand = surrogate_by_hand(LOGP, OLD, ADV, MASK.tolist(), eps_low, eps_low if eps_high is None else eps_high)
    assert out.loss.item() == pytest.approx(sum(hand.values()) / len(hand), rel=1e-12)


def test_clipped_loss_aggregations_exact():
    logp, old = leaf(LOGP), torch.tensor(OLD, dtype=torch.float64)
    hand = surrogate_by_hand(LOGP, OLD, ADV, MASK.tolist(), 0.2, 0.2)
    seq = [[v for (b, _), v in hand.items() if b == i] for i in range(2)]
    seq_mean = clipped_policy_loss(logp, old, ADV, MASK, aggregation="sequence_mean").loss
    assert seq_mean.item() == pytest.approx((sum(seq[0]) / 3 + sum(seq[1]) / 2) / 2, rel=1e-12)
    const = clipped_policy_loss(logp, old, ADV, MASK, aggregation="constant", max_length=8).loss
    assert const.item() == pytest.approx(sum(hand.values()) / (2 * 8), rel=1e-12)
    with pytest.raises(ValueError, match="max_length"):
        clipped_policy_loss(logp, old, ADV, MASK, aggregation="constant")
    with pytest.raises(ValueError, match="aggregation"):
        clipped_policy_loss(logp, old, ADV, MASK, aggregation="mean")


def test_on_policy_gradient_is_minus_advantage_over_tokens():
    """At π_θ = π_old the ratio is 1, the loss is −mean Â and d loss / d logp_t = −Â_t / N (token mean)."""
    logp = leaf(LOGP)
    out = clipped_policy_loss(logp, logp.detach(), ADV, MASK)
    assert out.loss.item() == pytest.approx(-(1 + 1 + 1 - 1 - 1) / 5)
    g = grad(out.loss, logp)
    expected = torch.where(MASK, -ADV[:, None].expand(2, 3) / 5, 0.0)
    assert torch.allclose(g, expected)
    assert out.ratio_mean.item() == pytest.approx(1.0) and out.approx_kl.item() == pytest.approx(0.0)


def test_length_bias_of_sequence_mean_and_its_removal():
    """Dr. GRPO's point: per-sequence 1/|o_i| gives a long wrong answer's tokens a smaller push down."""
    logp = leaf([[-1.0] * 6, [-1.0] * 6])
    mask = torch.tensor([[True] * 6, [True, True] + [False] * 4])
    adv = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    g_seq = grad(clipped_policy_loss(logp, logp.detach(), adv, mask, aggregation="sequence_mean").loss, logp)
    assert g_seq[0, 0] == pytest.approx(g_seq[1, 0] / 3)                       # long: 1/6, short: 1/2
    g_tok = grad(clipped_policy_loss(logp, logp.detach(), adv, mask).loss, logp)
    assert g_tok[0, 0] == pytest.approx(g_tok[1, 0].item())                    # every token weighs the same
    g_const = grad(clipped_policy_loss(logp, logp.detach(), adv, mask, aggregation="constant",
                                       max_length=6).loss, logp)
    assert g_const[0, 0] == pytest.approx(g_const[1, 0].item())


def test_clip_removes_the_gradient_and_is_counted():
    """r = e^0.22 ≈ 1.246 with Â > 0: clipped by ε = 0.2 (no gradient), not by DAPO's ε_high = 0.28."""
    logp = leaf([[0.22, -0.3], [-0.3, 0.0]])
    old = torch.zeros(2, 2, dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    sym = clipped_policy_loss(logp, old, adv, eps_low=0.2)
    g = grad(sym.loss, logp)
    assert g[0, 0] == 0.0 and g[0, 1] != 0.0                                   # r=0.74 < 1, Â > 0: unclipped
    assert g[1, 0] == 0.0                                                      # r=0.74 < 0.8, Â < 0: clipped low
    assert sym.clip_high_fraction.item() == pytest.approx(0.25)
    assert sym.clip_low_fraction.item() == pytest.approx(0.25)
    dapo = clipped_policy_loss(logp, old, adv, eps_low=0.2, eps_high=0.28)
    assert grad(dapo.loss, logp)[0, 0] != 0.0 and dapo.clip_high_fraction.item() == 0.0
    r = torch.exp(logp.detach())
    assert dapo.ratio_mean.item() == pytest.approx(r.mean().item())
    assert dapo.approx_kl.item() == pytest.approx((r - 1 - logp.detach()).mean().item())


def test_anchor_gets_no_gradient_and_masked_nan_does_not_leak():
    logp = leaf([[-0.5, float("nan")], [-0.2, -0.1]])
    old = leaf([[-0.4, float("nan")], [-0.3, -0.1]])
    mask = torch.tensor([[True, False], [True, True]])
    out = clipped_policy_loss(logp, old, torch.tensor([1.0, 2.0]), mask)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in (out.ratio_mean, out.approx_kl))
    g = grad(out.loss, logp)
    assert torch.isfinite(g).all() and g[0, 1] == 0.0
    assert grad(out.loss, old) is None


def test_num_tokens_makes_chunks_add_up():
    logp, old = leaf(LOGP), torch.tensor(OLD, dtype=torch.float64)
    whole = clipped_policy_loss(logp, old, ADV, MASK).loss
    parts = sum(clipped_policy_loss(logp[i:i + 1], old[i:i + 1], ADV[i:i + 1], MASK[i:i + 1], num_tokens=5).loss
                for i in range(2))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-12)
    empty = clipped_policy_loss(logp, old, ADV, torch.zeros(2, 3, dtype=torch.bool))
    assert empty.loss.item() == 0.0 and empty.loss.requires_grad


def test_per_token_advantages_and_shape_errors():
    logp = leaf(LOGP)
    adv_bt = ADV[:, None].expand(2, 3).clone()
    a = clipped_policy_loss(logp, torch.tensor(OLD, dtype=torch.float64), ADV, MASK).loss
    b = clipped_policy_loss(logp, torch.tensor(OLD, dtype=torch.float64), adv_bt, MASK).loss
    assert a.item() == b.item()
    with pytest.raises(ShapeMismatchError):
        clipped_policy_loss(logp, torch.zeros(2, 2), ADV)
    with pytest.raises(ShapeMismatchError):
        clipped_policy_loss(logp, logp.detach(), torch.zeros(3))
    with pytest.raises(ValueError, match="eps_low"):
        clipped_policy_loss(logp, logp.detach(), ADV, eps_low=1.5)


def test_sampled_token_logprobs():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 5, dtype=torch.float64)
    ids = torch.tensor([[0, 4, 2], [1, 1, -100]])
    lp = sampled_token_logprobs(z, ids, temperature=2.0)
    ref = torch.log_softmax(z / 2.0, -1)
    assert torch.allclose(lp[0], ref[0].gather(-1, ids[0, :, None]).squeeze(-1))
    assert torch.allclose(lp[1, :2], ref[1, :2].gather(-1, ids[1, :2, None]).squeeze(-1))


# -- TRRD ------------------------------------------------------------------------------------------------

def test_trrd_alpha_one_is_grpo_exactly():
    teacher = torch.tensor([[-0.1, float("-inf"), -3.0], [-0.2, -0.2, 0.0]], dtype=torch.float64)
    logp1, logp2 = leaf(LOGP), leaf(LOGP)
    old = torch.tensor(OLD, dtype=torch.float64)
    trrd = trrd_loss(logp1, old, teacher, ADV, MASK, alpha=1.0, eps_high=0.28)
    grpo = clipped_policy_loss(logp2, old, ADV, MASK, eps_high=0.28)
    assert torch.equal(trrd.loss, grpo.loss)
    assert torch.equal(grad(trrd.loss, logp1), grad(grpo.loss, logp2))
    assert torch.equal(trrd_anchor_logprobs(old, teacher, 1.0), old)


def test_trrd_ratio_is_one_when_all_three_policies_agree():
    logp = leaf(LOGP)
    for alpha in (0.0, 0.3, 1.0):
        out = trrd_loss(logp, logp.detach().clone(), logp.detach().clone(), ADV, MASK, alpha=alpha)
        assert out.ratio_mean.item() == pytest.approx(1.0)
        assert out.loss.item() == pytest.approx(-(3 * 1.0 + 2 * -1.0) / 5)   # the surrogate equals Â


def test_trrd_anchor_mixture_and_no_teacher_gradient():
    old = torch.tensor(OLD, dtype=torch.float64)
    teacher = leaf([[-0.1, -0.4, -1.0], [-0.9, -1.2, -0.3]])
    anchor = trrd_anchor_logprobs(old, teacher, 0.25)
    assert torch.allclose(anchor, 0.25 * old + 0.75 * teacher.detach())
    assert not anchor.requires_grad
    logp = leaf(LOGP)
    out = trrd_loss(logp, old, teacher, ADV, MASK, alpha=0.25)
    hand = surrogate_by_hand(LOGP, anchor.tolist(), ADV, MASK.tolist(), 0.2, 0.2)
    assert out.loss.item() == pytest.approx(sum(hand.values()) / 5, rel=1e-12)
    assert grad(out.loss, teacher) is None and grad(out.loss, logp) is not None
    zero = trrd_loss(logp, old, teacher, ADV, MASK, alpha=0.0)
    assert torch.equal(zero.loss, clipped_policy_loss(logp, teacher.detach(), ADV, MASK).loss)
    with pytest.raises(ValueError, match="alpha"):
        trrd_anchor_logprobs(old, teacher, 1.5)


# -- REDI ------------------------------------------------------------------------------------------------

POS = [[-0.5, -1.0, -0.2, -0.7], [-0.3, -0.4, 0.0, 0.0]]
POS_MASK = torch.tensor([[True, True, True, True], [True, True, False, False]])
NEG = [[-2.0, -1.5, -0.1]]
NEG_MASK = torch.tensor([[True, True, False]])


def test_redi_alpha_zero_is_length_normalised_nll():
    pos, neg = leaf(POS), leaf(NEG)
    loss = redi_loss(pos, POS_MASK, neg, NEG_MASK, alpha=0.0)
    nll = -((-0.5 - 1.0 - 0.2 - 0.7) / 4 + (-0.3 - 0.4) / 2) / 2
    assert loss.item() == pytest.approx(nll, rel=1e-12)
    assert grad(loss, neg) is None                                             # α = 0: negatives untouched
    assert torch.allclose(length_normalized_logprob(pos, POS_MASK),
                          torch.tensor([-2.4 / 4, -0.7 / 2], dtype=torch.float64))


def test_redi_exact_value_and_negative_gradient_scale():
    pos, neg = leaf(POS), leaf(NEG)
    alpha = 0.8
    loss = redi_loss(pos, POS_MASK, neg, NEG_MASK, alpha=alpha)
    expected = -((-2.4) / 4 + (-0.7) / 2) / 2 + alpha * (-3.5 / 2)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    g = grad(loss, neg)
    assert torch.allclose(g, torch.tensor([[alpha / 2, alpha / 2, 0.0]], dtype=torch.float64))   # α/|y⁻|
    gp = grad(loss, pos)
    assert torch.allclose(gp, torch.tensor([[-1 / 8] * 4, [-1 / 4, -1 / 4, 0, 0]], dtype=torch.float64))


def test_redi_edge_cases():
    pos = leaf([[-1.0, -1.0]])
    empty = torch.zeros(1, 2, dtype=torch.bool)
    assert redi_loss(pos, empty, None, None).item() == 0.0                     # length clamps to 1: no NaN
    only_neg = redi_loss(None, None, leaf(NEG), NEG_MASK, alpha=0.5)
    assert only_neg.item() == pytest.approx(0.5 * -3.5 / 2)
    with pytest.raises(ValueError):
        redi_loss(None, None, None, None)
    nan = leaf([[float("nan")]])
    zero = redi_loss(nan, torch.zeros(1, 1, dtype=torch.bool), None, None, pos_coef=0.0)
    assert zero.item() == 0.0 and torch.equal(grad(zero, nan), torch.zeros(1, 1, dtype=torch.float64))


# -- pi-Distill and OPSD ---------------------------------------------------------------------------------

TEACHER = [[-0.4, -0.9, -0.3], [-0.2, -1.8, 0.0]]
STUDENT = [[-0.7, -1.3, -0.3], [-0.5, -2.2, 0.0]]


def pi_inputs():
    return leaf(TEACHER), leaf(STUDENT), torch.tensor(TEACHER, dtype=torch.float64)


def k3(d):
    return math.exp(d) - 1 - d


def test_pi_distill_exact_value():
    lt, ls, old = pi_inputs()
    alpha, beta = 0.5, 0.1
    out = pi_distill_loss(lt, ls, old, ADV, MASK, alpha=alpha, beta=beta, eps_high=0.28)
    jt = surrogate_by_hand(TEACHER, TEACHER, ADV, MASK.tolist(), 0.2, 0.28)   # on-policy: ratio 1
    js = surrogate_by_hand(STUDENT, TEACHER, ADV, MASK.tolist(), 0.2, 0.28)   # π^S / sg π^T
    kl = sum(k3(STUDENT[b][t] - TEACHER[b][t]) for (b, t) in jt) / 5
    expected = alpha * (sum(jt.values()) / 5 + beta * kl) + (1 - alpha) * (sum(js.values()) / 5 + beta * kl)
    assert out.loss.item() == pytest.approx(expected, rel=1e-12)
    assert out.kl.item() == pytest.approx(kl, rel=1e-12)
    assert out.teacher is not None and out.student is not None


def test_pi_distill_gradients_flow_only_where_the_paper_puts_them():
    lt, ls, old = pi_inputs()
    zero_adv = torch.zeros(2, dtype=torch.float64)
    # J_T alone (α = 1): only the teacher forward; its KL gradient is the score (log π^T − log π^S)/N
    jt = pi_distill_loss(lt, ls, old, zero_adv, MASK, alpha=1.0, beta=1.0).loss
    assert grad(jt, ls) is None
    expected_t = torch.where(MASK, (lt - ls).detach() / 5, 0.0)
    assert torch.allclose(grad(jt, lt), expected_t)
    # J_S alone (α = 0): only the student forward; KL(sg π^T ‖ π^S) by k3 gives (π^S/π^T − 1)/N
    js = pi_distill_loss(lt, ls, old, zero_adv, MASK, alpha=0.0, beta=1.0).loss
    assert grad(js, lt) is None
    expected_s = torch.where(MASK, ((ls - lt).detach().exp() - 1) / 5, 0.0)
    assert torch.allclose(grad(js, ls), expected_s)
    # the student's reward term: ratio π^S/sg π^T, gradient r·Â/N where unclipped, none to the teacher
    js_r = pi_distill_loss(lt, ls, old, ADV, MASK, alpha=0.0, beta=0.0, eps_low=1.0, eps_high=float("inf")).loss
    assert grad(js_r, lt) is None
    r = (ls - lt).detach().exp()
    assert torch.allclose(grad(js_r, ls), torch.where(MASK, -r * ADV[:, None] / 5, 0.0))
    both = pi_distill_loss(lt, ls, old, ADV, MASK, alpha=0.5, beta=0.5).loss
    assert grad(both, lt) is not None and grad(both, ls) is not None


def test_pi_distill_kl_terms_vanish_with_empty_privileged_information():
    """Empty PI: both contexts are the same, so both forwards give the same log-probs."""
    lt, ls = leaf(TEACHER), leaf(TEACHER)
    old = torch.tensor(TEACHER, dtype=torch.float64)
    for alpha in (0.0, 0.5, 1.0):
        with_kl = pi_distill_loss(lt, ls, old, ADV, MASK, alpha=alpha, beta=2.0)
        without = pi_distill_loss(lt, ls, old, ADV, MASK, alpha=alpha, beta=0.0)
        assert with_kl.kl.item() == 0.0
        assert with_kl.loss.item() == pytest.approx(without.loss.item(), abs=1e-15)
        for x in (lt, ls):
            g1, g0 = grad(with_kl.loss, x), grad(without.loss, x)
            assert (g1 is None and g0 is None) or torch.allclose(g1, g0, atol=1e-15)


def test_opsd_dense_reward():
    ls, lt = leaf(STUDENT), leaf(TEACHER)
    rew = opsd_token_rewards(ls, lt, MASK, beta=0.5)
    expected = torch.where(MASK, -0.5 * (ls - lt).detach(), 0.0)
    assert torch.allclose(rew, expected) and not rew.requires_grad
    assert torch.equal(opsd_token_rewards(ls, ls.detach(), MASK), torch.zeros(2, 3, dtype=torch.float64))


def test_opsd_loss_is_grpo_plus_the_kl_reward_and_the_teacher_is_constant():
    ls, lt = leaf(STUDENT), leaf(TEACHER)
    out = opsd_loss(ls, ls.detach(), lt, ADV, MASK, beta=0.5)
    adv_bt = ADV[:, None] - 0.5 * (ls - lt).detach()
    hand = 0.0
    for b in range(2):
        for t in range(3):
            if MASK[b, t]:
                hand += -adv_bt[b, t].item()                                  # on-policy ratio 1
    assert out.loss.item() == pytest.approx(hand / 5, rel=1e-12)
    assert grad(out.loss, lt) is None
    same = opsd_loss(ls, ls.detach(), ls.detach().clone(), ADV, MASK, beta=0.5)   # empty PI
    assert torch.equal(same.loss, clipped_policy_loss(ls, ls.detach(), ADV, MASK).loss)


# -- CurioSFT --------------------------------------------------------------------------------------------

def entropy64(z, tau, k):
    zk = z.double().topk(min(k, z.shape[-1]), dim=-1).values
    p = torch.softmax(zk / tau, -1)
    return -(p * p.log()).sum(-1)


def test_tempered_topk_entropy():
    torch.manual_seed(0)
    z = torch.randn(3, 50)
    assert torch.allclose(tempered_topk_entropy(z, 1.3, top_k=8), entropy64(z, 1.3, 8).float(), atol=1e-6)
    assert torch.allclose(tempered_topk_entropy(z, 1.0, top_k=512), entropy64(z, 1.0, 50).float(), atol=1e-6)
    masked = torch.tensor([[0.0, float("-inf"), 1.0]])
    assert torch.isfinite(tempered_topk_entropy(masked, 1.2))
    taus = torch.linspace(0.5, 3.0, 60)
    h = torch.stack([tempered_topk_entropy(z, float(t), top_k=20) for t in taus])
    assert (h[1:] >= h[:-1] - 1e-6).all()                                     # non-decreasing in τ


def test_bisection_matches_a_brute_force_scan():
    torch.manual_seed(1)
    scales = torch.tensor([0.3, 0.6, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0])
    z = (torch.randn(8, 2000) * scales[:, None]).double()
    tau = curio_temperature(z, iters=30)
    h = tempered_topk_entropy(z, 1.0)
    target = curio_target_entropy(h)
    grid = torch.linspace(1.1, 1.5, 4001, dtype=torch.float64)
    scan = torch.stack([entropy64(z, float(t), 512) for t in grid], dim=1)   # [8, 4001]
    lo, hi = scan[:, 0], scan[:, -1]
    clamped = torch.minimum(torch.maximum(target, lo), hi)
    best = grid[(scan - clamped[:, None]).abs().argmin(1)]
    assert ((tau - best).abs() <= 1e-4 + 1e-12).all()
    assert torch.allclose(tempered_topk_entropy(z, tau), clamped, atol=1e-6)  # hits the (clamped) target
    assert ((tau >= 1.1) & (tau <= 1.5)).all()


def test_temperature_is_monotone_in_the_target_entropy():
    torch.manual_seed(2)
    z = torch.randn(1, 600).double().expand(40, 600)
    targets = torch.linspace(3.0, 7.0, 40, dtype=torch.float64)
    tau = bisect_temperature(z, targets, iters=40)
    assert (tau[1:] >= tau[:-1]).all()
    assert tau[0] == 1.1 and tau[-1] == 1.5                                   # clamped at both ends


def test_tempered_entropy_is_monotone_in_token_entropy_but_tau_need_not_be():
    """Across one logit vector at different sharpness, the *tempered entropy* grows with the token's entropy;
    τ itself does not always (the seed notes' property (a) holds for the entropy, not for τ)."""
    torch.manual_seed(0)
    z = (torch.randn(1000) * 2).double()
    family = z[None] * torch.linspace(0.05, 6, 200, dtype=torch.float64)[:, None]
    h = tempered_topk_entropy(family, 1.0)
    tau = curio_temperature(family, iters=40)
    order = h.argsort()
    reached = tempered_topk_entropy(family, tau)[order]
    assert (reached[1:] >= reached[:-1] - 1e-9).all()
    assert (tau[order][1:] < tau[order][:-1] - 1e-6).any()


def test_near_deterministic_tokens_get_tau_min():
    z = torch.zeros(2, 1000)
    z[0, 3] = 30.0                                                            # H ≈ 0: a factual token
    z[1] = torch.linspace(0, 1, 1000)                                         # near-uniform: target out of reach
    tau = curio_temperature(z)
    assert tempered_topk_entropy(z[:1], 1.0).item() <= 0.03
    assert tau[0] == torch.tensor(1.1)                                        # exactly τ_min (float32)
    assert tau[1] == torch.tensor(1.5)


def test_curio_sft_loss_exact_and_zero_kd_at_tau_one():
    torch.manual_seed(3)
    logits = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    ref = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[1, 4, 0], [2, 2, 5]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    tau = torch.tensor([[1.1, 1.3, 1.0], [1.5, 1.2, 1.4]], dtype=torch.float64)
    loss, terms = curio_sft_loss(logits, ref, y, mask, tau_BT=tau)
    lp = torch.log_softmax(logits, -1).gather(-1, y[..., None]).squeeze(-1)
    lr = torch.log_softmax(ref / tau[..., None], -1).gather(-1, y[..., None]).squeeze(-1)
    per = -lp + 0.5 * (lp - lr) ** 2
    assert loss.item() == pytest.approx(per[mask].sum().item() / 5, rel=1e-12)
    assert terms["kd"].item() == pytest.approx((0.5 * (lp - lr) ** 2)[mask].mean().item(), rel=1e-12)
    assert grad(loss, ref) is None
    same, terms1 = curio_sft_loss(logits, logits.detach(), y, mask, tau_BT=torch.ones(2, 3))
    assert terms1["kd"].item() == 0.0
    assert same.item() == pytest.approx(-lp[mask].mean().item(), rel=1e-12)
    auto, terms2 = curio_sft_loss(logits, ref, y, mask)                       # τ from the reference logits
    assert 1.1 <= terms2["tau"].item() <= 1.5 and torch.isfinite(auto)
