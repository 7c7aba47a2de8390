"""One registry mechanism for methods, models and datasets.

Each entry has a name, the object that builds it, an optional pydantic ``Config`` class holding its own
options (validated strictly, with the key path in every error), a one-line description and, for methods,
the paper it implements. Registering a name twice is an error, so a plug-in cannot silently shadow a
built-in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class NoOptions(BaseModel):
    """Config of an entry that takes no options: any key is unknown."""

    model_config = ConfigDict(extra="forbid")


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
            doc = description or _first_line(getattr(obj, "__doc__", "") or "")
            self._entries[name] = Entry(name, obj, cfg, doc, paper or getattr(obj, "paper", ""), extra)
            return obj

        return add

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} '{name}' (known: {', '.join(sorted(self._entries))})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self) -> list[str]:
        return sorted(self._entries)


def _first_line(doc: str) -> str:
    return doc.strip().splitlines()[0].strip() if doc.strip() else ""


METHODS: Registry[Any] = Registry("method")
MODELS: Registry[Any] = Registry("model")
DATASETS: Registry[Any] = Registry("dataset")
