"""Where alambic keeps what it can rebuild: ``$ALAMBIC_CACHE`` or ``~/.cache/alambic``, one folder per kind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

KINDS = ("glyphs", "probes", "teachers")


def cache_dir(kind: str) -> Path:
    """``<root>/<kind>`` (not created): ``glyphs`` (rendered datasets), ``probes`` (pixel baselines),
    ``teachers`` (cached teacher outputs). Setting ``ALAMBIC_CACHE`` moves every kind at once."""
    return Path(os.environ.get("ALAMBIC_CACHE") or Path.home() / ".cache" / "alambic") / kind


def cache_usage() -> dict[str, tuple[int, int]]:
    """{kind: (files, bytes)} of every kind's folder (0, 0 where it does not exist)."""
    usage = {}
    for kind in KINDS:
        files = [f for f in cache_dir(kind).rglob("*") if f.is_file()] if cache_dir(kind).is_dir() else []
        usage[kind] = (len(files), sum(f.stat().st_size for f in files))
    return usage


def clear_cache(kinds: tuple[str, ...] | list[str] = KINDS) -> dict[str, tuple[int, int]]:
    """Delete these kinds' folders (everything in them can be rebuilt); returns what they held."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown cache kind(s) {unknown}: choose from {list(KINDS)}")
    held = cache_usage()
    for kind in kinds:
        shutil.rmtree(cache_dir(kind), ignore_errors=True)
    return {k: held[k] for k in kinds}
