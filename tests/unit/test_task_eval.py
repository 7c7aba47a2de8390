"""Held-out task accuracy (alambic.eval.tasks): greedy answers scored by the checker; batching changes nothing
and each row's answer is transformers' own greedy continuation of its prompt alone."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from alambic.data.tasks import TaskExample  # noqa: E402
from alambic.eval import tasks as task_eval  # noqa: E402
from alambic.eval.tasks import is_task_data, task_accuracy  # noqa: E402
from alambic.generation.sampling import Completions  # noqa: E402
from alambic.tasks.arithmetic import generate_arithmetic  # noqa: E402
from alambic.tasks.tiny_lm import char_tokenizer, write_tiny_arithmetic_lm  # noqa: E402


@pytest.fixture(scope="module")
def lm_and_tok(tmp_path_factory):
    import transformers

    d = write_tiny_arithmetic_lm(tmp_path_factory.mktemp("lm") / "arith", steps=20)
    return transformers.AutoModelForCausalLM.from_pretrained(d).eval(), transformers.AutoTokenizer.from_pretrained(d)


PARITY = "tests.unit.test_task_eval:answer_parity"  # rewards that vary for any model (a tiny one gets no sum right)


def answer_parity(completion: str, answer: str) -> float:
    """1 when the completion's character codes plus the answer are even: varies with the answer even where a
    tiny model writes the same completion for every prompt."""
    return float((sum(map(ord, completion)) + int(answer)) % 2 == 0)


def _problems(tok, n=10):
    probs = generate_arithmetic(n, seed=5, kinds={"add": 1}, digits={1: 1, 2: 1}, instruction="")
    texts = [TaskExample(p.prompt, p.solution, p.answer, PARITY) for p in probs]
    prompts = [[tok.bos_token_id] + tok(p.prompt, add_special_tokens=False)["input_ids"] for p in probs]
    return prompts, texts


def test_batched_accuracy_is_the_checker_on_each_rows_own_greedy_continuation(lm_and_tok):
    model, tok = lm_and_tok
    prompts, texts = _problems(tok)
    whole = task_accuracy(model, tok, prompts, texts, max_new_tokens=12, batch_size=4, samples=len(texts))
    alone = task_accuracy(model, tok, prompts, texts, max_new_tokens=12, batch_size=1, samples=len(texts))
    assert whole == alone
    rewards = []
    for ids, t, shown in zip(prompts, texts, whole["samples"]):
        x = torch.tensor([ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        text = tok.decode(y[0, len(ids):].tolist(), skip_special_tokens=True)
        assert shown["completion"] == text and shown["answer"] == t.answer
        rewards.append(task_eval.load_checker(PARITY)(text, t.answer))
    assert whole["accuracy"] == pytest.approx(sum(rewards) / len(rewards)) and whole["correct"] == sum(rewards)
    assert 0 < whole["accuracy"] < 1  # some rewarded, some not: the mean is not a constant


def test_counts_on_hand_made_completions(monkeypatch):
    tok = char_tokenizer()
    texts = [TaskExample("1+1=", "2", "2", "integer"), TaskExample("2+2=", "4", "4", "integer"),
             TaskExample("3+3=", "6", "6", "integer")]
    prompts = [[1, *tok(t.prompt, add_special_tokens=False)["input_ids"]] for t in texts]
    outs = ["2", "5", "6"]  # right, wrong, right; the second never stops
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def fake_sample(model, chunk, **kw):
        rows = [tok(o, add_special_tokens=False)["input_ids"] for o in outs[: len(chunk)]]
        ids = torch.full((len(chunk), 3), pad)
        mask = torch.zeros((len(chunk), 3), dtype=torch.bool)
        for b, r in enumerate(rows):
            seq = r + ([eos] if b != 1 else [r[0], r[0]])  # row 1: "555", cut by the budget
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = True
        return Completions(ids, mask, torch.tensor([b != 1 for b in range(len(chunk))]))

    monkeypatch.setattr(task_eval, "sample", fake_sample)
    got = task_accuracy(torch.nn.Linear(1, 1), tok, prompts, texts, max_new_tokens=3, samples=2)
    assert got["problems"] == 3 and got["correct"] == 2.0 and got["accuracy"] == pytest.approx(2 / 3)
    assert got["tokens"] == 2 + 3 + 2 and got["mean_tokens"] == pytest.approx(7 / 3)
    assert got["finished"] == pytest.approx(2 / 3)
    assert [s["completion"] for s in got["samples"]] == ["2", "555"] and [s["reward"] for s in got["samples"]] == [1, 0]
    with pytest.raises(ValueError, match="2 prompts for 3 problems"):
        task_accuracy(torch.nn.Linear(1, 1), tok, prompts[:2], texts, max_new_tokens=3)


def test_task_data_is_recognised():
    assert is_task_data([TaskExample("a", "b", "1", "integer")])
    from alambic.data.text import TextExample

    assert not is_task_data([TextExample("a", "b")]) and not is_task_data([])
