"""Text data for language-model distillation: corpora, tokenisation, the one causal shift, batches.

Three kinds of source, each read into :class:`TextExample` (a prompt and the completion the loss covers):

- a plain-text corpus (:func:`read_plain_text`): one example per paragraph or per line, with an empty
  prompt, so every token is a target (language modelling on the teacher's distribution);
- prompt/completion JSONL (:func:`read_prompt_completion_jsonl`): ``{"prompt": ..., "completion": ...}``;
- chat JSONL (:func:`read_chat_jsonl`): ``{"messages": [{"role": ..., "content": ...}, ...]}``, the last
  message the assistant's answer; the tokenizer's own chat template renders it (:func:`chat_example`).

Every example keeps its row number in the source as its stable sample id (``Batch.index``: the key of a
teacher-logit cache), and :func:`split_indices` draws fixed, seeded train/val/test splits of those ids.

**The causal shift happens once, here.** :func:`tokenize_example` returns the token ids and where the
completion starts; :func:`next_token_targets` turns that into per-position targets ``target[t] =
ids[t + 1]`` for every position whose *next* token is a completion token, ``IGNORE_INDEX`` elsewhere. A
model's logits at position ``t`` are compared with ``target[t]`` directly: no loss shifts again. The last
prompt token therefore predicts the first completion token (the boundary others have got off by one), and
the last token of a sequence predicts nothing.

Prompt and completion are tokenised separately and concatenated, so a merge across the boundary can never
move it. A batch pads on the right with the tokenizer's pad id (its EOS when it has none) and carries the
attention mask in ``extras["attention_mask"]``; the ids are the view ``"tokens"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import Tensor

from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.loader import _EpochLoader
from alambic.errors import AlambicError

TOKENS = "tokens"
"""Name of the token-id view of a text batch."""

ATTENTION_MASK = "attention_mask"


class TextDataError(AlambicError):
    """A text source is missing, malformed or empty; the message names the file and the line."""

    exit_code = 2


@dataclass(frozen=True)
class TextExample:
    """One example: ``prompt`` (context, no loss) and ``completion`` (the tokens the loss covers)."""

    prompt: str
    completion: str


@dataclass(frozen=True)
class LabeledExample(TextExample):
    """A text example with a binary label: ``correct`` says whether the completion is a right answer (a teacher
    trace that passed its answer check, as ``alambic generate --check ... --label`` writes it). REDI trains on
    both kinds, pulling the correct ones up and pushing the incorrect ones down."""

    correct: bool = True


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of prompt + completion and the position of the first completion token."""

    ids: tuple[int, ...]
    completion_start: int


class Tokenizer(Protocol):
    """What alambic needs of a tokenizer: the interface of a ``transformers`` tokenizer."""

    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = ...) -> Any: ...


# -- reading sources ---------------------------------------------------------------------------------------


def read_plain_text(path: str | Path, unit: str = "paragraph", min_chars: int = 1) -> list[TextExample]:
    """Examples of a UTF-8 text file: one per paragraph (blank-line separated) or per line (``unit="line"``).

    Whitespace inside a paragraph is kept as written; units shorter than ``min_chars`` (after stripping) are
    dropped, so sample ids count the kept units in file order.
    """
    if unit not in ("paragraph", "line"):
        raise ValueError(f"unit must be 'paragraph' or 'line', got {unit!r}")
    text = _read_text(Path(path))
    if unit == "line":
        units = text.splitlines()
    else:
        units, current = [], []
        for line in text.splitlines():
            if line.strip():
                current.append(line)
            elif current:
                units.append("\n".join(current))
                current = []
        if current:
            units.append("\n".join(current))
    examples = [TextExample("", u.strip()) for u in units if len(u.strip()) >= min_chars]
    if not examples:
        raise TextDataError(f"{path}: no text unit of at least {min_chars} characters")
    return examples


