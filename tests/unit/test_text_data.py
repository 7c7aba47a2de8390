"""Text data: sources, the prompt/completion boundary, the one causal shift, seeded splits and batches."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from alambic.data.batch import IGNORE_INDEX  # noqa: E402
from alambic.data.text import (  # noqa: E402
    ATTENTION_MASK, TOKENS, TextDataError, TextExample, TextLoader, chat_example, collate, completion_tokens,
    next_token_targets, read_chat_jsonl, read_plain_text, read_prompt_completion_jsonl, split_indices,
    tokenize_example,
)

WORDS = "<pad> <s> </s> <unk> the lord said let there be light and it was good user assistant : ?".split()
CHAT = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer built here (no download): one id per word of WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT
    return fast


def ids(tok, text):
    return [WORDS.index(w) for w in text.split()]


def test_the_last_prompt_token_predicts_the_first_completion_token(tok):
    ex = tokenize_example(tok, TextExample("let there be", "light and"), max_length=32)
    bos, eos = WORDS.index("<s>"), WORDS.index("</s>")
    assert ex.ids == (bos, *ids(tok, "let there be light and"), eos)
    assert ex.completion_start == 4  # bos + 3 prompt tokens
    b = collate([ex], [7], pad=0)
    target = b.target[0].tolist()
    # position 3 holds "be" (the last prompt token): its target is "light", the first completion token
    assert b.views[TOKENS][0, 3].item() == WORDS.index("be")
    assert target[3] == WORDS.index("light")
    assert target[:3] == [IGNORE_INDEX] * 3  # no prompt token is a target
    assert target[4:] == [WORDS.index("and"), eos, IGNORE_INDEX]  # "and", then EOS; the last predicts nothing
    assert completion_tokens(b) == 3


def test_next_token_targets_ignore_padding_and_agree_with_a_direct_shift():
    ids_ = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 10]])
    t = next_token_targets(ids_, completion_start=torch.tensor([2, 1]), lengths=torch.tensor([4, 6]))
    assert t.tolist() == [[-100, 7, 8, -100, -100, -100], [6, 7, 8, 9, 10, -100]]


def test_an_empty_prompt_puts_every_token_under_the_loss_after_bos(tok):
    ex = tokenize_example(tok, TextExample("", "the lord said"), max_length=32)
    b = collate([ex], [0], pad=0)
    assert completion_tokens(b) == 4  # the, lord, said, </s>: each predicted from what precedes it
    assert b.target[0, 0].item() == WORDS.index("the")


def test_a_long_example_keeps_the_prompt_end_and_at_least_one_completion_token(tok):
    ex = tokenize_example(tok, TextExample("the lord said let there be", "light and it was good"), max_length=6)
    assert len(ex.ids) == 6 and ex.completion_start >= 1
    assert ex.ids[ex.completion_start] == WORDS.index("light")  # the completion starts where it did
    assert ex.ids[ex.completion_start - 1] == WORDS.index("be")  # the prompt keeps its end, nearest the answer
    short = tokenize_example(tok, TextExample("the lord said let there be light and it", "was good"), max_length=4)
    assert len(short.ids) == 4 and short.ids[short.completion_start] == WORDS.index("was")


def test_batches_pad_on_the_right_with_a_mask(tok):
    a = tokenize_example(tok, TextExample("let", "there be light"), max_length=32)
    b = tokenize_example(tok, TextExample("let", "light"), max_length=32)
    batch = collate([a, b], [3, 9], pad=WORDS.index("<pad>"))
    assert batch.views[TOKENS].shape == (2, len(a.ids))
    assert batch.extras[ATTENTION_MASK].sum(1).tolist() == [len(a.ids), len(b.ids)]
    assert batch.views[TOKENS][1, len(b.ids):].eq(WORDS.index("<pad>")).all()
    assert (batch.target[1, len(b.ids) - 1:] == IGNORE_INDEX).all()
    assert batch.index.tolist() == [3, 9]


def test_chat_template_splits_at_the_generation_prompt(tok):
    msgs = [{"role": "user", "content": "let there be light ?"}, {"role": "assistant", "content": "it was good"}]
    ex = chat_example(tok, msgs)
    assert ex.prompt == "user: let there be light ?</s>assistant:"
    assert ex.completion == " it was good</s>"
    t = tokenize_example(tok, ex, max_length=64, add_eos=False)
    assert t.ids[t.completion_start] == WORDS.index("it")


def test_sources_read_and_refuse_with_file_and_line(tmp_path):
    txt = tmp_path / "c.txt"
    txt.write_text("In the beginning\ncontinued.\n\n\nSecond paragraph.\n\nx\n")
    assert [e.completion for e in read_plain_text(txt)] == ["In the beginning\ncontinued.", "Second paragraph.", "x"]
    assert len(read_plain_text(txt, unit="line", min_chars=2)) == 3
    pc = tmp_path / "pc.jsonl"
    pc.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n\n" + "{oops\n")
    with pytest.raises(TextDataError, match=r"pc.jsonl:3: invalid JSON"):
        read_prompt_completion_jsonl(pc)
    pc.write_text(json.dumps({"prompt": "a", "completion": ""}) + "\n")
    with pytest.raises(TextDataError, match=r"pc.jsonl:1: empty 'completion'"):
        read_prompt_completion_jsonl(pc)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}))
    with pytest.raises(TextDataError, match=r"chat.jsonl:1: the last message must be the assistant's"):
        read_chat_jsonl(chat)
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(TextDataError, match=r"bin.txt: not UTF-8"):
        read_plain_text(tmp_path / "bin.txt")
    with pytest.raises(TextDataError, match="not found"):
        read_plain_text(tmp_path / "missing.txt")


def test_splits_are_fixed_disjoint_and_seeded():
    a, b = split_indices(100, 0.1, 0.2, seed=3), split_indices(100, 0.1, 0.2, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(torch.cat(list(a.values())).tolist()) == list(range(100))
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (70, 10, 20)
    assert not torch.equal(split_indices(100, 0.1, 0.2, seed=4)["test"], a["test"])
    with pytest.raises(TextDataError, match="cannot make a training split"):
        split_indices(2, 0.4, 0.4, seed=0)


def test_the_loader_order_is_a_pure_function_of_seed_and_epoch_and_resumes_mid_epoch(tok):
    examples = [tokenize_example(tok, TextExample("", " ".join(WORDS[4:4 + 1 + i % 5])), 16) for i in range(10)]
    loader = TextLoader(examples, list(range(100, 110)), batch_size=3, pad=0, seed=1)
    full = [b.index.tolist() for b in loader.epoch(2)]
    assert len(full) == len(loader) == 4
    assert [b.index.tolist() for b in loader.epoch(2, start=2)] == full[2:]
    assert sorted(sum(full, [])) == list(range(100, 110))
    assert full != [b.index.tolist() for b in loader.epoch(3)]


def test_a_prompt_that_starts_with_bos_gets_no_second_one(tok):
    bos = WORDS.index("<s>")
    ex = tokenize_example(tok, TextExample("<s> let there be", "light"), max_length=32)
    assert ex.ids[:2] == (bos, WORDS.index("let")) and ex.ids.count(bos) == 1
