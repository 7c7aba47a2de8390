"""Sampling as a pure function of (seed, step, sample id): inverse-CDF draws with temperature and nucleus on
hand-set logits, greedy at temperature 0, the EOS mask, batched draws equal to per-sample draws, and the
global RNG neither read nor moved."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from alambic.generation.sampling import SamplingError, Completions, row_seed, sample, sample_tokens


class FixedLogits(nn.Module):
    """A fake causal LM: the same next-token logits at every position of every row (no cache)."""

    def __init__(self, logits_V):
        super().__init__()
        self.logits = nn.Parameter(torch.as_tensor(logits_V, dtype=torch.float32), requires_grad=False)

    def forward(self, input_ids, **kw):
        B, T = input_ids.shape
        return self.logits.expand(B, T, -1)


class Counter(nn.Module):
    """A fake causal LM whose next token is (last token + 1) mod V, certainly (no cache)."""

    def __init__(self, V=10):
        super().__init__()
        self.V = V
        self.dummy = nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, input_ids, **kw):
        nxt = (input_ids + 1) % self.V
        return torch.nn.functional.one_hot(nxt, self.V).float() * 20.0


def _probs_logits(p):
    return torch.log(torch.tensor(p, dtype=torch.float64))


def test_inverse_cdf_draws_follow_temperature_scaled_probabilities():
    logits = _probs_logits([0.5, 0.3, 0.2])[None]
    draw = lambda u, t, p=1.0: int(sample_tokens(logits, torch.tensor([u]), t, p))  # noqa: E731
    # temperature 1: the CDF is 0.5, 0.8, 1.0
    assert [draw(u, 1.0) for u in (0.0, 0.49, 0.51, 0.79, 0.81, 0.999)] == [0, 0, 1, 1, 2, 2]
    # temperature 2: p_i ∝ p_i^(1/2)
    q = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    cdf = (q / q.sum()).cumsum(0)
    for u in (0.3, float(cdf[0]) - 1e-6, float(cdf[0]) + 1e-6, float(cdf[1]) + 1e-6):
        assert draw(u, 2.0) == int((cdf <= u).sum())
    # temperature 0 is greedy whatever u, and the first maximum wins a tie
    assert draw(0.99, 0.0) == 0
    assert int(sample_tokens(torch.tensor([[1.0, 3.0, 3.0]]), torch.tensor([0.5]), 0.0)) == 1


def test_the_nucleus_keeps_the_smallest_set_reaching_top_p_and_renormalises():
    logits = _probs_logits([0.2, 0.5, 0.05, 0.25])[None]  # sorted: 1 (0.5), 3 (0.25), 0 (0.2), 2 (0.05)
    draw = lambda u, p: int(sample_tokens(logits, torch.tensor([u]), 1.0, p))  # noqa: E731
    # top_p 0.7: {1, 3} (mass 0.75), renormalised CDF 2/3, 1
    assert [draw(u, 0.7) for u in (0.0, 0.66, 0.67, 0.999)] == [1, 1, 3, 3]
    # top_p 0.5 keeps token 1 only (its mass reaches 0.5 exactly)
    assert {draw(u, 0.5) for u in (0.0, 0.5, 0.999)} == {1}
    # top_p 0.76: the third token joins; the 0.05 tail is never drawn
    assert {draw(u / 100, 0.76) for u in range(100)} == {0, 1, 3}


def test_neg_inf_logits_are_never_drawn():
    logits = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]])
    assert {int(sample_tokens(logits, torch.tensor([u / 50]), 1.0)) for u in range(50)} == {0, 2}


def test_draws_are_a_pure_function_of_seed_step_and_sample_id_and_leave_the_global_rng_alone():
    model = FixedLogits(torch.zeros(50))  # uniform: every draw is decided by the row's uniforms
    prompts = [[1, 2], [3], [4, 5, 6]]
    kw = dict(max_new_tokens=12, temperature=1.0, seed=7, step=3, sample_ids=[10, 11, 12])
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = sample(model, prompts, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # the global RNG decides nothing
    b = sample(model, prompts, **kw)
    assert torch.equal(a.ids, b.ids)
    # another step, seed or id draws other tokens; a row's draw does not depend on its neighbours
    assert not torch.equal(sample(model, prompts, **{**kw, "step": 4}).ids, a.ids)
    assert not torch.equal(sample(model, prompts, **{**kw, "seed": 8}).ids, a.ids)
    alone = sample(model, [prompts[1]], **{**kw, "sample_ids": [11]})
    assert torch.equal(alone.ids[0], a.ids[1])
    assert row_seed(7, 3, 11) == row_seed(7, 3, 11) != row_seed(7, 3, 12)


def test_tokens_after_the_first_eos_are_padding_and_masked_out():
    model = Counter(V=10)
    out = sample(model, [[1, 3], [1, 6], [2, 4]], max_new_tokens=5, temperature=1.0, eos_id=5, pad_id=0)
    # row 0: 4, 5=EOS, then padding; row 1 never meets 5 within 5 tokens; row 2: 5 at once
    assert out.ids.tolist() == [[4, 5, 0, 0, 0], [7, 8, 9, 0, 1], [5, 0, 0, 0, 0]]
    assert out.mask.tolist() == [[True, True, False, False, False], [True] * 5, [True, False, False, False, False]]
    assert out.finished.tolist() == [True, False, True]
    assert out.row(0) == [4] and out.row(0, with_eos=True) == [4, 5] and out.row(1) == [7, 8, 9, 0, 1]
    assert out.lengths.tolist() == [2, 5, 1] and out.tokens == 8


def test_the_loop_stops_once_every_row_has_ended():
    calls = []

    class Spy(Counter):
        def forward(self, input_ids, **kw):
            calls.append(input_ids.shape[1])
            return super().forward(input_ids)

    out = sample(Spy(), [[1, 3]], max_new_tokens=50, temperature=0.0, eos_id=5)
    assert len(calls) == 2 and out.ids.shape == (1, 50) and out.tokens == 2


def test_a_right_padded_batch_gives_the_same_prompts_as_a_list():
    model = Counter()
    ids = torch.tensor([[1, 3, 0, 0], [1, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    a = sample(model, ids, attention_mask=mask, max_new_tokens=3, temperature=0.0)
    b = sample(model, ids, torch.tensor([2, 4]), max_new_tokens=3, temperature=0.0)
    assert a.ids.tolist() == b.ids.tolist() == [[4, 5, 6], [9, 0, 1]]


@pytest.mark.parametrize("kw, culprit", [({"top_p": 0.0}, "top_p"), ({"temperature": -1.0}, "temperature"),
                                         ({"max_new_tokens": 0}, "max_new_tokens")])
def test_bad_parameters_are_refused_by_name(kw, culprit):
    args = {"max_new_tokens": 2, **kw}
    with pytest.raises(SamplingError, match=culprit):
        sample(Counter(), [[1]], **args)
    with pytest.raises(SamplingError, match="empty prompt"):
        sample(Counter(), [[1], []], max_new_tokens=2)


def test_the_model_is_sampled_in_eval_mode_and_its_mode_restored():
    seen = []

    class Mode(Counter):
        def forward(self, input_ids, **kw):
            seen.append(self.training)
            return super().forward(input_ids)

    m = Mode().train()
    sample(m, [[1]], max_new_tokens=2, temperature=0.0)
    assert seen == [False, False] and m.training


# -- a real (tiny) transformers model, with its key/value cache ----------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_lm():
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("temperature, top_p", [(0.0, 1.0), (1.0, 1.0), (0.8, 0.9)])
def test_a_batched_draw_equals_per_sample_draws_in_any_order(tiny_lm, temperature, top_p):
    prompts = [[1, 4, 5], [1, 6], [1, 7, 8, 9, 10, 11], [1]]
    ids = [100, 101, 102, 103]
    kw = dict(max_new_tokens=10, temperature=temperature, top_p=top_p, seed=5, step=2, eos_id=2, pad_id=0)
    batched = sample(tiny_lm, prompts, sample_ids=ids, **kw)
    for b, (p, i) in enumerate(zip(prompts, ids)):
        one = sample(tiny_lm, [p], sample_ids=[i], **kw)
        assert torch.equal(one.ids[0], batched.ids[b]) and torch.equal(one.mask[0], batched.mask[b])
    order = [2, 0, 3, 1]
    shuffled = sample(tiny_lm, [prompts[k] for k in order], sample_ids=[ids[k] for k in order], **kw)
    assert torch.equal(shuffled.ids, batched.ids[order])


def test_the_cache_changes_nothing_and_greedy_matches_transformers_generate(tiny_lm):
    prompts = [[1, 4, 5], [1, 6, 7, 8]]
    kw = dict(max_new_tokens=8, seed=1, eos_id=2, pad_id=0)
    for t in (0.0, 1.0):
        cached = sample(tiny_lm, prompts, temperature=t, **kw)
        plain = sample(tiny_lm, prompts, temperature=t, use_cache=False, **kw)
        assert torch.equal(cached.ids, plain.ids)
    greedy = sample(tiny_lm, [prompts[1]], temperature=0.0, **kw)
    ref = tiny_lm.generate(torch.tensor([prompts[1]]), max_new_tokens=8, do_sample=False, pad_token_id=0,
                           eos_token_id=2)
    n = ref.shape[1] - 4
    assert greedy.ids[0, :n].tolist() == ref[0, 4:].tolist()


def test_vocab_size_keeps_padding_rows_out_of_the_draw():
    logits = torch.zeros(8)
    logits[6:] = 50.0  # the padded rows would win every draw
    out = sample(FixedLogits(logits), [[1]], max_new_tokens=20, temperature=1.0, vocab_size=6)
    assert int(out.ids.max()) < 6
    assert isinstance(out, Completions)
