"""What the training loop shows while it runs: a live bar on a terminal, plain periodic lines elsewhere.

On a terminal, a rich progress bar. Its lines are kept two columns narrower than the terminal: when the
user presses Ctrl-C the terminal echoes ``^C`` at the cursor, the end of the bar; on a full-width bar that
wraps onto a new line, and the bar's last refresh (rich's ``Live.stop``, which erases and repaints only the
line the cursor is on) painted a second copy below the first.

Anywhere else (a CI log, ``| tee``, a file), a live bar is no use: rich renders it once, at the end, cut to
80 columns. :class:`LineProgress` prints whole lines instead, about every tenth of the run and at least
every ``every_s`` seconds, the last step always, and where it stopped if interrupted::

    step 120/400 · epoch 3/10 · loss 0.4321 · 812 samples/s · val acc 0.910 · kNN 0.871

Both (and :class:`NullProgress`, when nothing is shown) take the same calls (``add_task``, ``update``,
used as a context manager), a subset of :class:`rich.progress.Progress`'s, so the loop does not care which
it got.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

#: columns left free at the end of a terminal line, for the ``^C`` the terminal echoes
CTRL_C_ROOM = 2


def training_progress(show: bool, stream: TextIO | None = None, every_s: float = 30.0):
    """The display of a training run: nothing (``show`` False), a bar on a terminal, else lines."""
    if not show:  # quiet runs and every rank but 0: no rich machinery (a lock and a task update) per step
        return NullProgress()
    stream = stream if stream is not None else sys.stdout
    if show and not _is_tty(stream):
        return LineProgress(stream, every_s=every_s)
    console = Console(file=stream) if show else None
    if console is not None:
        console = Console(file=stream, width=max(20, console.width - CTRL_C_ROOM))
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[sps]:,.0f} samples/s"),
        TimeRemainingColumn(), TextColumn("{task.fields[status]}"), console=console, disable=not show,
        transient=False,
    )


def _is_tty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


class NullProgress:
    """Shows nothing: the calls of a progress display, each a no-op."""

    def __enter__(self) -> "NullProgress":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, **fields: Any) -> int:
        return 0

    def update(self, task: int, **fields: Any) -> None:
        return None


class LineProgress:
    """Plain progress lines for a stream that is not a terminal (see the module doc)."""

    def __init__(self, stream: TextIO, every_s: float = 30.0, parts: int = 10):
        self.stream, self.every_s, self.parts = stream, every_s, parts
        self.total, self.completed, self.fields = 0, 0, {}
        self._printed_at = -1  # the step of the last line
        self._next = 0  # the step from which the next tenth is due
        self._last_time = time.monotonic()

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.completed != self._printed_at:
            self._print(" (interrupted)" if issubclass(exc_type, KeyboardInterrupt) else " (stopped)")

    def add_task(self, description: str, total: int, completed: int = 0, **fields: Any) -> int:
        self.total, self.completed = int(total), int(completed)
        self.fields = {"description": description, **fields}
        self._printed_at = self.completed
        self._next = self._due_after(self.completed)
        return 0

    def update(self, task: int, *, advance: int = 0, description: str | None = None, **fields: Any) -> None:
        self.fields.update(fields)
        if description is not None:
            self.fields["description"] = description
        if not advance:
            return
        self.completed += advance
        now = time.monotonic()
        if self.completed >= self._next or self.completed >= self.total or now - self._last_time >= self.every_s:
            self._print()

    def _due_after(self, step: int) -> int:
        chunk = max(1, math.ceil(self.total / self.parts))
        return (step // chunk + 1) * chunk

    def line(self) -> str:
        f = self.fields
        parts = [f"step {self.completed}/{self.total}"]
        if f.get("epoch") is not None and f.get("epochs") is not None:
            parts.append(f"epoch {f['epoch']}/{f['epochs']}")
        if isinstance(f.get("loss"), float) and math.isfinite(f["loss"]):
            parts.append(f"loss {f['loss']:.4f}")
        if f.get("sps"):
            parts.append(f"{f['sps']:,.0f} samples/s")
        if f.get("val_acc") is not None:
            parts.append(f"val acc {f['val_acc']:.3f}")
        elif f.get("val_ppl") is not None:  # a language run's validation
            parts.append(f"val ppl {f['val_ppl']:.3g}")
        if f.get("status"):
            parts.append(str(f["status"]))
        return " · ".join(parts)

    def _print(self, suffix: str = "") -> None:
        print(self.line() + suffix, file=self.stream, flush=True)
        self._printed_at = self.completed
        self._next = self._due_after(self.completed)
        self._last_time = time.monotonic()
