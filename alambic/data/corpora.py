"""Offline text corpora: the King James Bible and the fortune cookies of Debian, and an embedded KJV slice.

Each builder returns :class:`~alambic.data.text.TextExample` s in a fixed order (the order of the source), so
an example's position is a stable sample id (the key of a teacher-logit cache):

- :func:`load_kjv`: the King James Version (1611), 31,102 verses in 66 books, in canonical order, one example
  per verse or per chapter. ``source="debian"`` runs the ``bible`` program of Debian's ``bible-kjv`` package
  (its text is a compressed database in ``/usr/lib/bible.data``, from ``bible-kjv-text``: ``apt-get install
  bible-kjv``); ``source="embedded"`` reads Proverbs and Ecclesiastes (1,137 verses) shipped inside alambic
  (``alambic/data/kjv/``, provenance in its README), always available.
- :func:`load_fortunes`: the quotations of Debian's ``fortunes`` package (``/usr/share/games/fortunes``:
  one ``%``-separated file per category, 43 categories, ~15,000 entries), categories in name order and the
  entries of each in file order; the category can open each example as a prompt.

The examples are plain text (empty prompt, every token a target) unless a prompt is asked for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from alambic.data.text import TextDataError, TextExample

EMBEDDED_KJV = Path(__file__).parent / "kjv" / "kjv_proverbs_ecclesiastes.txt"
"""Proverbs and Ecclesiastes, as ``bible -l100000`` prints them."""

FORTUNES_DIR = Path("/usr/share/games/fortunes")

_WHOLE_BIBLE = "gen1:1-rev22:21"
_CHAPTER = re.compile(r"^(\S.*) (\d+)$")
_VERSE = re.compile(r"^\s+(\d+) (.*)$")


@dataclass(frozen=True)
class Verse:
    """One verse of the KJV: ``book`` as the ``bible`` program names it ("Genesis", "1 Samuel", "Song of
    Solomon"), ``chapter`` and ``verse`` numbers, and its text."""

    book: str
    chapter: int
    verse: int
    text: str


def kjv_verses(source: str = "debian", program: str = "bible") -> list[Verse]:
    """Every verse of the KJV in canonical order (``source="debian"``, via the ``bible`` program), or of the
    embedded Proverbs and Ecclesiastes (``source="embedded"``)."""
    if source == "embedded":
        return parse_bible_output(EMBEDDED_KJV.read_text(encoding="utf-8"), str(EMBEDDED_KJV))
    if source != "debian":
        raise ValueError(f"source must be 'debian' or 'embedded', got {source!r}")
    exe = shutil.which(program)
    if exe is None:
        raise TextDataError(f"the King James Bible needs the '{program}' program of Debian's bible-kjv package: "
                            "apt-get install bible-kjv (or use source='embedded')")
    # -l: one line per verse however long (the default wraps at 80 columns).
    done = subprocess.run([exe, "-l100000", _WHOLE_BIBLE], capture_output=True, text=True, encoding="utf-8",
                          stdin=subprocess.DEVNULL, timeout=120)
    verses = parse_bible_output(done.stdout, exe) if done.returncode == 0 else []
    if not verses:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
        raise TextDataError(f"{exe} printed no verse ({why[:200]}): is Debian's bible-kjv-text installed? "
                            "apt-get install bible-kjv bible-kjv-text")
    return verses


def parse_bible_output(text: str, where: str = "<text>") -> list[Verse]:
    """Verses of the ``bible`` program's plain output: ``Book N`` before each chapter, ``  N text`` per verse."""
    verses, book, chapter = [], None, 0
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        if m := _VERSE.match(line):
            if book is None:
                raise TextDataError(f"{where}:{line_no}: a verse before any 'Book chapter' heading")
            verses.append(Verse(book, chapter, int(m[1]), m[2].strip()))
        elif m := _CHAPTER.match(line):
            book, chapter = m[1], int(m[2])
        else:
            raise TextDataError(f"{where}:{line_no}: neither a 'Book chapter' heading nor a verse: {line[:60]!r}")
    return verses


def load_kjv(unit: str = "verse", books: Sequence[str] | None = None, source: str = "debian") -> list[TextExample]:
    """The KJV as plain-text examples in canonical order: one per verse (``unit="verse"``) or one per chapter
    (``unit="chapter"``: its verses joined by spaces), of every book or of ``books`` (names as in
    :class:`Verse`, any case; an unknown name is an error that lists the known ones).

    ``source``: ``"debian"`` (the whole Bible; needs ``apt-get install bible-kjv``) or ``"embedded"``
    (Proverbs and Ecclesiastes, shipped with alambic)."""
    if unit not in ("verse", "chapter"):
        raise ValueError(f"unit must be 'verse' or 'chapter', got {unit!r}")
    verses = kjv_verses(source)
    if books is not None:
        known = list(dict.fromkeys(v.book for v in verses))
        wanted = {b.lower() for b in books}
        unknown = sorted(wanted - {b.lower() for b in known})
        if unknown:
            raise TextDataError(f"kjv ({source}): no book named {', '.join(map(repr, unknown))}; "
                                f"books: {', '.join(known)}")
        verses = [v for v in verses if v.book.lower() in wanted]
    if unit == "verse":
        return [TextExample("", v.text) for v in verses]
    chapters: dict[tuple[str, int], list[str]] = {}
    for v in verses:
        chapters.setdefault((v.book, v.chapter), []).append(v.text)
    return [TextExample("", " ".join(texts)) for texts in chapters.values()]


def fortune_categories(directory: str | Path = FORTUNES_DIR) -> list[str]:
    """The fortune categories installed in ``directory`` (its files that have a ``.dat`` index), sorted."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TextDataError(f"no fortunes in {directory}: apt-get install fortunes (Debian's fortune cookies)")
    names = sorted(p.name for p in directory.iterdir()
                   if p.is_file() and "." not in p.name and (directory / f"{p.name}.dat").exists())
    if not names:
        raise TextDataError(f"no fortune file (with its .dat index) in {directory}: apt-get install fortunes")
    return names


def read_fortune_file(path: str | Path) -> list[str]:
    """The entries of one fortune file: text between lines holding only ``%``, terminal overstriking
    (underlines ``_\\bX``, ``___\\b\\b\\bYES``; bold ``X\\bX``) rendered as a terminal
    shows it, trailing whitespace stripped, empty entries dropped, in file order."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TextDataError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    if "\b" in text:
        text = "\n".join(_unstrike(line) if "\b" in line else line for line in text.split("\n"))
    entries = re.split(r"^%[ \t]*$\n?", text, flags=re.MULTILINE)
    return [e.strip("\n").rstrip() for e in entries if e.strip()]


def _unstrike(line: str) -> str:
    """A line as a printing terminal shows it: a backspace moves back one column and the next character
    lands on that column, a letter winning over an underline (``_\bX``, ``___\b\b\bYES``, ``X\bX``)."""
    cells: list[str] = []
    col = 0
    for ch in line:
        if ch == "\b":
            col = max(col - 1, 0)
            continue
        if col < len(cells):
            if ch != "_":
                cells[col] = ch
        else:
            cells.append(ch)
        col += 1
    return "".join(cells)


def load_fortunes(categories: Sequence[str] | None = None, *, prompt: str = "",
                  directory: str | Path = FORTUNES_DIR) -> list[TextExample]:
    """Fortune-cookie quotations as examples: the categories in name order (all of them by default, or
    ``categories``: an unknown one is an error that lists the installed ones), each file's entries in order.

    ``prompt``: text before each entry that the loss does not cover, with ``{category}`` replaced by the
    entry's category (e.g. ``"A fortune about {category}:\\n"``); the default ``""`` makes every token a
    target."""
    installed = fortune_categories(directory)
    if categories is None:
        chosen = installed
    else:
        unknown = sorted(set(categories) - set(installed))
        if unknown:
            raise TextDataError(f"fortunes: no category {', '.join(map(repr, unknown))} in {directory}; "
                                f"installed: {', '.join(installed)}")
        chosen = sorted(set(categories))
    out = []
    for name in chosen:
        head = prompt.replace("{category}", name)
        out.extend(TextExample(head, entry) for entry in read_fortune_file(Path(directory) / name))
    return out


CORPORA = {"kjv": load_kjv, "fortunes": load_fortunes}
"""The offline corpora by name: ``CORPORA[name](**options)`` gives its examples."""
