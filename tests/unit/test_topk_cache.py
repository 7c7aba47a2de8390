"""The offline top-k teacher-logit cache (``alambic.teachers.topk``): exact round trip (float32 values; float16
within its stated 2^-11 relative rounding), the manifest, resuming a killed writer, refusing a stale, damaged
or incomplete cache, the cached loss at k = V equal to the live dense one."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from alambic.data.batch import IGNORE_INDEX  # noqa: E402
from alambic.data.text import TextExample, collate, tokenize_example  # noqa: E402
from alambic.errors import AlambicError  # noqa: E402
from alambic.losses import forward_kl, sparse_forward_kl  # noqa: E402
from alambic.models.causal_lm import causal_lm_from_config, tokenizer_fingerprint  # noqa: E402
from alambic.teachers.frozen import state_fingerprint  # noqa: E402
from alambic.teachers.topk import (  # noqa: E402
    CachedTopKTeacher, TopKCache, TopKCacheError, data_fingerprint, index_dtype, teacher_topk, write_topk_cache,
)

WORDS = "<pad> <s> </s> <unk> a b c d e f g h i j".split()
LLAMA = {"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}
TEXTS = [("a b", "c d e"), ("", "f g h i"), ("j a", "b"), ("c", "d e f g h"), ("", "i j a b"), ("h g", "f e d c")]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def setup():
    tok = make_tokenizer()
    model = causal_lm_from_config(LLAMA, tok, seed=0).eval()
    examples = [tokenize_example(tok, TextExample(p, c), max_length=16) for p, c in TEXTS]
    ids = [10, 11, 12, 20, 21, 30]  # stable sample ids, not row numbers
    return tok, model, examples, ids


def write(setup, out, **kw):
    tok, model, examples, ids = setup
    args = dict(k=3, tail="bucket", teacher_fingerprint=state_fingerprint(model),
                tokenizer_fingerprint=tokenizer_fingerprint(tok), vocab_size=len(tok), pad=tok.pad_token_id,
                batch_size=2, shard_samples=2, progress=lambda line: None)
    args.update(kw)
    return write_topk_cache(model, examples, ids, out, **args)


def batch_of(setup, rows):
    tok, _, examples, ids = setup
    return collate([examples[r] for r in rows], [ids[r] for r in rows], tok.pad_token_id)


@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_indices_round_trip_exactly_and_values_up_to_the_16_bit_rounding(setup, tmp_path, value_dtype):
    tok, model, _, _ = setup
    report = write(setup, tmp_path / "c", value_dtype=value_dtype)
    assert report.shards_written == 3 and report.tokens > 0
    teacher = CachedTopKTeacher(tmp_path / "c")
    batch = batch_of(setup, [5, 0, 3])  # rows from three shards, out of order
    sparse = teacher.outputs(batch, ["tokens"])["tokens"].sparse
    ids, lp, tail, _ = teacher_topk(model, batch, 3, len(tok), with_tail=True)
    mask = batch.target != IGNORE_INDEX
    assert torch.equal(sparse.mask, mask) and sparse.vocab_size == len(tok)
    assert torch.equal(sparse.ids[mask], ids)
    if value_dtype == "float32":
        assert torch.equal(sparse.logprobs[mask], lp) and torch.equal(sparse.tail_logprob[mask], tail)
    else:  # float16: round to nearest, relative error <= 2^-11 (no value here is near the subnormal range)
        assert torch.equal(sparse.logprobs[mask], lp.half().float())
        assert ((sparse.logprobs[mask] - lp).abs() <= 2.0**-11 * lp.abs()).all()
        assert ((sparse.tail_logprob[mask] - tail).abs() <= 2.0**-11 * tail.abs()).all()
    # the tail is the teacher's mass outside the k ids: top-k and tail probabilities sum to 1
    total = torch.cat([lp, tail[:, None]], 1).logsumexp(1)
    assert torch.allclose(total, torch.zeros_like(total), atol=1e-6)
    assert sparse.ids[~mask].eq(0).all() and sparse.logprobs[~mask].eq(0).all()


def test_the_manifest_says_what_the_cache_is_and_its_size(setup, tmp_path):
    tok, model, examples, ids = setup
    report = write(setup, tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["k"] == 3 and manifest["tail"] == "bucket"
    assert manifest["index_dtype"] == "uint16" and manifest["value_dtype"] == "float16"
    assert manifest["teacher"] == state_fingerprint(model) and manifest["tokenizer"] == tokenizer_fingerprint(tok)
    assert manifest["data"] == data_fingerprint(examples, ids) and manifest["vocab_size"] == len(tok)
    assert [(s["first_id"], s["last_id"]) for s in manifest["shards"]] == [(10, 11), (12, 20), (21, 30)]
    n_tokens = sum(int((collate([e], [0], 0).target != IGNORE_INDEX).sum()) for e in examples)
    assert manifest["tokens"] == report.tokens == n_tokens
    assert manifest["bytes"] == sum((tmp_path / "c" / s["file"]).stat().st_size for s in manifest["shards"])
    assert report.bytes_per_token == pytest.approx(manifest["bytes"] / n_tokens)
    # payload: 3 uint16 ids + 3 float16 values + a float16 tail = 14 bytes per token, plus headers
    assert 14 < report.bytes_per_token


def test_index_dtype_is_as_narrow_as_the_vocabulary_allows(tmp_path):
    assert index_dtype(65_536) == torch.uint16 and index_dtype(65_537) == torch.int32
    tok = make_tokenizer()
    big = causal_lm_from_config({**LLAMA, "hidden_size": 8, "intermediate_size": 8, "vocab_size": 70_000}, tok)
    examples = [tokenize_example(tok, TextExample("a", "b c"), 8)]
    write_topk_cache(big.eval(), examples, [0], tmp_path / "c", k=2, teacher_fingerprint="t", tokenizer_fingerprint="x",
                     vocab_size=70_000, pad=0, progress=lambda line: None)
    cache = TopKCache(tmp_path / "c")
    assert cache.manifest["index_dtype"] == "int32"
    batch = collate(examples, [0], 0)
    ids, _, _, _ = teacher_topk(big, batch, 2, 70_000, with_tail=True)
    assert torch.equal(cache.lookup(batch).ids[batch.target != IGNORE_INDEX], ids)


def test_a_killed_writer_resumes_after_its_last_shard_and_ends_as_an_uninterrupted_one(setup, tmp_path):
    whole = write(setup, tmp_path / "whole")
    lines = []

    def die_after_first_shard(line):
        lines.append(line)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write(setup, tmp_path / "killed", progress=die_after_first_shard)
    assert "shard 1/3" in lines[0] and "B/token" in lines[0]
    with pytest.raises(TopKCacheError, match=r"incomplete \(1 of 3 shards\)"):
        TopKCache(tmp_path / "killed")
    (tmp_path / "killed" / "shard-00001.safetensors").write_bytes(b"torn")  # a shard the manifest never listed
    resumed = write(setup, tmp_path / "killed")
    assert (resumed.shards_reused, resumed.shards_written) == (1, 2)
    a = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    b = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert [s["digest"] for s in a["shards"]] == [s["digest"] for s in b["shards"]]
    assert resumed.tokens == whole.tokens
    again = write(setup, tmp_path / "whole")  # a complete cache: nothing to do
    assert (again.shards_reused, again.shards_written) == (3, 0)


def test_a_stale_cache_is_refused_in_one_line_naming_what_differs(setup, tmp_path):
    _, model, _, _ = setup
    write(setup, tmp_path / "c")
    with pytest.raises(TopKCacheError) as err:
        TopKCache(tmp_path / "c", expect={"teacher": "another", "k": 4, "tail": "bucket"})
    msg = str(err.value)
    assert "\n" not in msg and "teacher: cache" in msg and "k: cache 3, wanted 4" in msg and "tail" not in msg
    with pytest.raises(TopKCacheError, match="k: cache 3, wanted 5.*--rebuild"):
        write(setup, tmp_path / "c", k=5)
    rebuilt = write(setup, tmp_path / "c", k=5, rebuild=True)
    assert rebuilt.shards_written == 3 and TopKCache(tmp_path / "c").k == 5
    other_data = batch_of(setup, [0])
    other_data = type(other_data)(views=other_data.views, index=torch.tensor([99]), target=other_data.target,
                                  extras=other_data.extras)
    with pytest.raises(TopKCacheError, match="holds no sample 99"):
        TopKCache(tmp_path / "c").lookup(other_data)
    shifted = batch_of(setup, [0])
    target = shifted.target.clone()
    target[0, 0] = 5  # one more covered position than when the cache was written
    with pytest.raises(TopKCacheError, match="sample 10 has .* cached positions but the batch covers"):
        TopKCache(tmp_path / "c").lookup(type(shifted)(views=shifted.views, index=shifted.index, target=target,
                                                       extras=shifted.extras))


def test_a_damaged_or_foreign_shard_is_never_served(setup, tmp_path):
    write(setup, tmp_path / "c")
    write(setup, tmp_path / "d", tail="renormalize")
    shard = tmp_path / "c" / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(AlambicError, match="shard-00000.safetensors is damaged"):
        CachedTopKTeacher(tmp_path / "c").outputs(batch_of(setup, [0]), ["tokens"])
    shard.write_bytes((tmp_path / "d" / "shard-00000.safetensors").read_bytes())  # intact, but another cache's
    with pytest.raises(TopKCacheError, match="not the one its manifest lists"):
        TopKCache(tmp_path / "c").lookup(batch_of(setup, [1]))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_the_cached_loss_at_k_equal_v_is_the_live_dense_loss(setup, tmp_path, tail):
    tok, model, _, _ = setup
    v = len(tok)
    student = causal_lm_from_config(LLAMA, tok, seed=1).eval()
    batch = batch_of(setup, [0, 1, 2, 3, 4, 5])
    mask = batch.target != IGNORE_INDEX
    with torch.no_grad():
        t_logits = model(input_ids=batch.views["tokens"], attention_mask=batch.extras["attention_mask"]).logits
    s_logits = student(input_ids=batch.views["tokens"], attention_mask=batch.extras["attention_mask"]).logits
    dense = forward_kl(s_logits, t_logits, mask)
    for value_dtype, rel in (("float32", 1e-5), ("float16", 2e-3)):
        write(setup, tmp_path / value_dtype, k=v, tail=tail, value_dtype=value_dtype)
        sparse = TopKCache(tmp_path / value_dtype, expect={"k": v, "tail": tail}).lookup(batch)
        cached = sparse_forward_kl(s_logits, sparse.ids, sparse.logprobs, sparse.mask, tail=tail,
                                   tail_logprob=sparse.tail_logprob)
        assert cached.item() == pytest.approx(dense.item(), rel=rel), value_dtype
        if tail == "bucket":
            assert torch.isneginf(sparse.tail_logprob[mask]).all()  # k = V: the tail is empty, exactly
    assert CachedTopKTeacher(tmp_path / "float32").fingerprint() == state_fingerprint(model)
    with pytest.raises(TopKCacheError, match="serves the 'tokens' view only"):
        CachedTopKTeacher(tmp_path / "float32").outputs(batch, ["image"])


def test_bad_writer_arguments_are_refused(setup, tmp_path):
    tok = setup[0]
    with pytest.raises(TopKCacheError, match="k must be in 1..14"):
        write(setup, tmp_path / "c", k=len(tok) + 1)
    with pytest.raises(TopKCacheError, match="tail must be one of"):
        write(setup, tmp_path / "c", tail="drop")
    with pytest.raises(TopKCacheError, match="one distinct sample id per example"):
        write_topk_cache(setup[1], setup[2], [1] * len(setup[2]), tmp_path / "c", k=3, teacher_fingerprint="t",
                         tokenizer_fingerprint="x", vocab_size=len(tok), pad=0)


def test_a_token_kd_run_from_the_cache_at_k_equal_v_ends_at_the_live_teacher_runs_weights(tmp_path):
    """``teacher.cache: topk`` with k = V and float32 values: the same loss (the bucket is empty), so the same
    training trajectory. Tolerance 1e-4 absolute on the weights after 2 epochs: the cached and dense losses
    differ only by float32 rounding (log-softmax over the k gathered ids vs over the vocabulary, ~1e-7 per
    token), which Adam's updates can amplify a little; a wrong loss (another tail, a shifted position) moves
    the weights by far more (checked: the float16 cache's run differs by more than that)."""
    from safetensors.torch import load_file

    from alambic.models.causal_lm import write_tiny_lm
    from alambic.recipe import load_recipe
    from alambic.run import run

    lm = write_tiny_lm(tmp_path / "lm", steps=20)
    vocab = len(transformers.AutoTokenizer.from_pretrained(str(lm)))
    base = {"name": "t", "data": {"name": "text", "path": str(lm / "corpus.txt"), "format": "plain", "unit": "line",
                                  "max_length": 16, "max_examples": 48, "val_fraction": 0.1, "test_fraction": 0.1},
            "teacher": {"hf": str(lm)}, "student": {"arch": "prune", "keep": [0, 1]},
            "method": {"name": "token_kd", "divergence": "forward_kl"},
            "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "log_every": 100},
            "eval": {"num_prompts": 1, "max_new_tokens": 2}}

    def weights(teacher: dict, out: str) -> dict[str, torch.Tensor]:
        run(load_recipe({**base, "teacher": {**base["teacher"], **teacher}}), tmp_path / out, progress=False)
        return load_file(str(tmp_path / out / "student" / "model.safetensors"))

    live = weights({}, "live")
    exact = weights({"cache": "topk", "topk": {"k": vocab, "value_dtype": "float32", "dir": str(tmp_path / "c32")}},
                    "cached")
    rounded = weights({"cache": "topk", "topk": {"k": vocab, "dir": str(tmp_path / "c16")}}, "cached16")
    assert live.keys() == exact.keys()
    gap = max((live[k] - exact[k]).abs().max().item() for k in live)
    gap16 = max((live[k] - rounded[k]).abs().max().item() for k in live)
    assert gap < 1e-4 < gap16, (gap, gap16)
    assert json.loads((tmp_path / "c32" / "manifest.json").read_text())["complete"]
    with pytest.raises(TopKCacheError, match="k: cache"):  # the folder now holds k = V; asking for 4 is refused
        weights({"cache": "topk", "topk": {"k": 4, "value_dtype": "float32", "dir": str(tmp_path / "c32")}}, "stale")


def test_the_cache_logits_command_writes_what_a_topk_run_reads_and_refuses_a_stale_folder(tmp_path, capsys):
    import yaml

    from alambic.cli import main
    from alambic.models.causal_lm import write_tiny_lm
    from alambic.recipe import load_recipe
    from alambic.run import run

    lm = write_tiny_lm(tmp_path / "lm", steps=0)
    recipe = {"name": "t", "data": {"name": "text", "path": str(lm / "corpus.txt"), "format": "plain",
                                    "unit": "line", "max_length": 16, "max_examples": 28, "val_fraction": 0.1,
                                    "test_fraction": 0.1},
              "teacher": {"hf": str(lm), "cache": "topk", "topk": {"k": 4, "dir": str(tmp_path / "c")}},
              "student": {"arch": "prune", "keep": [0]}, "method": {"name": "token_kd"},
              "train": {"epochs": 1, "batch_size": 8, "log_every": 100},
              "eval": {"num_prompts": 1, "max_new_tokens": 2}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["cache-logits", str(path), "--shard-samples", "8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"top-k cache {tmp_path / 'c'}:" in out and "B/token (3 shards written, 0 reused)" in out
    manifest = (tmp_path / "c" / "manifest.json").read_text()
    run(load_recipe(recipe), tmp_path / "run", progress=False)  # reads the folder as it is
    assert (tmp_path / "c" / "manifest.json").read_text() == manifest
    assert main(["cache-logits", str(path), "--k", "5", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "k: cache 4, wanted 5" in err and "--rebuild" in err
