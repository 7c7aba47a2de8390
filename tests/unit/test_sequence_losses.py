"""Token-level LM divergences (``alambic.losses.sequence``) against their formulas, written out here in float64.

forward KL ``KL(p_T‖p_S)``; reverse KL ``KL(p_S‖p_T)``; GKD's generalized JSD (arXiv:2306.13649)
``β·KL(p_T‖m) + (1−β)·KL(p_S‖m)``, ``m = β·p_T + (1−β)·p_S``; DistiLLM's skew KL (arXiv:2402.03898)
``KL(p_T‖α·p_T + (1−α)·p_S)`` and skew reverse KL ``KL(p_S‖α·p_S + (1−α)·p_T)``; total variation
``½·Σ|p_T − p_S|``. Each summed over the vocabulary and the valid tokens, divided by the valid count.
"""

from __future__ import annotations

import pytest
import torch

from alambic.data.batch import IGNORE_INDEX
from alambic.errors import ShapeMismatchError
from alambic.losses import (
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    total_variation,
    truncate_to_shared_vocab,
)

B, T, V = 2, 5, 7


def kl64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * (p.log() - q.log())).sum(-1)


def reference(name: str, s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor, tau: float = 1.0,
              **kw) -> torch.Tensor:
    """The divergence straight from its formula, float64, no tricks (finite logits only)."""
    p_s = torch.softmax(s.double() / tau, -1)
    p_t = torch.softmax(t.double() / tau, -1)
    if name == "forward_kl":
        d = kl64(p_t, p_s)
    elif name == "reverse_kl":
        d = kl64(p_s, p_t)
    elif name == "generalized_jsd":
        b = kw["beta"]
        m = b * p_t + (1 - b) * p_s
        d = b * kl64(p_t, m) + (1 - b) * kl64(p_s, m)
    elif name == "skew_kl":
        a = kw["alpha"]
        d = kl64(p_t, a * p_t + (1 - a) * p_s)
    elif name == "skew_reverse_kl":
        a = kw["alpha"]
        d = kl64(p_s, a * p_s + (1 - a) * p_t)
    elif name == "total_variation":
        d = 0.5 * (p_t - p_s).abs().sum(-1)
    else:
        raise AssertionError(name)
    w = mask.double()
    return (d * w).sum() / w.sum()


FNS = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "total_variation": total_variation,
}
# every divergence with a non-default parameter where it has one
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("generalized_jsd", {"beta": 0.5}),
    ("generalized_jsd", {"beta": 0.2}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_kl", {"alpha": 0.4}),
    ("skew_reverse_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.4}),
    ("total_variation", {}),
]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in CASES]


def call(name: str, s, t, mask=None, **kw) -> torch.Tensor:
    return FNS[name](s, t, mask, **kw)


def logits(seed: int, shape=(B, T, V), scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def some_mask(seed: int = 0, shape=(B, T)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) > 0.4
    m.view(-1)[0] = True
    return m


def grad(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(value, x)[0]


# ------------------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("tau", [1.0, 2.5])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_value_and_gradient_match_the_formula_in_float64(name, kw, tau, chunk_size):
    s = logits(0).requires_grad_(True)
    t = logits(1)
    mask = some_mask()
    ours = call(name, s, t, mask, temperature=tau, chunk_size=chunk_size, **kw)
    ref = reference(name, s, t, mask, tau, **kw)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad(ours, s), grad(ref, s), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_float32_logits_match_the_float64_formula(name, kw):
    s = logits(2, dtype=torch.float32).requires_grad_(True)
    t = logits(3, dtype=torch.float32)
    mask = some_mask(1)
    ours = call(name, s, t, mask, **kw)
    s64 = s.detach().double().requires_grad_(True)
    ref = reference(name, s64, t.double(), mask, **kw)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad(ours, s).double(), grad(ref, s64), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_with_zero_gradient_when_the_distributions_are_equal(name, kw, dtype):
    # a high-entropy teacher: a cross-entropy posing as forward KL would be ≈ log V here, not 0
    s = logits(4, scale=0.1, dtype=dtype).requires_grad_(True)
    value = call(name, s, s.detach().clone(), **kw)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    assert abs(value.item()) < tol
    assert grad(value, s).abs().max().item() < tol


def test_forward_kl_of_shifted_logits_is_zero():
    # softmax is shift-invariant: logits differing by a constant per token are the same distribution
    s = logits(5)
    assert forward_kl(s, s + 3.0).abs().item() < 1e-12


def test_default_normaliser_is_the_valid_token_count_and_masked_tokens_do_not_count():
    s, t = logits(6), logits(7)
    mask = some_mask(2)
    per_token = torch.stack([forward_kl(s[b, i][None], t[b, i][None]) for b in range(B) for i in range(T)])
    expected = per_token[mask.reshape(-1)].sum() / mask.sum()
    torch.testing.assert_close(forward_kl(s, t, mask), expected)
    # no mask: every position counts
    torch.testing.assert_close(forward_kl(s, t), per_token.mean())


# ----------------------------------------------------------------------------------------- GKD JSD


def test_jsd_is_symmetric_at_beta_half():
    s, t = logits(8), logits(9)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.5), generalized_jsd(t, s, beta=0.5))