def read_prompt_completion_jsonl(path: str | Path, prompt_key: str = "prompt", completion_key: str = "completion",
                                 label_key: str | None = None) -> list[TextExample]:
    """Examples of a JSONL file whose rows are ``{prompt_key: str, completion_key: str}``; with ``label_key``
    every row also needs a boolean there, and the examples are :class:`LabeledExample`."""
    out: list[TextExample] = []
    for line_no, row in _jsonl_rows(Path(path)):
        prompt, completion = row.get(prompt_key), row.get(completion_key)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TextDataError(f"{path}:{line_no}: expected string fields '{prompt_key}' and '{completion_key}'")
        if not completion:
            raise TextDataError(f"{path}:{line_no}: empty '{completion_key}' (the loss would cover no token)")
        if label_key is None:
            out.append(TextExample(prompt, completion))
            continue
        label = row.get(label_key)
        if not isinstance(label, bool):
            got = "no such field" if label_key not in row else f"got {json.dumps(label)}"
            raise TextDataError(f"{path}:{line_no}: the label '{label_key}' must be true or false ({got}); "
                                "alambic generate --check ... --label writes it")
        out.append(LabeledExample(prompt, completion, label))
    return out


def read_chat_jsonl(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations of a JSONL file whose rows are ``{"messages": [{"role", "content"}, ...]}``; the last
    message of each must be the assistant's (the completion)."""
    out = []
    for line_no, row in _jsonl_rows(Path(path)):
        messages = row.get("messages")
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                           and isinstance(m.get("content"), str) for m in messages)):
            raise TextDataError(f"{path}:{line_no}: expected 'messages': a list of {{role, content}} strings")
        if messages[-1]["role"] != "assistant":
            raise TextDataError(f"{path}:{line_no}: the last message must be the assistant's, got "
                                f"'{messages[-1]['role']}'")
        out.append(messages)
    return out


