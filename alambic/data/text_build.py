"""The recipe's text ``data`` section: read, tokenise and split a text source into loaders.

- ``data: {name: text, path: ...}``: a text file, prompt/completion or chat JSONL;
- ``data: {name: kjv, unit: verse|chapter, books: [...], source: embedded|debian}``: the King James Bible
  (:mod:`alambic.data.corpora`; ``source: embedded``, the default, is Proverbs and Ecclesiastes, always offline);
- ``data: {name: fortunes, categories: [...]}``: Debian's fortune cookies;
- ``data: {name: mix, parts: [{name: kjv, ...}, {name: fortunes, ...}]}``: several of them one after another,
  split together.

These datasets are registered with ``modality="text"``: only a text method (``token_kd``) may use them,
and a text method only it (checked when the recipe is validated, :func:`alambic.recipe.load.validate`).
Reading happens at run time, with the teacher's tokenizer, so a recipe validates before its corpus or
teacher exists (recipes under ``recipes/language/`` name files made by other commands).

Sample ids are the examples' row numbers in the source, the splits are :func:`~alambic.data.text.split_indices`
of ``data.val_fraction``, ``data.test_fraction`` and ``data.split_seed``, and the data fingerprint covers
the token ids of every example and the split: same fingerprint, same training tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from alambic.data import corpora
from alambic.data.text import (
    LabeledExample, TextDataError, TextExample, TextLoader, TokenizedExample, chat_example, pad_id,
    read_chat_jsonl, read_plain_text, read_prompt_completion_jsonl, split_indices, tokenize_example,
)
from alambic.registry import DATASETS


class TextDataConfig(BaseModel):
    """Options of ``data: {name: text}``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    path: Path = Field(description="the text source: a UTF-8 text file (plain) or a JSONL file")
    format: Literal["plain", "prompt_completion", "chat"] = Field(
        "plain", description="plain: every token of a unit is a target; prompt_completion: JSONL rows "
        "{prompt, completion}, the loss on the completion; chat: JSONL rows {messages}, rendered by the "
        "tokenizer's chat template, the loss on the last (assistant) message")
    unit: Literal["paragraph", "line"] = Field("paragraph", description="plain text: one example per paragraph "
                                               "(blank-line separated) or per line")
    min_chars: int = Field(1, ge=1, description="plain text: units shorter than this are dropped")
    prompt_key: str = Field("prompt", description="prompt_completion: the prompt's key")
    completion_key: str = Field("completion", description="prompt_completion: the completion's key")
    label_key: str | None = Field(None, description="prompt_completion: a boolean field every row must have "
                                  "(e.g. correct, which alambic generate --check ... --label writes), read by "
                                  "methods that learn from labelled traces (redi)")
    keep: Literal["all", "correct", "incorrect"] = Field(
        "all", description="with label_key: train on every row, or only the correct (REDI's stage 1, SFT on "
        "positive traces) or the incorrect ones")
    max_length: int = Field(256, ge=2, description="tokens per example at most (the prompt loses its start "
                                                   "first, then the completion its end)")
    max_examples: int | None = Field(None, ge=1, description="use only the first N examples of the source")

    @model_validator(mode="after")
    def _labels(self) -> TextDataConfig:
        if self.label_key is not None and self.format != "prompt_completion":
            raise ValueError(f"label_key: labels are read from prompt_completion JSONL, not format {self.format}")
        if self.keep != "all" and self.label_key is None:
            raise ValueError(f"keep: {self.keep} selects rows by their label: set label_key too (e.g. correct)")
        return self


@DATASETS.register("text", config=TextDataConfig, modality="text",
                   description="a text corpus, prompt/completion or chat JSONL, tokenised by the teacher's tokenizer")
