"""Where alambic keeps what it can rebuild: ``$ALAMBIC_CACHE`` or ``~/.cache/alambic``, one folder per kind."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(kind: str) -> Path:
    """``<root>/<kind>`` (not created): ``glyphs`` (rendered datasets), ``probes`` (pixel baselines),
    ``teachers`` (cached teacher outputs). Setting ``ALAMBIC_CACHE`` moves every kind at once."""
    return Path(os.environ.get("ALAMBIC_CACHE") or Path.home() / ".cache" / "alambic") / kind