def chat_example(tokenizer: Any, messages: Sequence[dict[str, str]]) -> TextExample:
    """A conversation rendered by the tokenizer's chat template: the prompt is every message before the
    last plus the template's generation prompt (``add_generation_prompt=True``); the completion is the rest
    of the rendered conversation (the answer and the template's end-of-turn text)."""
    if not getattr(tokenizer, "chat_template", None):
        raise TextDataError("the tokenizer has no chat template: use prompt/completion JSONL instead")
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise TextDataError("the chat template renders the conversation so that its prompt is not a prefix of "
                            "it; cannot tell where the answer starts")
    return TextExample(prompt, full[len(prompt):])


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise TextDataError(f"text file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TextDataError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    found = False
    for line_no, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TextDataError(f"{path}:{line_no}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise TextDataError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
        found = True
        yield line_no, row
    if not found:
        raise TextDataError(f"{path}: no rows")


# -- tokenisation and the causal shift ---------------------------------------------------------------------


def tokenize_example(tokenizer: Any, example: TextExample, max_length: int, add_bos: bool = True,
                     add_eos: bool = True) -> TokenizedExample:
    """Token ids of ``example`` (prompt then completion, each tokenised on its own) and the completion start.

    BOS (when the tokenizer has one and ``add_bos``) opens the sequence, so with an empty prompt the first
    completion token is predicted too; a prompt whose text already starts with it (a chat template that
    writes BOS, as SmolLM2's writes ``<|im_start|>``) does not get a second one, so the student trains on the
    context a teacher generates from; EOS (``add_eos``) closes the completion, so the student learns to stop.
    Past ``max_length`` the prompt loses tokens from its start (the context nearest the answer is kept) while
    at least one completion token still fits, then the completion is cut at its end.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    prompt = _encode(tokenizer, example.prompt)
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and prompt[:1] != [bos]:  # a chat template may have written BOS already
        prompt = [bos, *prompt]
    completion = _encode(tokenizer, example.completion)
    if add_eos and tokenizer.eos_token_id is not None:
        completion.append(tokenizer.eos_token_id)
    if not completion:
        raise TextDataError(f"an example's completion has no token: {example.completion[:40]!r}")
    if len(prompt) + len(completion) > max_length:
        keep = max(max_length - len(completion), min(len(prompt), 1))  # the prompt keeps at least 1 token
        keep = min(keep, max_length - 1)
        prompt = prompt[len(prompt) - keep:] if keep else []
        completion = completion[: max_length - len(prompt)]
    return TokenizedExample(tuple(prompt + completion), len(prompt))


def _encode(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def next_token_targets(ids: Tensor, completion_start: Tensor, lengths: Tensor) -> Tensor:
    """[B, T] targets of a right-padded batch: ``ids[b, t + 1]`` where that next token is a completion token
    of the sequence (``completion_start[b] <= t + 1 < lengths[b]``), ``IGNORE_INDEX`` elsewhere.

    This is the one causal shift: logits at position ``t`` are scored against ``target[t]`` as they are.
    """
    B, T = ids.shape
    nxt = torch.arange(1, T + 1, device=ids.device).expand(B, T)
    valid = (nxt >= completion_start[:, None]) & (nxt < lengths[:, None])
    shifted = torch.cat([ids[:, 1:], ids.new_full((B, 1), IGNORE_INDEX)], dim=1)
    return torch.where(valid, shifted, torch.full_like(ids, IGNORE_INDEX))


def pad_id(tokenizer: Any) -> int:
    """The id right padding uses: the tokenizer's pad token, else its EOS (masked out either way)."""
    for pid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if pid is not None:
            return int(pid)
    raise TextDataError("the tokenizer has neither a pad nor an EOS token to pad batches with")


def collate(examples: Sequence[TokenizedExample], index: Sequence[int], pad: int) -> Batch:
    """A right-padded :class:`Batch`: view ``"tokens"`` [B, T], ``target`` [B, T] next-token targets on
    completion tokens, ``extras["attention_mask"]`` [B, T] (1 on real tokens)."""
    lengths = torch.tensor([len(e.ids) for e in examples])
    T = int(lengths.max())
    ids = torch.full((len(examples), T), pad, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    starts = torch.tensor([e.completion_start for e in examples])
    target = next_token_targets(ids, starts, lengths)
    return Batch(views={TOKENS: ids}, index=torch.as_tensor(list(index), dtype=torch.long), target=target,
                 extras={ATTENTION_MASK: mask.long()})


# -- splits and the loader --------------------------------------------------------------------------------


def split_indices(n: int, val_fraction: float, test_fraction: float, seed: int) -> dict[str, Tensor]:
    """Fixed, seeded ``train``/``val``/``test`` sample ids (sorted) of ``n`` examples; val and test get at least
    one example each when their fraction is positive."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"need 0 <= fractions and val + test < 1, got {val_fraction} and {test_fraction}")
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    n_test = max(1, round(n * test_fraction)) if test_fraction > 0 else 0
    if n - n_val - n_test < 1:
        raise TextDataError(f"{n} examples cannot make a training split beside {n_val} validation and {n_test} "
                            "test examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return {"test": order[:n_test].sort().values, "val": order[n_test: n_test + n_val].sort().values,
            "train": order[n_test + n_val:].sort().values}


@dataclass(frozen=True)
class TextSplit:
    """The tokenised examples of one split and their stable sample ids (``index``, as a tensor split's)."""

    examples: Sequence[TokenizedExample]
    index: Tensor

    def __len__(self) -> int:
        return len(self.examples)


class TextLoader(_EpochLoader):
    """Batches of tokenised examples in an order that is a pure function of (seed, epoch), as
    :class:`~alambic.data.loader.TensorLoader` (a resumed run sees the same batches)."""

    def __init__(self, examples: Sequence[TokenizedExample], index: Sequence[int] | Tensor, batch_size: int,
                 pad: int, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        if len(examples) != len(index):
            raise ValueError(f"{len(examples)} examples but {len(index)} sample ids")
        super().__init__(len(examples), batch_size, shuffle, seed, drop_last)
        self.examples, self.index, self.pad = list(examples), torch.as_tensor(index, dtype=torch.long), pad
        self.split = TextSplit(self.examples, self.index)  # what the trainer sizes per-sample stores from

    def batch_tokens(self, epoch: int) -> list[tuple[int, int]]:
        """(real tokens, loss tokens) of each batch of ``epoch``, in order, without collating it: what a
        run reports as its training throughput."""
        positions = self._positions(epoch, 0).tolist()
        out = []
        for i in range(0, len(positions), self.batch_size):
            rows = [self.examples[r] for r in positions[i: i + self.batch_size]]
            out.append((sum(len(e.ids) for e in rows),
                        sum(len(e.ids) - max(e.completion_start, 1) for e in rows)))
        return out

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        positions = self._positions(epoch, start)
        for i in range(0, len(positions), self.batch_size):
            rows = positions[i: i + self.batch_size].tolist()
            yield collate([self.examples[r] for r in rows], self.index[rows].tolist(), self.pad)

    def tokens(self) -> int:
        """Tokens in one epoch (padding excluded)."""
        return sum(len(e.ids) for e in self.examples)


def completion_tokens(batch: Batch) -> int:
    """Positions of ``batch`` the loss covers (its non-ignored targets)."""
    return int((batch.target != IGNORE_INDEX).sum())