def read_examples(cfg: TextDataConfig, tokenizer: Any) -> list[TextExample]:
    """The examples of the source, in file order (their position is their sample id)."""
    if cfg.format == "plain":
        examples = read_plain_text(cfg.path, cfg.unit, cfg.min_chars)
    elif cfg.format == "prompt_completion":
        examples = read_prompt_completion_jsonl(cfg.path, cfg.prompt_key, cfg.completion_key, cfg.label_key)
        if cfg.keep != "all":  # before the ids are given: sample ids count the rows kept
            examples = [e for e in examples if e.correct == (cfg.keep == "correct")]
            if not examples:
                raise TextDataError(f"{cfg.path}: no row has {cfg.label_key}: {str(cfg.keep == 'correct').lower()} "
                                    f"(data.keep: {cfg.keep})")
    else:
        examples = [chat_example(tokenizer, m) for m in read_chat_jsonl(cfg.path)]
    return examples[: cfg.max_examples] if cfg.max_examples else examples


KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1 Samuel", "2 Samuel",
    "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra", "Nehemiah", "Esther", "Job", "Psalms",
    "Proverbs", "Ecclesiastes", "Song of Solomon", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel",
    "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians", "Galatians",
    "Ephesians", "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians", "1 Timothy", "2 Timothy",
    "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter", "1 John", "2 John", "3 John", "Jude",
    "Revelation")
"""The 66 books as Debian's ``bible`` program names them, in canonical order."""
EMBEDDED_BOOKS = ("Proverbs", "Ecclesiastes")


class _CorpusConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_length: int = Field(256, ge=2, description="tokens per example at most (the end is cut)")
    every: int = Field(1, ge=1, description="keep every N-th example of the corpus, in order (1: all)")
    max_examples: int | None = Field(None, ge=1, description="then use only the first N of them")

    def thin(self, examples: list[TextExample]) -> list[TextExample]:
        examples = examples[:: self.every]
        return examples[: self.max_examples] if self.max_examples else examples


class KjvDataConfig(_CorpusConfig):
    """Options of ``data: {name: kjv}`` (:func:`alambic.data.corpora.load_kjv`)."""

    unit: Literal["verse", "chapter"] = Field("verse", description="one example per verse or per chapter")
    source: Literal["debian", "embedded"] = Field(
        "embedded", description="embedded: Proverbs and Ecclesiastes shipped with alambic (always offline); "
        "debian: the whole Bible via the bible program (apt-get install bible-kjv)")
    books: list[str] | None = Field(None, min_length=1, description="books to use (any case, e.g. Proverbs, "
                                    "'Song of Solomon'); null: every book of the source")

    @field_validator("books")
    @classmethod
    def _known_books(cls, books: list[str] | None, info: ValidationInfo) -> list[str] | None:
        source = info.data.get("source", "embedded")
        known = EMBEDDED_BOOKS if source == "embedded" else KJV_BOOKS
        unknown = [b for b in books or [] if b.lower() not in {k.lower() for k in known}]
        if unknown:
            raise ValueError(f"no book {', '.join(map(repr, unknown))} in the {source} KJV; "
                             f"books: {', '.join(known)}")
        return books


class FortunesDataConfig(_CorpusConfig):
    """Options of ``data: {name: fortunes}`` (:func:`alambic.data.corpora.load_fortunes`)."""

    categories: list[str] | None = Field(None, min_length=1, description="fortune files to use (e.g. wisdom, "
                                         "fortunes); null: every installed one (apt-get install fortunes)")
    prompt: str = Field("", description="text before each entry that the loss does not cover, {category} "
                        "replaced by its category; '': every token a target")

    @field_validator("categories")
    @classmethod
    def _plain_names(cls, v: list[str] | None) -> list[str] | None:
        bad = [c for c in v or [] if not c or "/" in c or c.startswith(".")]
        if bad:
            raise ValueError(f"not a fortune category name: {', '.join(map(repr, bad))}")
        return v


@DATASETS.register("kjv", config=KjvDataConfig, modality="text",
                   description="the King James Bible, one example per verse or chapter (embedded Proverbs and "
                               "Ecclesiastes, or Debian's bible-kjv)")
def read_kjv(cfg: KjvDataConfig, tokenizer: Any) -> list[TextExample]:
    return cfg.thin(corpora.load_kjv(cfg.unit, cfg.books, cfg.source))


@DATASETS.register("fortunes", config=FortunesDataConfig, modality="text",
                   description="Debian's fortune-cookie quotations (apt-get install fortunes), by category")
