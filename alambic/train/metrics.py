"""``metrics.jsonl``: one JSON object per line, appended as training goes, trimmed on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alambic.train.state import atomic_write_text


class MetricsLog:
    def __init__(self, path: Path | None):
        self.path = path

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after optimizer step ``step`` (they are redone by a resumed run)."""
        if self.path is None or not self.path.exists():
            return
        keep = [line for line in read_metrics(self.path) if line.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))  # a kill keeps the old lines


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut by a kill: everything after it is unreliable
    return out
