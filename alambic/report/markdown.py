"""Render a finished run directory into ``report.md`` plus the PNGs under ``plots/``.

The report is built from the files of the run directory alone (never from objects of the process that
trained), so ``alambic report RUN_DIR`` gives the same report later, on another machine, from a copied
directory. It reads:

- ``summary.json``: name, method, seed, test/val metrics, student and teacher costs, training totals;
- ``metrics.jsonl``: one JSON record per line, ``split`` "train" (step, loss, terms) or "val" (step, accuracy);
- ``predictions.safetensors``: ``test_logits`` [N, C], ``test_target`` [N], optional ``teacher_test_logits``;
- ``recipe.yaml``: only linked (a run without one gets a note instead of a link, not an error).

A missing or malformed file raises :class:`AlambicError` naming the file and, where it applies, the line or
the key.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from alambic.errors import AlambicError
from alambic.report.plots import plot_learning_curves, plot_reliability
from alambic.train.state import atomic_write_text

__all__ = ["load_metrics", "load_predictions", "load_summary", "render_report"]

SUMMARY, METRICS, PREDICTIONS, RECIPE, REPORT = (
    "summary.json",
    "metrics.jsonl",
    "predictions.safetensors",
    "recipe.yaml",
    "report.md",
)
NO_VALUE = "—"


def _require(path: Path) -> None:
    if not path.is_file():
        raise AlambicError(f"report: {path} not found — is this a finished run directory?")


# ---------------------------------------------------------------- reading


def load_summary(path: Path) -> dict[str, Any]:
    """``summary.json`` as a dict; checks the keys the report cannot do without."""
    _require(path)
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlambicError(f"report: {path} is not valid JSON ({e})") from e
    if not isinstance(summary, dict):
        raise AlambicError(f"report: {path} must hold a JSON object, got {type(summary).__name__}")
    for key in ("name", "method"):
        if key not in summary:
            raise AlambicError(f"report: {path} has no '{key}'")
    if not isinstance(summary.get("test"), dict) or not _is_number(summary["test"].get("accuracy")):
        raise AlambicError(f"report: {path} has no numeric 'test.accuracy'")
    for key in ("val", "student", "teacher", "train"):
        if summary.get(key) is not None and not isinstance(summary[key], dict):
            raise AlambicError(f"report: {path}: '{key}' must be an object or null, got {summary[key]!r}")
    teacher = summary.get("teacher")
    if teacher is not None and teacher.get("test") is not None and not isinstance(teacher["test"], dict):
        raise AlambicError(f"report: {path}: 'teacher.test' must be an object, got {teacher['test']!r}")
    return summary


def load_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; blank lines are skipped, anything else must be a JSON object.

    Train records need numeric ``step`` and ``loss``; val records need numeric ``step``.
    """
    _require(path)
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise AlambicError(f"report: {path}:{lineno} is not valid JSON ({e})") from e
            if not isinstance(record, dict):
                raise AlambicError(f"report: {path}:{lineno} must be a JSON object")
            split = record.get("split")
            needed = {"train": ("step", "loss"), "val": ("step",)}.get(split, ())
            for key in needed:
                if not _is_number(record.get(key)):
                    raise AlambicError(f"report: {path}:{lineno}: a '{split}' record needs a numeric '{key}'")
            terms = record.get("terms")
            if split == "train" and terms is not None and (
                not isinstance(terms, dict) or not all(_is_number(v) for v in terms.values())
            ):
                raise AlambicError(f"report: {path}:{lineno}: 'terms' must map names to numbers")
            records.append(record)
    return records