def test_jsd_beta_swaps_with_the_roles():
    s, t = logits(10), logits(11)
    torch.testing.assert_close(generalized_jsd(s, t, beta=0.3), generalized_jsd(t, s, beta=0.7))


@pytest.mark.parametrize("beta,names", [(0.0, "forward_kl"), (1.0, "reverse_kl"), (-0.1, "forward_kl"),
                                        (1.5, "reverse_kl")])
def test_jsd_refuses_the_endpoints_and_names_the_kl_to_use(beta, names):
    s, t = logits(12), logits(13)
    with pytest.raises(ValueError, match=names):
        generalized_jsd(s, t, beta=beta)


def test_jsd_near_the_endpoints_is_a_scaled_kl():
    # JSD(β) ≈ β·KL(p_T‖p_S) as β → 0 and (1 − β)·KL(p_S‖p_T) as β → 1 (vanishing scale, hence the refusal)
    s, t = logits(14, scale=0.5), logits(15, scale=0.5)
    eps = 1e-5
    torch.testing.assert_close(generalized_jsd(s, t, beta=eps) / eps, forward_kl(s, t), rtol=1e-3, atol=0)
    torch.testing.assert_close(generalized_jsd(s, t, beta=1 - eps) / eps, reverse_kl(s, t), rtol=1e-3, atol=0)


# ------------------------------------------------------------------------------------------- skew


@pytest.mark.parametrize("skew,kl", [(skew_kl, forward_kl), (skew_reverse_kl, reverse_kl)])
def test_skew_endpoints(skew, kl):
    s = logits(16).requires_grad_(True)
    t = logits(17)
    # alpha = 0 is the plain KL exactly, in value and gradient; alpha -> 0 tends to it
    torch.testing.assert_close(skew(s, t, alpha=0.0), kl(s, t), rtol=0, atol=0)
    torch.testing.assert_close(grad(skew(s, t, alpha=0.0), s), grad(kl(s, t), s), rtol=0, atol=0)
    torch.testing.assert_close(skew(s, t, alpha=1e-7), kl(s, t), rtol=1e-5, atol=0)
    # alpha = 1: the mixture is the first argument itself, so 0 with no gradient
    one = skew(s, t, alpha=1.0)
    assert one.item() == 0.0
    assert grad(one, s).abs().max().item() == 0.0
    with pytest.raises(ValueError, match="alpha"):
        skew(s, t, alpha=1.5)


def test_skew_kl_is_bounded_by_log_one_over_alpha():
    # SKL_α = Σ p_T log(p_T / (α p_T + (1−α) p_S)) <= log(1/α): the stabilising property DistiLLM relies on
    s, t = logits(18, scale=20.0), logits(19, scale=20.0)
    alpha = 0.1
    assert skew_kl(s, t, alpha=alpha).item() <= torch.log(torch.tensor(1 / alpha)).item() + 1e-9
    assert forward_kl(s, t).item() > torch.log(torch.tensor(1 / alpha)).item()  # the plain KL is not


