"""Causal LMs from transformers: fresh students from a config, layer pruning, the shared vocabulary, loading
from local files (never the network)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from alambic.models.causal_lm import (  # noqa: E402
    LanguageModelError, causal_lm_from_config, decoder_layers, load_causal_lm, load_tokenizer, prune_layers,
    shared_vocab_size,
)

WORDS = "<pad> <s> </s> <unk> a b c d e f g h".split()


def make_tokenizer(words=WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


LLAMA = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 4,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def test_a_student_from_config_takes_the_tokenizers_vocabulary_and_is_seeded(tok):
    a, b = causal_lm_from_config(LLAMA, tok, seed=1), causal_lm_from_config(LLAMA, tok, seed=1)
    assert a.config.vocab_size == len(tok) and a.config.eos_token_id == tok.eos_token_id
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = causal_lm_from_config(LLAMA, tok, seed=2)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    with pytest.raises(LanguageModelError, match="model_type"):
        causal_lm_from_config({"hidden_size": 8}, tok)
    with pytest.raises(LanguageModelError, match="smaller than the tokenizer"):
        causal_lm_from_config({**LLAMA, "vocab_size": 4}, tok)


def test_pruning_keeps_the_named_layers_and_leaves_the_teacher_untouched(tok):
    teacher = causal_lm_from_config(LLAMA, tok, seed=0).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = prune_layers(teacher, [0, -1]).eval()
    assert len(decoder_layers(student)) == 2 and student.config.num_hidden_layers == 2
    assert len(decoder_layers(teacher)) == 4 and all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    # the same function as a 2-layer model holding copies of layers 0 and 3
    ref = causal_lm_from_config({**LLAMA, "num_hidden_layers": 2}, tok, seed=5).eval()
    sd = teacher.state_dict()
    ref.load_state_dict({k: sd[k.replace("model.layers.1.", "model.layers.3.")] for k in ref.state_dict()})
    ids = torch.tensor([[1, 4, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, ref(ids).logits, atol=1e-6)
    with pytest.raises(LanguageModelError, match="distinct layers in 0..3"):
        prune_layers(teacher, [0, 4])
    with pytest.raises(LanguageModelError, match="distinct"):
        prune_layers(teacher, [1, 1])


def test_a_pruned_model_generates_with_its_cache_as_without(tok):
    """The kept layers are renumbered, so the key/value cache addresses layer 1 as 1 and not as 3."""
    student = prune_layers(causal_lm_from_config(LLAMA, tok, seed=0), [1, 3]).eval()
    assert [l.self_attn.layer_idx for l in decoder_layers(student)] == [0, 1]
    ids = torch.tensor([[1, 4, 5]])
    cached = student.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    plain = student.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, plain)


def test_padded_vocabularies_compare_on_the_real_one_and_other_tokenizers_are_refused(tok):
    assert shared_vocab_size(64, len(tok), tok) == len(tok)
    assert shared_vocab_size(64, 128, tok, make_tokenizer()) == len(tok)
    with pytest.raises(LanguageModelError, match="different tokenizers"):
        shared_vocab_size(64, 64, tok, make_tokenizer(WORDS[:-1] + ["z"]))
    with pytest.raises(LanguageModelError, match="student's output layer has 5 rows"):
        shared_vocab_size(64, 5, tok)


def test_models_and_tokenizers_load_from_a_local_directory(tok, tmp_path):
    model = causal_lm_from_config(LLAMA, tok, seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path, dtype="bfloat16")
    assert not loaded.training and loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight.float(), model.lm_head.weight.bfloat16().float())
    assert load_tokenizer(tmp_path).get_vocab() == tok.get_vocab()
    with pytest.raises(LanguageModelError, match="cannot load a causal LM from .*missing"):
        load_causal_lm(tmp_path / "missing")
    with pytest.raises(LanguageModelError, match="dtype must be one of"):
        load_causal_lm(tmp_path, dtype="float64")
