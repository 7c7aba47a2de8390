"""Offline corpora: the KJV (Debian's bible-kjv, or the embedded Proverbs + Ecclesiastes) and Debian's fortunes,
in a fixed order, with one-line errors that name the package to install."""

from __future__ import annotations

import shutil

import pytest

from alambic.data.corpora import (
    EMBEDDED_KJV, FORTUNES_DIR, Verse, fortune_categories, kjv_verses, load_fortunes, load_kjv,
    parse_bible_output, read_fortune_file,
)
from alambic.data.text import TextDataError, TextExample

needs_bible = pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv is not installed")
needs_fortunes = pytest.mark.skipif(not (FORTUNES_DIR / "love.dat").exists(),
                                    reason="Debian's fortunes is not installed")


def ref(v: Verse) -> tuple[str, int, int]:
    return v.book, v.chapter, v.verse


# -- the KJV -----------------------------------------------------------------------------------------------


def test_the_embedded_slice_is_proverbs_then_ecclesiastes_verse_by_verse():
    verses = kjv_verses("embedded")
    assert len(verses) == 915 + 222
    assert verses[0] == Verse("Proverbs", 1, 1, "The proverbs of Solomon the son of David, king of Israel;")
    assert ref(verses[914]) == ("Proverbs", 31, 31) and ref(verses[915]) == ("Ecclesiastes", 1, 1)
    assert verses[-1].text.startswith("For God shall bring every work into judgment")
    # canonical order, each chapter's verses numbered 1, 2, ... with no gap
    for a, b in zip(verses, verses[1:]):
        assert (b.book, b.chapter, b.verse) in {(a.book, a.chapter, a.verse + 1), (a.book, a.chapter + 1, 1),
                                                ("Ecclesiastes", 1, 1)}
    assert EMBEDDED_KJV.stat().st_size < 200_000


def test_kjv_examples_by_verse_chapter_and_book_are_plain_text_in_order():
    verses = load_kjv(source="embedded")
    assert verses[1] == TextExample("", "To know wisdom and instruction; to perceive the words of understanding;")
    assert verses == load_kjv(source="embedded")  # stable: positions are sample ids
    chapters = load_kjv(unit="chapter", source="embedded")
    assert len(chapters) == 31 + 12
    assert chapters[0].completion.startswith("The proverbs of Solomon the son of David, king of Israel; To know ")
    assert sum(len(c.completion) for c in chapters) == sum(len(v.completion) + 1 for v in verses) - len(chapters)
    ecc = load_kjv(books=["ECCLESIASTES"], source="embedded")
    assert len(ecc) == 222 and ecc[0].completion == "The words of the Preacher, the son of David, king in Jerusalem."
    with pytest.raises(TextDataError, match="no book named 'genesis'.*books: Proverbs, Ecclesiastes"):
        load_kjv(books=["Genesis"], source="embedded")
    with pytest.raises(ValueError, match="unit"):
        load_kjv(unit="word", source="embedded")


def test_the_bible_programs_output_parses_and_a_stray_line_is_named():
    text = "\nSong of Solomon 2\n\n  1 I am the rose of Sharon.\n  10 My beloved spake.\n\n1 John 3\n\n  1 Behold."
    assert parse_bible_output(text) == [Verse("Song of Solomon", 2, 1, "I am the rose of Sharon."),
                                        Verse("Song of Solomon", 2, 10, "My beloved spake."),
                                        Verse("1 John", 3, 1, "Behold.")]
    with pytest.raises(TextDataError, match="x.txt:2: a verse before"):
        parse_bible_output("\n  1 Orphan verse", "x.txt")
    with pytest.raises(TextDataError, match="x.txt:3: neither"):
        parse_bible_output("Genesis 1\n  1 In the beginning\nwrapped continuation", "x.txt")


def test_without_the_bible_program_the_error_names_the_debian_package():
    with pytest.raises(TextDataError, match="apt-get install bible-kjv") as info:
        kjv_verses(program="no-such-bible-program")
    assert "\n" not in str(info.value)


@needs_bible
def test_the_whole_kjv_from_debian_has_every_verse_in_canonical_order():
    verses = kjv_verses()
    assert len(verses) == 31_102
    books = list(dict.fromkeys(v.book for v in verses))
    assert len(books) == 66 and books[:2] == ["Genesis", "Exodus"] and books[-1] == "Revelation"
    assert verses[0] == Verse("Genesis", 1, 1, "In the beginning God created the heaven and the earth.")
    assert ref(verses[-1]) == ("Revelation", 22, 21)
    assert max(len(v.text) for v in verses) > 400  # long verses arrive whole, not wrapped at 80 columns
    embedded = kjv_verses("embedded")
    assert [v for v in verses if v.book in ("Proverbs", "Ecclesiastes")] == embedded
    assert len(load_kjv(unit="chapter")) == 1_189


# -- fortunes ---------------------------------------------------------------------------------------------


@pytest.fixture
def fortune_dir(tmp_path):
    (tmp_path / "pets").write_text("A dog.\n%\nTwo\nlines.\n%\n%\nA _\bb_\bo_\bl_\bd cat, ___\b\b\bYES\bS.\n%\n")
    (tmp_path / "pets.dat").write_bytes(b"")
    (tmp_path / "art").write_text("Art is long.\n%\n")
    (tmp_path / "art.dat").write_bytes(b"")
    (tmp_path / "art.u8").symlink_to(tmp_path / "art")
    (tmp_path / "notes").write_text("no .dat index: not a category\n")
    return tmp_path


def test_fortune_files_split_on_percent_lines_and_lose_their_overstriking(fortune_dir):
    assert read_fortune_file(fortune_dir / "pets") == ["A dog.", "Two\nlines.", "A bold cat, YES."]
    assert fortune_categories(fortune_dir) == ["art", "pets"]


def test_fortunes_come_in_category_order_with_an_optional_category_prompt(fortune_dir):
    assert [e.completion for e in load_fortunes(directory=fortune_dir)] == [
        "Art is long.", "A dog.", "Two\nlines.", "A bold cat, YES."]
    pets = load_fortunes(["pets"], prompt="About {category}: ", directory=fortune_dir)
    assert pets[0] == TextExample("About pets: ", "A dog.") and len(pets) == 3
    with pytest.raises(TextDataError, match="no category 'cars'.*installed: art, pets"):
        load_fortunes(["cars", "pets"], directory=fortune_dir)


def test_without_fortunes_the_error_names_the_debian_package(tmp_path):
    with pytest.raises(TextDataError, match="apt-get install fortunes"):
        load_fortunes(directory=tmp_path / "absent")
    with pytest.raises(TextDataError, match="apt-get install fortunes"):
        load_fortunes(directory=tmp_path)


@needs_fortunes
def test_debians_fortunes_are_thousands_of_clean_entries_in_dozens_of_categories():
    categories = fortune_categories()
    assert len(categories) > 30 and {"love", "science", "wisdom"} <= set(categories)
    entries = load_fortunes()
    assert len(entries) > 10_000
    assert not any("\x08" in e.completion or "\n%\n" in f"\n{e.completion}\n" for e in entries)
    assert entries == load_fortunes()
    love = load_fortunes(["love"])
    assert 0 < len(love) < len(entries) and love[0] in entries