# ------------------------------------------------------------------------------- numerical safety


@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_vocabulary_entries_at_minus_inf_in_both_are_exactly_absent(name, kw, chunk_size):
    s = logits(20, dtype=torch.float32)
    t = logits(21, dtype=torch.float32)
    banned = torch.tensor([1, 4])
    keep = torch.tensor([i for i in range(V) if i not in banned.tolist()])
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., banned] = float("-inf")
    t_inf[..., banned] = float("-inf")
    s_inf.requires_grad_(True)
    value = call(name, s_inf, t_inf, some_mask(3), chunk_size=chunk_size, **kw)
    g = grad(value, s_inf)
    assert torch.isfinite(value) and torch.isfinite(g).all()
    assert (g[..., banned] == 0).all()
    # the same as the divergence over the remaining vocabulary
    s_small = s[..., keep].clone().requires_grad_(True)
    small = call(name, s_small, t[..., keep], some_mask(3), chunk_size=chunk_size, **kw)
    torch.testing.assert_close(value, small, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(g[..., keep], grad(small, s_small), rtol=1e-5, atol=1e-7)


def test_forward_kl_is_infinite_where_the_student_rules_out_a_teacher_token():
    s, t = logits(22), logits(23)
    s[0, 0, 2] = float("-inf")
    assert forward_kl(s, t).item() == float("inf")
    assert torch.isfinite(reverse_kl(s, t))  # KL(p_S‖p_T): the student's zero costs nothing


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_masked_positions_are_never_read(name, kw, chunk_size):
    s, t = logits(24), logits(25)
    mask = some_mask(4)
    clean = call(name, s, t, mask, chunk_size=chunk_size, **kw)
    s_bad, t_bad = s.clone(), t.clone()
    s_bad[~mask] = float("nan")
    t_bad[~mask] = float("inf")
    s_bad.requires_grad_(True)
    value = call(name, s_bad, t_bad, mask, chunk_size=chunk_size, **kw)
    torch.testing.assert_close(value, clean, rtol=0, atol=0)
    g = grad(value, s_bad)
    assert torch.isfinite(g).all() and (g[~mask] == 0).all()


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_an_empty_mask_gives_zero_with_a_gradient_path(name, kw, chunk_size):
    s = logits(26).requires_grad_(True)
    value = call(name, s, logits(27), torch.zeros(B, T, dtype=torch.bool), chunk_size=chunk_size, **kw)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert s.grad is not None and (s.grad == 0).all()


# --------------------------------------------------------------------- reduction and accumulation


@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_accumulation_chunks_with_the_global_count_equal_one_batch(name, kw, chunk_size):
    s = logits(28, shape=(4, T, V)).requires_grad_(True)
    t = logits(29, shape=(4, T, V))
    mask = some_mask(5, shape=(4, T))
    whole = call(name, s, t, mask, chunk_size=chunk_size, **kw)
    n = mask.sum()  # the step's valid-token count, as a tensor (what an all-reduce returns)
    parts = [call(name, s[i:i + 2], t[i:i + 2], mask[i:i + 2], num_tokens=n, chunk_size=chunk_size, **kw)
             for i in (0, 2)]
    summed = parts[0] + parts[1]
    torch.testing.assert_close(summed, whole, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad(summed, s), grad(whole, s), rtol=1e-12, atol=1e-14)
    # an int works the same
    torch.testing.assert_close(call(name, s[:2], t[:2], mask[:2], num_tokens=int(n), **kw), parts[0])


def test_each_chunk_normalised_by_its_own_count_is_the_wrong_answer_we_avoid():
    # the reason for num_tokens: uneven chunks averaged separately weight tokens unequally
    s, t = logits(30, shape=(4, T, V)), logits(31, shape=(4, T, V))
    mask = torch.zeros(4, T, dtype=torch.bool)
    mask[0, :1] = True
    mask[2:, :] = True
    own = 0.5 * (forward_kl(s[:2], t[:2], mask[:2]) + forward_kl(s[2:], t[2:], mask[2:]))
    assert not torch.allclose(own, forward_kl(s, t, mask))


# ------------------------------------------------------------------------------------ chunked path


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 1000])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_chunked_equals_unchunked_in_value_and_gradient(name, kw, chunk_size, masked):
    s = logits(32, shape=(3, 6, 50), dtype=torch.float32).requires_grad_(True)
    t = logits(33, shape=(3, 6, 50), dtype=torch.float32)
    mask = some_mask(6, shape=(3, 6)) if masked else None
    plain = call(name, s, t, mask, chunk_size=None, **kw)
    chunked = call(name, s, t, mask, chunk_size=chunk_size, **kw)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad(chunked, s), grad(plain, s), rtol=0, atol=1e-6)


