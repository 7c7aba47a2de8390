"""REDI's wiring on a tiny random char llama: labels read by sample id from prompt/completion JSONL, which rows go
to which side, the loss is redi_loss of those sides exactly (alpha = 0: length-normalised NLL of the positives; a
negative row's gradient is alpha/(|y-| N-) times that of its log-likelihood), chunks add up to the whole step,
and data REDI cannot learn from is refused in one line."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from alambic.cli import main
from alambic.data.batch import IGNORE_INDEX
from alambic.data.text import (
    TOKENS,
    LabeledExample,
    TextDataError,
    TextExample,
    collate,
    tokenize_example,
)
from alambic.data.text_build import TextDataConfig, build_text_data, read_examples
from alambic.errors import RecipeError
from alambic.losses.policy import (
    length_normalized_logprob,
    redi_loss,
    sampled_token_logprobs,
)
from alambic.methods.base import SetupInfo, StepContext
from alambic.methods.redi import LABEL, N_NEG, N_POS, REDI, REDIError
from alambic.models.causal_lm import CausalLMLogits, causal_lm_from_config
from alambic.recipe import load_recipe
from alambic.tasks.tiny_lm import TINY_ARITH_LLAMA, char_tokenizer
from alambic.teachers.base import ModelOutput

CTX = StepContext(0, 0, 1, 1)
# sample ids 0..5: correct, wrong, correct, wrong, wrong, correct (completions of different lengths)
ROWS = [("What is 1 + 2?", "1 + 2 = 3\n#### 3", True), ("What is 2 + 2?", "#### 5", False),
        ("What is 3 + 4?", "3 + 4 = 7\n#### 7", True), ("What is 1 + 1?", "1 + 1 = 3\n#### 3", False),
        ("What is 5 + 3?", "#### 9", False), ("What is 4 + 4?", "#### 8", True)]


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def lm(tok):
    return causal_lm_from_config(dict(TINY_ARITH_LLAMA), tok, seed=0)


def _texts():
    return [LabeledExample(p, c, y) for p, c, y in ROWS]


def _method(tok, lm, texts=None, train_ids=None, **cfg) -> REDI:
    method = REDI(REDI.Config(**cfg))
    method.texts, method.shared_vocab = (texts if texts is not None else _texts()), len(tok)
    loader = type("L", (), {"index": torch.tensor(train_ids if train_ids is not None else range(len(ROWS)))})()
    method.setup({}, None, SetupInfo(student=CausalLMLogits(lm), num_classes=0, num_samples=len(ROWS),
                                     steps_per_epoch=1, epochs=1, loader=loader))
    return method


def _batch(tok, ids):
    return collate([tokenize_example(tok, _texts()[i], 48) for i in ids], ids, tok.pad_token_id)


def _logits(lm, batch):
    return lm(input_ids=batch.views[TOKENS], use_cache=False).logits


def test_labels_are_read_by_sample_id_and_counted_once_per_step(tok, lm):
    method = _method(tok, lm)
    b = method.prepare(_batch(tok, [5, 1, 0, 4]), CTX)
    assert b.extras[LABEL].tolist() == [True, False, True, False]
    assert b.extras[N_POS].tolist() == [2.0] * 4 and b.extras[N_NEG].tolist() == [2.0] * 4
    # a chunk keeps the step's counts
    chunk = b.select(slice(0, 1))
    assert chunk.extras[N_POS].tolist() == [2.0] and chunk.extras[N_NEG].tolist() == [2.0]


@pytest.mark.parametrize("alpha", [0.0, 0.8])
def test_the_loss_is_redi_loss_of_the_rows_split_by_label(tok, lm, alpha):
    method = _method(tok, lm, alpha=alpha)
    b = method.prepare(_batch(tok, [0, 1, 2, 3, 4, 5]), CTX)
    logits = _logits(lm, b)
    out = method({TOKENS: ModelOutput(logits)}, None, b, CTX)
    mask = b.target != IGNORE_INDEX
    logp = sampled_token_logprobs(logits[..., : len(tok)], b.target.clamp_min(0))
    pos, neg = torch.tensor([0, 2, 5]), torch.tensor([1, 3, 4])
    assert out.loss == redi_loss(logp[pos], mask[pos], logp[neg], mask[neg], alpha=alpha)
    norm = length_normalized_logprob(logp, mask)
    if alpha == 0:  # length-normalised NLL of the positives, nothing of the negatives
        assert torch.allclose(out.loss, -norm[pos].mean(), atol=0, rtol=1e-6)
        assert out.terms["negative"] == 0
    assert torch.allclose(out.monitors["pos_logp"], norm[pos].mean()) and out.monitors["pos_rows"] == 3
    assert torch.allclose(out.monitors["neg_logp"], norm[neg].mean()) and out.monitors["neg_rows"] == 3
    assert torch.allclose(out.terms["positive"] + out.terms["negative"], out.loss.detach())


def test_a_negative_rows_gradient_is_alpha_over_its_length_and_the_negative_count(tok, lm):
    alpha = 0.8
    method = _method(tok, lm, alpha=alpha)
    b = method.prepare(_batch(tok, [0, 1, 3]), CTX)  # one positive, two negatives
    logits = _logits(lm, b).detach().requires_grad_(True)
    method({TOKENS: ModelOutput(logits)}, None, b, CTX).loss.backward()
    mask = b.target != IGNORE_INDEX
    for row, scale in ((1, alpha / (int(mask[1].sum()) * 2)), (2, alpha / (int(mask[2].sum()) * 2)),
                       (0, -1.0 / int(mask[0].sum()))):
        ref = logits.detach().requires_grad_(True)
        lp = sampled_token_logprobs(ref[row: row + 1, :, : len(tok)], b.target[row: row + 1].clamp_min(0))
        (scale * lp[mask[row: row + 1]].sum()).backward()
        assert torch.allclose(logits.grad[row], ref.grad[row], atol=1e-7, rtol=1e-5), row
    # alpha = 0: the negatives get no gradient at all
    logits0 = _logits(lm, b).detach().requires_grad_(True)
    _method(tok, lm, alpha=0.0)({TOKENS: ModelOutput(logits0)}, None, b, CTX).loss.backward()
    assert torch.count_nonzero(logits0.grad[1:]) == 0 and torch.count_nonzero(logits0.grad[0]) > 0


def test_chunks_of_a_step_add_up_to_the_whole_step(tok, lm):
    method = _method(tok, lm)
    b = method.prepare(_batch(tok, [0, 1, 2, 3, 4, 5]), CTX)
    whole = method({TOKENS: ModelOutput(_logits(lm, b))}, None, b, CTX)
    parts = [b.select(slice(0, 2)), b.select(slice(2, 3)), b.select(slice(3, 6))]
    outs = [method({TOKENS: ModelOutput(_logits(lm, c))}, None, c, CTX) for c in parts]
    assert all(method.chunk_weight(c, b) == 1.0 for c in parts)
    assert torch.allclose(sum(o.loss for o in outs), whole.loss, atol=1e-6)
    assert sum(float(o.monitors["pos_rows"]) for o in outs) == 3
    assert torch.allclose(sum(o.monitors["neg_logp"] for o in outs), whole.monitors["neg_logp"], atol=1e-6)


def test_data_redi_cannot_learn_from_is_refused(tok, lm):
    plain = [TextExample(p, c) for p, c, _ in ROWS]
    with pytest.raises(REDIError, match="no labels.*--label.*label_key: correct"):
        _method(tok, lm, texts=plain)
    with pytest.raises(REDIError, match="no incorrect trace.*seqkd.*data.keep: correct"):
        _method(tok, lm, train_ids=[0, 2, 5])
    with pytest.raises(REDIError, match="no correct trace"):
        _method(tok, lm, train_ids=[1, 3])
    _method(tok, lm, train_ids=[0, 2, 5], alpha=0.0)  # SFT on positives only is REDI with alpha = 0
    method = _method(tok, lm)
    method.texts = [*_texts()[:5], TextExample("What is 4 + 4?", "#### 8")]
    with pytest.raises(REDIError, match="sample 5 has no label"):
        method.prepare(_batch(tok, [0, 5]), CTX)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_labelled_prompt_completion_jsonl(tok, tmp_path):
    good = _write(tmp_path / "good.jsonl", [{"prompt": p, "completion": c, "correct": y} for p, c, y in ROWS])
    cfg = TextDataConfig(path=good, format="prompt_completion", label_key="correct")
    got = read_examples(cfg, tok)
    assert [e.correct for e in got] == [y for *_, y in ROWS] and all(isinstance(e, LabeledExample) for e in got)
    kept = read_examples(TextDataConfig(path=good, format="prompt_completion", label_key="correct", keep="incorrect"),
                         tok)
    assert [e.completion for e in kept] == [c for _, c, y in ROWS if not y]
    missing = _write(tmp_path / "missing.jsonl", [{"prompt": "a", "completion": "b", "correct": True},
                                                  {"prompt": "a", "completion": "c"}])
    with pytest.raises(TextDataError, match=r"missing.jsonl:2: the label 'correct' must be true or false \(no such"):
        read_examples(TextDataConfig(path=missing, format="prompt_completion", label_key="correct"), tok)
    text = _write(tmp_path / "text.jsonl", [{"prompt": "a", "completion": "b", "correct": "yes"}])
    with pytest.raises(TextDataError, match=r"text.jsonl:1: .*\(got \"yes\"\)"):
        read_examples(TextDataConfig(path=text, format="prompt_completion", label_key="correct"), tok)
    with pytest.raises(ValueError, match="keep: correct selects rows by their label: set label_key"):
        TextDataConfig(path=good, format="prompt_completion", keep="correct")
    with pytest.raises(ValueError, match="label_key: labels are read from prompt_completion JSONL"):
        TextDataConfig(path=good, format="plain", label_key="correct")
    # the labels are part of the data's fingerprint (same tokens, other labels: other training)
    flipped = _write(tmp_path / "flipped.jsonl", [{"prompt": p, "completion": c, "correct": not y}
                                                  for p, c, y in ROWS])
    assert build_text_data(_spec(good), tok).fingerprint != build_text_data(_spec(flipped), tok).fingerprint
    assert build_text_data(_spec(good), tok).fingerprint == build_text_data(_spec(good), tok).fingerprint
    with pytest.raises(RecipeError, match="data: .*keep: incorrect selects rows by their label: set label_key"):
        _spec(good, label_key=None, keep="incorrect")


def _spec(path, **data):
    data = {"name": "text", "path": str(path), "format": "prompt_completion", "label_key": "correct",
            "val_fraction": 0.2, "test_fraction": 0.2, **data}
    return load_recipe({"name": "t", "data": data, "teacher": {"hf": "runs/tiny-lm"}, "method": {"name": "redi"},
                        "student": {"arch": "prune", "keep": [0]}}).data


def test_a_redi_recipe_without_labels_is_one_line_at_the_command_line(tmp_path, capsys):
    from alambic.tasks.tiny_lm import write_tiny_arithmetic_lm

    lm_dir = write_tiny_arithmetic_lm(tmp_path / "lm", steps=0)
    data = _write(tmp_path / "traces.jsonl", [{"prompt": p, "completion": c, "correct": y} for p, c, y in ROWS * 3])
    recipe = {"name": "redi", "data": {"name": "text", "path": str(data), "format": "prompt_completion",
                                       "max_length": 32, "val_fraction": 0.1, "test_fraction": 0.1},
              "teacher": {"hf": str(lm_dir)}, "student": {"arch": "prune", "keep": [0]},
              "method": {"name": "redi"}, "train": {"epochs": 1, "batch_size": 4}}
    load_recipe(recipe)
    path = tmp_path / "r.yaml"
    path.write_text(json.dumps(recipe))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "redi trains on correct and incorrect traces" in err
