"""The recipe's ``data: {name: text, ...}`` section: read, tokenise and split a text source into loaders.

The dataset ``text`` is registered with ``modality="text"``: only a text method (``token_kd``) may use it,
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

from pydantic import BaseModel, ConfigDict, Field

from alambic.data.text import (
    TextDataError, TextExample, TextLoader, TokenizedExample, chat_example, pad_id, read_chat_jsonl,
    read_plain_text, read_prompt_completion_jsonl, split_indices, tokenize_example,
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
    max_length: int = Field(256, ge=2, description="tokens per example at most (the prompt loses its start "
                                                   "first, then the completion its end)")
    max_examples: int | None = Field(None, ge=1, description="use only the first N examples of the source")


@DATASETS.register("text", config=TextDataConfig, modality="text",
                   description="a text corpus, prompt/completion or chat JSONL, tokenised by the teacher's tokenizer")
def read_examples(cfg: TextDataConfig, tokenizer: Any) -> list[TextExample]:
    """The examples of the source, in file order (their position is their sample id)."""
    if cfg.format == "plain":
        examples = read_plain_text(cfg.path, cfg.unit, cfg.min_chars)
    elif cfg.format == "prompt_completion":
        examples = read_prompt_completion_jsonl(cfg.path, cfg.prompt_key, cfg.completion_key)
    else:
        examples = [chat_example(tokenizer, m) for m in read_chat_jsonl(cfg.path)]
    return examples[: cfg.max_examples] if cfg.max_examples else examples


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
    cfg: TextDataConfig = spec.options
    texts = read_examples(cfg, tokenizer)
    examples = [tokenize_example(tokenizer, e, cfg.max_length) for e in texts]
    try:
        ids = split_indices(len(examples), spec.val_fraction, spec.test_fraction, spec.split_seed)
    except ValueError as exc:
        raise TextDataError(f"data: {exc}") from None
    splits = {k: v.tolist() for k, v in ids.items()}
    h = hashlib.sha256(f"{sorted(splits.items())}".encode())
    for e in examples:
        h.update(f"{e.completion_start}:{','.join(map(str, e.ids))};".encode())
    return TextData(examples, texts, splits, pad_id(tokenizer), h.hexdigest()[:16])