def test_chunked_gradient_scales_with_the_upstream_gradient():
    s = logits(34, dtype=torch.float32).requires_grad_(True)
    t = logits(35, dtype=torch.float32)
    (3.0 * forward_kl(s, t, chunk_size=3)).backward()
    torch.testing.assert_close(s.grad, 3.0 * grad(forward_kl(s, t, chunk_size=None), s))


def test_a_second_backward_through_the_chunked_path_raises_instead_of_a_wrong_gradient():
    s = logits(34, dtype=torch.float32).requires_grad_(True)
    value = forward_kl(s, logits(35, dtype=torch.float32), chunk_size=3)
    value.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="chunk_size=None"):
        value.backward()
    # the unchunked path supports it
    plain = forward_kl(s, logits(35, dtype=torch.float32), chunk_size=None)
    plain.backward(retain_graph=True)
    plain.backward()


def test_without_grad_the_chunked_path_gives_the_same_value():
    s = logits(36, dtype=torch.float32).requires_grad_(True)
    t = logits(37, dtype=torch.float32)
    with_grad = generalized_jsd(s, t, some_mask(7), chunk_size=2)
    with torch.no_grad():
        without = generalized_jsd(s, t, some_mask(7), chunk_size=2)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach())


def test_the_teacher_gets_no_gradient():
    s = logits(38).requires_grad_(True)
    t = logits(39).requires_grad_(True)
    for chunk_size in (None, 3):
        for fn in FNS.values():
            fn(s, t, chunk_size=chunk_size).backward()
    assert t.grad is None and s.grad is not None


def test_two_dimensional_inputs_with_a_token_mask():
    s, t = logits(40, shape=(9, V)), logits(41, shape=(9, V))
    mask = torch.tensor([True, False, True, True, False, False, True, True, True])
    torch.testing.assert_close(reverse_kl(s, t, mask), reference("reverse_kl", s, t, mask))


# ------------------------------------------------------------------------------ temperature, dtypes


