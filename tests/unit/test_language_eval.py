"""Held-out language evaluation: perplexity, top-1 agreement and divergence on completion tokens only, pooled
over tokens (not batches); plain callables and transformers models alike; greedy completions."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import nn

from alambic.data.text import TOKENS, TextLoader, TokenizedExample, collate
from alambic.eval.language import (
    agreement, divergence, greedy_completions, language_metrics, perplexity, tokens_per_second,
)
from alambic.losses.sequence import forward_kl, generalized_jsd, reverse_kl

V = 7
# (ids, completion_start): prompt tokens before completion_start; lengths differ, so batches are padded
EXAMPLES = [TokenizedExample((1, 2, 3, 4, 5), 2), TokenizedExample((6, 1, 2), 1),
            TokenizedExample((3, 3, 4, 1, 2, 6, 5), 4), TokenizedExample((2, 5), 0)]
PAD = 0


class Table(nn.Module):
    """logits[b, t] = table[ids[b, t]]: a bigram model, so a hand computation is easy."""

    def __init__(self, seed: int, vocab: int = V):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, ids):
        return self.table[ids]


def loader(batch_size=2):
    return TextLoader(EXAMPLES, list(range(len(EXAMPLES))), batch_size, PAD, shuffle=False)


def scored_pairs():
    """(current token, next token) of every completion target, by hand: position t predicts ids[t + 1] when
    that next token is in the completion (t + 1 >= completion_start)."""
    return [(e.ids[t], e.ids[t + 1]) for e in EXAMPLES for t in range(len(e.ids) - 1) if t + 1 >= e.completion_start]


def test_uniform_logits_have_perplexity_equal_to_the_vocabulary_size():
    assert perplexity(lambda ids: torch.zeros(*ids.shape, V), loader()) == pytest.approx(V, rel=1e-6)


def test_perplexity_is_the_exp_of_the_token_mean_nll_of_completion_tokens():
    model = Table(0)
    logp = torch.log_softmax(model.table.detach(), -1)
    pairs = scored_pairs()
    assert len(pairs) == 3 + 2 + 3 + 1
    expected = math.exp(-sum(float(logp[a, b]) for a, b in pairs) / len(pairs))
    for bs in (1, 3, 4):  # pooled over tokens: the batching does not matter
        assert perplexity(model, loader(bs)) == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, list(loader(2).epoch(0))) == pytest.approx(expected, rel=1e-5)  # any batch iterable
    m = language_metrics(model, None, loader(2).epoch(0), TOKENS)
    assert m["perplexity"] == pytest.approx(expected, rel=1e-5) and m["tokens"] == len(pairs)


def test_prompt_and_padding_positions_do_not_count():
    base = Table(0)

    class Wrecked(nn.Module):
        """The same logits on scored positions, garbage (a huge wrong logit) on every other one."""

        def forward(self, ids):
            out = base(ids).clone()
            scored = torch.cat([b.target != -100 for b in loader(len(EXAMPLES)).epoch(0)])
            out[~scored] = 0.0
            out[..., 1][~scored] = 1e4
            return out

    full = loader(len(EXAMPLES))  # one batch, so Wrecked's mask lines up with it
    assert perplexity(Wrecked(), full) == pytest.approx(perplexity(base, full), rel=1e-6)
    assert agreement(Wrecked(), base, full) == 1.0
    assert divergence(Wrecked(), base, full, forward_kl) == pytest.approx(0.0, abs=1e-6)


def test_agreement_counts_top1_matches_over_completion_tokens():
    a = Table(1)
    assert agreement(a, a, loader()) == 1.0
    b = Table(1)
    with torch.no_grad():  # change the top-1 of one current token only
        row = b.table[3]
        row[row.argmin()] = row.max() + 1.0
    pairs = scored_pairs()
    expected = sum(cur != 3 for cur, _ in pairs) / len(pairs)
    assert expected < 1
    assert agreement(b, a, loader(3)) == pytest.approx(expected)


def test_divergence_is_the_token_mean_of_the_given_function_and_zero_at_equality():
    s, t = Table(2), Table(3)
    pairs = scored_pairs()
    cur = torch.tensor([a for a, _ in pairs])
    for fn in (forward_kl, reverse_kl, partial(generalized_jsd, beta=0.3)):
        expected = float(fn(s.table.detach()[cur], t.table.detach()[cur]))  # default: mean over the rows
        assert divergence(s, t, loader(1), fn) == pytest.approx(expected, rel=1e-5)
        assert divergence(s, t, loader(4), fn) == pytest.approx(expected, rel=1e-5)
        assert divergence(s, s, loader(), fn) == pytest.approx(0.0, abs=1e-6)


def test_padded_output_rows_are_dropped_before_comparing():
    t = Table(4)
    s = Table(4, vocab=V + 3)
    with torch.no_grad():
        s.table[:, :V] = t.table
        s.table[:, V:] = 100.0  # padding rows that would win every argmax
    assert agreement(s, t, loader()) == 1.0
    assert divergence(s, t, loader(), forward_kl) == pytest.approx(0.0, abs=1e-6)


def test_models_are_put_in_eval_mode_and_restored():
    class Noisy(Table):
        def forward(self, ids):
            out = super().forward(ids)
            return out + torch.randn_like(out) * 10 if self.training else out

    m = Noisy(5).train()
    assert perplexity(m, loader()) == perplexity(m, loader())
    assert m.training


def test_tokens_per_second_counts_real_tokens_of_a_pass():
    rate = tokens_per_second(Table(0), loader())
    assert rate > 0 and math.isfinite(rate)


def test_empty_completions_give_nan_not_an_error():
    batch = collate([TokenizedExample((1, 2), 2)], [0], PAD)  # the completion starts past the end
    assert math.isnan(perplexity(Table(0), [batch]))


# -- transformers models ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = "<pad> <s> </s> <unk> a b c d e f g h".split()
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    from alambic.models.causal_lm import causal_lm_from_config

    model = causal_lm_from_config({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
                                   "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                   "max_position_embeddings": 64}, tok, seed=0)
    return model, tok


def test_a_transformers_model_is_read_through_its_logits(tiny_lm):
    model, _ = tiny_lm
    examples = [TokenizedExample((1, 4, 5, 6, 7), 2), TokenizedExample((1, 8, 9), 1)]
    data = TextLoader(examples, [0, 1], 2, 0, shuffle=False)
    plain = lambda ids: model(ids).logits  # noqa: E731
    assert perplexity(model, data) == pytest.approx(perplexity(plain, data), rel=1e-6)
    assert agreement(model, plain, data) == 1.0


def test_greedy_completions_continue_each_prompt_with_the_argmax_token(tiny_lm):
    model, tok = tiny_lm
    n = 5
    got = greedy_completions(model, tok, ["a b c", "h"], max_new_tokens=n)
    for prompt, text in zip(["a b c", "h"], got):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(n):
                nxt = int(model(ids).logits[0, -1].argmax())
                new.append(nxt)
                if nxt == tok.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        assert text == tok.decode(new, skip_special_tokens=True)
    assert len(got) == 2