def read_fortunes(cfg: FortunesDataConfig, tokenizer: Any) -> list[TextExample]:
    return cfg.thin(corpora.load_fortunes(cfg.categories, prompt=cfg.prompt))


class MixDataConfig(BaseModel):
    """Options of ``data: {name: mix}``: several text sources, one after another."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    parts: list[dict[str, Any]] = Field(min_length=1, description="data sections without split fields, e.g. "
                                        "[{name: kjv, books: [Proverbs]}, {name: fortunes, categories: [wisdom]}]")

    @field_validator("parts")
    @classmethod
    def _parts(cls, parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, part in enumerate(parts):
            name = part.get("name")
            if name not in PART_CONFIGS:
                raise ValueError(f"parts.{i}.name: one of {', '.join(PART_CONFIGS)}, got {name!r}")
            try:
                PART_CONFIGS[name].model_validate({k: v for k, v in part.items() if k != "name"})
            except ValidationError as exc:  # its first error as one line
                e = exc.errors()[0]
                loc = ".".join(str(p) for p in e["loc"])
                raise ValueError(f"parts.{i}{'.' + loc if loc else ''}: {e['msg']}") from None
        return parts

    def configs(self) -> list[tuple[str, BaseModel]]:
        return [(p["name"], PART_CONFIGS[p["name"]].model_validate({k: v for k, v in p.items() if k != "name"}))
                for p in self.parts]


@DATASETS.register("mix", config=MixDataConfig, modality="text",
                   description="several text sources (text, kjv, fortunes) one after another, split together")
def read_mix(cfg: MixDataConfig, tokenizer: Any) -> list[TextExample]:
    return [e for name, part in cfg.configs() for e in READERS[name](part, tokenizer)]


PART_CONFIGS: dict[str, type[BaseModel]] = {"text": TextDataConfig, "kjv": KjvDataConfig,
                                            "fortunes": FortunesDataConfig}
READERS = {"text": read_examples, "kjv": read_kjv, "fortunes": read_fortunes}


@dataclass(frozen=True)
class TextData:
    """Tokenised examples and their splits (sample ids), ready for loaders."""

    examples: list[TokenizedExample]
    texts: list[TextExample]
    splits: dict[str, list[int]]  # "train" | "val" | "test" -> sample ids
    pad: int
    fingerprint: str

    def loader(self, split: str, batch_size: int, *, shuffle: bool, seed: int = 0) -> TextLoader:
        ids = self.splits[split]
        return TextLoader([self.examples[i] for i in ids], ids, batch_size, self.pad, shuffle=shuffle, seed=seed)


def build_text_data(spec: Any, tokenizer: Any) -> TextData:
    """The text data a validated ``data`` section describes, tokenised by ``tokenizer``.

    ``spec`` is the recipe's :class:`~alambic.recipe.schema.DataSpec` (common split fields plus the
    :class:`TextDataConfig` options)."""
    cfg = spec.options
    if isinstance(cfg, MixDataConfig):
        texts, lengths = [], []
        for name, part in cfg.configs():
            got = READERS[name](part, tokenizer)
            texts += got
            lengths += [part.max_length] * len(got)
    else:
        texts = (READERS.get(spec.name) or DATASETS.get(spec.name).obj)(cfg, tokenizer)  # tasks: alambic.data.tasks
        lengths = [cfg.max_length] * len(texts)
    examples = [tokenize_example(tokenizer, e, n) for e, n in zip(texts, lengths)]
    try:
        ids = split_indices(len(examples), spec.val_fraction, spec.test_fraction, spec.split_seed)
    except ValueError as exc:
        raise TextDataError(f"data: {exc}") from None
    splits = {k: v.tolist() for k, v in ids.items()}
    h = hashlib.sha256(f"{sorted(splits.items())}".encode())
    for e in examples:
        h.update(f"{e.completion_start}:{','.join(map(str, e.ids))};".encode())
    if any(isinstance(t, LabeledExample) for t in texts):  # labels decide a labelled method's loss (redi)
        h.update("".join("1" if getattr(t, "correct", True) else "0" for t in texts).encode())
    return TextData(examples, texts, splits, pad_id(tokenizer), h.hexdigest()[:16])
