"""One registry mechanism for methods, models and datasets.

Each entry has a name, the object that builds it, an optional pydantic ``Config`` class holding its own
options (validated strictly, with the key path in every error), a one-line description and, for methods,
the paper it implements. Registering a name twice is an error, so a plug-in cannot silently shadow a
built-in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class NoOptions(BaseModel):
    """Config of an entry that takes no options: any key is unknown."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    config: type[BaseModel] = NoOptions
    description: str = ""
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Registry(Generic[T]):
    """A name -> :class:`Entry` map; ``register`` works as a decorator."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self,
        name: str,
        *,
        config: type[BaseModel] | None = None,
        description: str = "",
        paper: str = "",
        **extra: Any,
    ) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            cfg = config if config is not None else getattr(obj, "Config", NoOptions)
            doc = plain_text(description) if description else first_sentence(getattr(obj, "__doc__", "") or "")
            self._entries[name] = Entry(name, obj, cfg, doc, paper or getattr(obj, "paper", ""), extra)
            return obj

        return add

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{str(name)[:80]}' ({self.known(name)})") from None

    def known(self, name: Any = None) -> str:
        """``closest: ...; known: ...``: the names a mistyped ``name`` may have meant, closest first (they come
        before the full list, which a one-line error's length cap may cut once a registry holds dozens of
        names), then every registered name."""
        import difflib

        names = list(self.names())
        close = difflib.get_close_matches(name[:80], names, n=4, cutoff=0.6) if isinstance(name, str) else []
        head = f"closest: {', '.join(close)}; " if close else ""
        return f"{head}known: {', '.join(names)}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)


_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?([^`<]*?)(?:\s*<[^>]*>)?`")  # :func:`x`, :class:`~a.b.C`, :ref:`t <x>`
_LITERAL = re.compile(r"``(.+?)``|`([^`]+)`")
_EMPHASIS = re.compile(r"(?<![\w*])(\*\*?)(?=\S)(.+?)(?<=\S)\1(?![\w*])")
_PLACEHOLDER = "\x00{}\x00"
#: words before a period that does not end a sentence
_ABBREVIATIONS = {"e.g", "i.e", "al", "eq", "eqs", "fig", "figs", "sec", "cf", "vs", "etc", "approx", "resp", "no"}


def _role_text(m: re.Match) -> str:
    text = m.group(1)
    return text.rsplit(".", 1)[-1] if m.group(0).split("`", 1)[1].startswith("~") else text


def _protect(text: str) -> tuple[str, list[str]]:
    """``text`` with its roles and literals replaced by numbered placeholders (their contents are not
    prose: no sentence ends and no emphasis inside them), and those contents."""
    kept: list[str] = []

    def keep(content: str) -> str:
        kept.append(content)
        return _PLACEHOLDER.format(len(kept) - 1)

    text = _ROLE.sub(lambda m: keep(_role_text(m)), text)
    text = _LITERAL.sub(lambda m: keep(m.group(1) if m.group(1) is not None else m.group(2)), text)
    return text, kept


def _restore(text: str, kept: list[str]) -> str:
    text = _EMPHASIS.sub(lambda m: m.group(2), text)
    return re.sub("\x00(\\d+)\x00", lambda m: kept[int(m.group(1))], text)


def plain_text(text: str) -> str:
    """reStructuredText inline markup removed: ``x`` and `x` -> x, :func:`a.b` -> a.b, :class:`~a.B` -> B,
    *x* and **x** -> x; whitespace (line breaks included) collapsed to single spaces."""
    protected, kept = _protect(" ".join(text.split()))
    return _restore(protected, kept)


def first_sentence(doc: str) -> str:
    """The whole first sentence of a docstring (which may span several lines), as plain text.

    The sentence ends at the first period, question or exclamation mark that is followed by a space and
    is not part of an abbreviation (e.g., i.e., et al., Eq.) or of a literal (``a.b``), or else at the end
    of the first paragraph. A one-line summary is therefore never cut mid-sentence."""
    paragraph = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    protected, kept = _protect(" ".join(paragraph.split()))
    for m in re.finditer(r"[.!?](?=\s)", protected):
        word = re.findall(r"[\w.]+$", protected[: m.start()])
        if m.group() == "." and word and word[0].lower().rstrip(".") in _ABBREVIATIONS:
            continue
        protected = protected[: m.end()]
        break
    return _restore(protected, kept)


METHODS: Registry[Any] = Registry("method")
MODELS: Registry[Any] = Registry("model")
DATASETS: Registry[Any] = Registry("dataset")
