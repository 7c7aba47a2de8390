"""Where alambic keeps what it can rebuild: ``$ALAMBIC_CACHE`` or ``~/.cache/alambic``, one folder per kind.

Permissions: the cache is shared by every run of a user (and readable by others, so a group can share
rendered data), but never writable by anyone else, whatever the umask: another local user who could write
``teachers/`` could poison the teacher outputs every later run trains on. Folders alambic creates here get
``(0o777 & ~umask) & ~0o022`` (0755 under umask 000 or 022, 0700 under 077) and files are written
without group or world write permission (:func:`not_writable_by_others`). Folders that already exist are
left as their owner set them.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

KINDS = ("glyphs", "probes", "teachers")


def cache_dir(kind: str, create: bool = False) -> Path:
    """``<root>/<kind>``: ``glyphs`` (rendered datasets), ``probes`` (pixel baselines), ``teachers`` (cached
    teacher outputs). Setting ``ALAMBIC_CACHE`` moves every kind at once. With ``create`` the folder and any
    missing parent are made by :func:`make_dirs` (never group- or world-writable)."""
    path = Path(os.environ.get("ALAMBIC_CACHE") or Path.home() / ".cache" / "alambic") / kind
    return make_dirs(path) if create else path


def make_dirs(path: str | os.PathLike) -> Path:
    """Create ``path`` and its missing parents, each ``(0o777 & ~umask) & ~0o022``: never writable by the
    group or others, whatever the umask (``mkdir`` with mode 0o755 applies the umask atomically; the chmod
    after it undoes a default ACL that would add write bits). Existing folders are not touched."""
    path = Path(path)
    missing = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for p in reversed(missing):
        try:
            p.mkdir(mode=0o755)
        except FileExistsError:  # another process made it meanwhile: its mode is its maker's business
            continue
        not_writable_by_others(p)
    return path


def not_writable_by_others(path: str | os.PathLike) -> None:
    """Clear the group and world write bits of ``path`` (a file or folder alambic just created)."""
    mode = os.stat(path).st_mode & 0o7777
    if mode & 0o022:
        os.chmod(path, mode & ~0o022)


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