@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_temperature_softens_both_sides_and_t2_is_an_explicit_option(name, kw):
    s, t = logits(42), logits(43)
    tau = 3.0
    plain = call(name, s, t, temperature=tau, **kw)
    torch.testing.assert_close(plain, reference(name, s, t, torch.ones(B, T, dtype=torch.bool), tau, **kw))
    torch.testing.assert_close(call(name, s, t, temperature=tau, scale_t2=True, **kw), plain * tau**2)
    # temperature τ on the logits is the same as dividing the logits by τ first
    torch.testing.assert_close(plain, call(name, s / tau, t / tau, **kw))
    with pytest.raises(ValueError, match="temperature"):
        call(name, s, t, temperature=0.0, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_size", [None, 3])
@pytest.mark.parametrize("name,kw", CASES, ids=IDS)
def test_half_precision_logits_are_computed_in_float32(name, kw, chunk_size, dtype):
    s = logits(44, dtype=dtype).requires_grad_(True)
    t = logits(45, dtype=dtype)
    mask = some_mask(8)
    value = call(name, s, t, mask, chunk_size=chunk_size, **kw)
    assert value.dtype == torch.float32
    # exactly the float32 computation on the same (upcast) numbers
    s32 = s.detach().float().requires_grad_(True)
    ref32 = call(name, s32, t.float(), mask, chunk_size=chunk_size, **kw)
    torch.testing.assert_close(value, ref32, rtol=1e-6, atol=1e-7)
    g = grad(value, s)
    assert g.dtype == dtype
    torch.testing.assert_close(g.float(), grad(ref32, s32).to(dtype).float(), rtol=0, atol=0)


def test_half_precision_equality_is_still_zero():
    s = logits(46, dtype=torch.bfloat16)
    for fn in FNS.values():
        assert abs(fn(s, s.clone()).item()) < 1e-6


# -------------------------------------------------------------------------------------- validation


def test_inputs_are_checked():
    s, t = logits(47), logits(48)
    with pytest.raises(ShapeMismatchError, match="truncate_to_shared_vocab"):
        forward_kl(s, t[..., :-1])
    with pytest.raises(ShapeMismatchError, match="mask"):
        forward_kl(s, t, torch.ones(B, T + 1, dtype=torch.bool))
    labels = torch.full((B, T), 3)
    labels[0, 0] = IGNORE_INDEX
    with pytest.raises(TypeError, match="IGNORE_INDEX"):
        forward_kl(s, t, labels)
    forward_kl(s, t, labels != IGNORE_INDEX)  # the documented way
    with pytest.raises(ValueError, match="chunk_size"):
        forward_kl(s, t, chunk_size=0)
    with pytest.raises(ValueError, match="num_tokens"):
        forward_kl(s, t, num_tokens=-1)


# -------------------------------------------------------------------------------- padded vocabulary


def test_truncate_to_shared_vocab_drops_padding_rows():
    # Qwen2.5: the 7B pads its output layer to 152,064 rows, the 0.5B to 151,936
    s = torch.randn(1, 2, 151_936)
    t = torch.randn(1, 2, 152_064)
    s2, t2 = truncate_to_shared_vocab(s, t)
    assert s2.shape == t2.shape == (1, 2, 151_936)
    assert s2.data_ptr() == s.data_ptr() and t2.data_ptr() == t.data_ptr()  # views, no copy
    # with the tokenizer's real size both are cut to it
    s3, t3 = truncate_to_shared_vocab(s, t, vocab_size=151_665)
    assert s3.shape[-1] == t3.shape[-1] == 151_665
    torch.testing.assert_close(t3, t[..., :151_665])


def test_the_truncated_views_give_the_divergence_of_the_real_vocabulary():
    s = logits(49, shape=(B, T, 12)).requires_grad_(True)
    t = logits(50, shape=(B, T, 16))
    s2, t2 = truncate_to_shared_vocab(s, t, vocab_size=10)
    for chunk_size in (None, 3):
        value = forward_kl(s2, t2, chunk_size=chunk_size)
        expected = reference("forward_kl", s[..., :10], t[..., :10], torch.ones(B, T, dtype=torch.bool))
        torch.testing.assert_close(value, expected)
        g = grad(value, s)
        assert (g[..., 10:] == 0).all()
        torch.testing.assert_close(g, grad(expected, s))


def test_truncate_refuses_vocabularies_that_cannot_share_a_tokenizer():
    with pytest.raises(ShapeMismatchError, match="not one tokenizer"):
        truncate_to_shared_vocab(torch.randn(2, 32_000), torch.randn(2, 151_936))
    with pytest.raises(ShapeMismatchError, match="fewer logits than tokens"):
        truncate_to_shared_vocab(torch.randn(2, 151_936), torch.randn(2, 152_064), vocab_size=152_000)
    with pytest.raises(ShapeMismatchError, match="before the vocabulary"):
        truncate_to_shared_vocab(torch.randn(2, 3, 10), torch.randn(2, 4, 10))
    # a wider gap is accepted when the caller states the shared tokenizer size
    s, t = truncate_to_shared_vocab(torch.randn(2, 32_000), torch.randn(2, 40_000), vocab_size=32_000)
    assert s.shape == t.shape == (2, 32_000)