def load_predictions(path: Path) -> dict[str, Tensor]:
    """``predictions.safetensors``, with the shapes checked: test_logits [N, C], test_target [N] and, if
    present, teacher_test_logits [N, C]."""
    _require(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AlambicError(f"report: {path} is not a readable safetensors file ({e})") from e
    for key in ("test_logits", "test_target"):
        if key not in tensors:
            raise AlambicError(f"report: {path} has no tensor '{key}' (it has: {sorted(tensors)})")
    logits, target = tensors["test_logits"], tensors["test_target"]
    if logits.dim() != 2 or logits.shape[0] == 0 or tuple(target.shape) != (logits.shape[0],):
        raise AlambicError(
            f"report: {path}: need test_logits [N, C] with N > 0 and test_target [N], "
            f"got {tuple(logits.shape)} and {tuple(target.shape)}"
        )
    teacher = tensors.get("teacher_test_logits")
    if teacher is not None and teacher.shape != logits.shape:
        raise AlambicError(
            f"report: {path}: teacher_test_logits {tuple(teacher.shape)} does not match "
            f"test_logits {tuple(logits.shape)}"
        )
    return {k: v for k, v in tensors.items() if k in ("test_logits", "test_target", "teacher_test_logits")}


# ---------------------------------------------------------------- formatting


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _fmt(x: Any, kind: str) -> str:
    if not _is_number(x):
        return NO_VALUE
    if kind == "percent":
        return f"{100 * x:.2f} %"
    if kind == "int":
        return f"{int(x):,}"
    if kind == "bytes":
        for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
            if x >= scale:
                return f"{x / scale:.1f} {unit}"
        return f"{int(x)} B"
    if kind == "seconds":
        return f"{x:.1f} s"
    if kind == "ms":
        return f"{x:.4g} ms"
    return f"{x:.4f}"


def _metrics_table(summary: dict[str, Any]) -> list[str]:
    student_test = summary["test"]
    student = summary.get("student") or {}
    teacher = summary.get("teacher")
    columns = [("student", student_test, student)]
    if teacher is not None:
        columns.append(("teacher", teacher.get("test") or {}, teacher))
    rows = [
        ("test accuracy", "test", "accuracy", "percent"),
        ("test ECE (↓)", "test", "ece", "float"),
        ("test NLL (↓)", "test", "nll", "float"),
        ("top-1 agreement with teacher", "test", "agreement", "percent"),
        ("parameters", "model", "params", "int"),
        ("size on disk (safetensors)", "model", "size_bytes", "bytes"),
        ("CPU latency per sample", "model", "latency_ms", "ms"),
    ]
    lines = ["| | " + " | ".join(name for name, _, _ in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, where, key, kind in rows:
        cells = []
        for name, test, model in columns:
            if key == "agreement" and name == "teacher":
                cells.append(NO_VALUE)
                continue
            cells.append(_fmt((test if where == "test" else model).get(key), kind))
        if all(c == NO_VALUE for c in cells) and key == "agreement":
            continue  # no teacher to agree with: leave the row out rather than print a row of dashes
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _validation_line(records: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    val = [r for r in records if r.get("split") == "val" and _is_number(r.get("accuracy"))]
    if not val:
        from_summary = (summary.get("val") or {}).get("accuracy")
        if _is_number(from_summary):
            return f"Final validation accuracy: **{_fmt(from_summary, 'percent')}** (from summary.json)."
        return "No validation records."
    last = max(val, key=lambda r: r["step"])
    best = max(val, key=lambda r: r["accuracy"])
    return (
        f"Final validation accuracy: **{_fmt(last['accuracy'], 'percent')}** at step {last['step']} "
        f"(best {_fmt(best['accuracy'], 'percent')} at step {best['step']})."
    )


# ---------------------------------------------------------------- rendering


def _kind(path: Path) -> str | None:
    """The ``kind`` of a summary (None when it has none or cannot be read: load_summary says why)."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return summary.get("kind") if isinstance(summary, dict) else None


def render_report(run_dir: str | os.PathLike) -> Path:
    """Write ``run_dir/report.md`` and ``run_dir/plots/*.png`` from the run directory's files; returns the
    path of ``report.md``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AlambicError(f"report: {run_dir} is not a directory — is this a finished run directory?")
    if _kind(run_dir / SUMMARY) == "language":  # a language-model run: perplexity, agreement, generations
        from alambic.report.language import render_language_report

        return render_language_report(run_dir)
    summary = load_summary(run_dir / SUMMARY)
    records = load_metrics(run_dir / METRICS)
    if summary.get("kind") == "representation":  # a self-supervised run: probes, not predictions
        from alambic.report.representation import render_representation_report

        return render_representation_report(run_dir, summary, records)
    predictions = load_predictions(run_dir / PREDICTIONS)

    plots = run_dir / "plots"
    curves = plot_learning_curves(records, plots / "learning_curves.png")
    reliability = plot_reliability(
        predictions["test_logits"],
        predictions["test_target"],
        plots / "reliability.png",
        teacher_logits_NC=predictions.get("teacher_test_logits"),
    )

    n, c = predictions["test_logits"].shape
    train = summary.get("train") or {}
    ran = [
        f"- method: `{summary['method']}`",
        f"- seed: {summary.get('seed', NO_VALUE)}",
        f"- teacher: {'yes' if summary.get('teacher') is not None else 'none'}",
        f"- training: {_fmt(train.get('steps'), 'int')} steps, {_fmt(train.get('epochs'), 'int')} epochs, "
        f"{_fmt(train.get('wall_time_s'), 'seconds')} wall time"
        + (f" for the {train['wall_time_covers']}" if train.get("wall_time_covers") else ""),
        f"- test set: {n:,} samples, {c} classes",
    ]
    recipe = (
        f"The resolved recipe of this run is in [{RECIPE}]({RECIPE})."
        if (run_dir / RECIPE).is_file()
        else f"This run directory has no {RECIPE}."
    )
    lines = [
        f"# {summary['name']}",
        "",
        "## What was run",
        "",
        *ran,
        "",
        "## Test results",
        "",
        *_metrics_table(summary),
        "",
        "ECE: expected calibration error (Guo et al., 2017, arXiv:1706.04599, Eq. 3); "
        "agreement: fraction of test samples on which student and teacher predict the same class.",
        "",
        "## Training",
        "",
        _validation_line(records, summary),
        "",
        f"![learning curves]({curves.relative_to(run_dir).as_posix()})",
        "",
        "## Calibration",
        "",
        f"![reliability diagram]({reliability.relative_to(run_dir).as_posix()})",
        "",
        "## Recipe",
        "",
        recipe,
        "",
    ]
    report = run_dir / REPORT
    atomic_write_text(report, "\n".join(lines))  # a kill or a full disk leaves no half report
    return report
