"""A language run is first-class wherever a classification run is: ``load_student``, ``alambic export``
(safetensors with alambic's digest; ONNX ids -> logits checked with onnxruntime), ``alambic probe`` (refused in
one line), the progress line (validation perplexity), bf16 autocast (token_kd gets bf16 logits and still
computes in fp32), and gkd's ``train.tokens`` (the tokens it actually trained on)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from alambic import load_student  # noqa: E402
from alambic.cli import main  # noqa: E402
from alambic.data.text import ATTENTION_MASK, TOKENS  # noqa: E402
from alambic.methods.gkd import GKD  # noqa: E402
from alambic.methods.token_kd import TokenKD  # noqa: E402
from alambic.models.causal_lm import write_tiny_lm  # noqa: E402
from alambic.recipe import load_recipe  # noqa: E402
from alambic.run import run  # noqa: E402

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny"


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-lm", steps=20)


def recipe(tiny_lm: Path, name: str = "token_kd", method: dict | None = None, **train):
    data = yaml.safe_load((TINY / f"{name}.yaml").read_text())
    data["teacher"]["hf"] = str(tiny_lm)
    data["data"]["path"] = str(tiny_lm / "corpus.txt")
    data["method"].update(method or {})
    data["train"].update(train)
    return load_recipe(data)


@pytest.fixture(scope="module")
def finished(tiny_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "lm"
    run(recipe(tiny_lm, epochs=1, steps=3), out, progress=False)
    return out


def test_load_student_returns_the_language_runs_causal_lm_in_eval_mode(finished):
    from transformers import AutoModelForCausalLM

    model, meta = load_student(finished)
    assert meta["kind"] == "causal_lm" and meta["dir"] == "student"
    assert not model.training and model.config.num_hidden_layers == 2
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    reference = AutoModelForCausalLM.from_pretrained(finished / "student").eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_load_student_refuses_a_student_dir_outside_the_run(finished, tmp_path):
    import shutil

    from alambic.errors import RunDirError

    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    meta = json.loads((copy / "student.json").read_text())
    (copy / "student.json").write_text(json.dumps({**meta, "dir": "../elsewhere"}))
    with pytest.raises(RunDirError, match="'dir' must name"):
        load_student(copy)


def test_export_safetensors_of_a_language_run_carries_the_digest_and_loads_back(finished, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from alambic.errors import IntegrityError
    from alambic.export.weights import load_weights
    from alambic.integrity import DIGEST_KEY

    out = tmp_path / "lm.safetensors"
    assert main(["export", str(finished), "--format", "safetensors", "--out", str(out)]) == 0
    with safe_open(str(out), framework="pt") as fh:
        header = fh.metadata()
    assert DIGEST_KEY in header and json.loads(header["alambic"])["kind"] == "causal_lm"
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(finished / "student"))
    load_weights(fresh, out)  # strict names and shapes, digest verified
    model, _ = load_student(finished)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    data = bytearray(out.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the last tensor
    out.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        load_weights(fresh, out)


def test_export_onnx_of_a_language_run_maps_ids_to_logits_with_dynamic_batch_and_length(finished, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    out = tmp_path / "lm.onnx"
    assert main(["export", str(finished), "--format", "onnx", "--out", str(out)]) == 0
    assert "checked with onnxruntime" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input_ids" and all(isinstance(d, str) for d in inp.shape[:2])  # symbolic: batch, sequence
    model, meta = load_student(finished)
    ids = torch.randint(0, meta["vocab_size"], (4, 9), generator=torch.Generator().manual_seed(3))
    (got,) = session.run(None, {"input_ids": ids.numpy()})
    with torch.no_grad():
        want = model(input_ids=ids).logits
    assert got.shape == tuple(want.shape)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-4, rtol=1e-3)


def test_probe_of_a_language_run_says_in_one_line_that_probes_are_for_representations(finished, capsys):
    assert main(["probe", str(finished)]) != 0
    err = capsys.readouterr().err.strip()
    assert "probes are for representations" in err and len(err.splitlines()) == 1


def test_the_progress_line_of_a_language_run_shows_validation_perplexity(tiny_lm, tmp_path, capsys):
    run(recipe(tiny_lm, epochs=2), tmp_path / "r", progress=True)  # epoch 2's lines show epoch 1's validation
    text = capsys.readouterr().out
    assert "val ppl " in text and "val acc" not in text and "nan" not in text
    shown = float(text.split("val ppl ")[1].split()[0])
    val = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert shown == pytest.approx(next(r for r in val if r["split"] == "val")["perplexity"], rel=1e-2)


def test_val_text_prefers_accuracy_then_perplexity():
    from alambic.train.loop import _val_text

    assert _val_text({"accuracy": 0.5, "perplexity": 3.0}) == "val acc 0.500"
    assert _val_text({"perplexity": 3.2189, "nll": 1.17}) == "val ppl 3.22"


def test_token_kd_in_bf16_gets_bf16_logits_computes_in_fp32_and_ends_near_fp32(tiny_lm, tmp_path, monkeypatch):
    seen = []
    forward = TokenKD.forward

    def spy(self, student, teacher, batch, ctx):
        out = forward(self, student, teacher, batch, ctx)
        seen.append((student[TOKENS].logits.dtype, teacher[TOKENS].logits.dtype, out.loss.dtype,
                     out.terms["kd"].dtype))
        return out

    monkeypatch.setattr(TokenKD, "forward", spy)
    bf16 = run(recipe(tiny_lm, epochs=1, precision="bf16"), tmp_path / "bf16", progress=False)
    assert seen and all(s == (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32) for s in seen)
    seen.clear()
    monkeypatch.setattr(TokenKD, "upcasts_itself", False)  # the loop casts for a method that does not opt out
    run(recipe(tiny_lm, epochs=1, precision="bf16", steps=1), tmp_path / "cast", progress=False)
    assert seen[0][:2] == (torch.float32, torch.float32)
    monkeypatch.setattr(TokenKD, "forward", forward)
    fp32 = run(recipe(tiny_lm, epochs=1, precision="fp32"), tmp_path / "fp32", progress=False)
    a, b = bf16["test"]["perplexity"], fp32["test"]["perplexity"]
    before = json.loads((tmp_path / "fp32" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert math.isfinite(a) and math.isfinite(bf16["test"]["forward_kl"])
    # tolerance: 0.5% of the perplexity (measured: 0.02%; bf16 forwards, fp32 losses)
    assert a == pytest.approx(b, rel=0.005), (a, b)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()
              if json.loads(x)["split"] == "train"]
    assert losses[-1] < before  # it trained


def test_gkd_train_tokens_count_the_sampled_completions(tiny_lm, tmp_path, monkeypatch):
    from alambic.language_run import trained_tokens

    counted = []
    prepare = GKD.prepare

    def spy(self, batch, ctx):
        out = prepare(self, batch, ctx)
        counted.append((int(out.extras[ATTENTION_MASK].sum()), int((out.target != -100).sum())))
        return out

    monkeypatch.setattr(GKD, "prepare", spy)
    r = recipe(tiny_lm, "gkd", {"lmbda": 1.0, "max_new_tokens": 4}, epochs=1, steps=3)
    summary = run(r, tmp_path / "gkd", progress=False)
    assert len(counted) == 3
    real, loss = (sum(c[i] for c in counted) for i in (0, 1))
    assert (summary["train"]["tokens"], summary["train"]["loss_tokens"]) == (real, loss)
    # at most 4 sampled tokens per row: fewer than the dataset's completions of the same batches
    from alambic.data.text_build import build_text_data
    from alambic.models.causal_lm import load_tokenizer

    data = build_text_data(r.data, load_tokenizer(str(tiny_lm), None))
    dataset = trained_tokens(data.loader("train", r.train.batch_size, shuffle=True, seed=r.seed), 3)
    assert loss <= 3 * r.train.batch_size * 4 < dataset[1]


def test_a_language_run_as_a_classifiers_teacher_is_one_line(tmp_path):
    """Its student.json has no classes: refused by kind, before any model is loaded (it was a KeyError)."""
    import json

    from alambic.errors import RunDirError
    from alambic.recipe import load_recipe
    from alambic.run import run
    from tests.conftest import tiny_recipe

    lm_run = tmp_path / "lm-run"
    lm_run.mkdir()
    (lm_run / "student.json").write_text(json.dumps({"kind": "causal_lm", "dir": "student", "arch": {}}))
    recipe = load_recipe(tiny_recipe(teacher={"run": str(lm_run)}, method={"name": "kd"}))
    with pytest.raises(RunDirError, match=r"teacher\.run: .*lm-run is a language-model run") as info:
        run(recipe, tmp_path / "out", progress=False)
    assert "\n" not in str(info.value)
