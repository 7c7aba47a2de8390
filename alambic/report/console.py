"""What a finished run prints on the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def print_summary(summary: dict[str, Any], run_dir: Path, console: Console | None = None) -> None:
    console = console or Console()
    if summary.get("kind") == "representation":
        return _print_representation(summary, run_dir, console)
    if summary.get("kind") == "language":
        return _print_language(summary, run_dir, console)
    table = Table(title=f"{summary['name']} · method {summary['method']} · seed {summary['seed']}")
    for col in ("model", "test acc", "ECE", "agreement", "params", "latency ms/sample"):
        table.add_column(col, justify="right" if col != "model" else "left")
    s, t = summary["student"], summary.get("teacher")
    table.add_row("student", f"{summary['test']['accuracy']:.4f}", f"{summary['test']['ece']:.4f}",
                  _fmt(summary["test"].get("agreement")), f"{s['params']:,}", f"{s['latency_ms']:.4f}")
    if t:
        table.add_row("teacher", f"{t['test']['accuracy']:.4f}", f"{t['test']['ece']:.4f}", "",
                      _fmt(t.get("params"), "{:,}"), _fmt(t.get("latency_ms")))
    console.print(table)
    _print_resumed(summary, console)
    console.print(f"run directory: {run_dir} (report.md, summary.json, student.safetensors)")


def _print_resumed(summary: dict[str, Any], console: Console) -> None:
    """For a resumed run: its training wall time is the whole run's, every attempt's, not the last one's."""
    train = summary.get("train") or {}
    if train.get("resumed_from_step") is None:
        return
    covers = train.get("wall_time_covers") or "whole run"
    console.print(f"resumed at step {train['resumed_from_step']}: the training wall time, "
                  f"{_fmt(train.get('wall_time_s'), '{:.1f}')} s, covers the {covers}")


def _fmt(value: Any, spec: str = "{:.4f}") -> str:
    return "" if value is None else spec.format(value)


def _print_representation(summary: dict[str, Any], run_dir: Path, console: Console) -> None:
    table = Table(title=f"{summary['name']} · method {summary['method']} · seed {summary['seed']} · probes "
                        f"of `{summary.get('feature')}`")
    for col in ("model", "kNN test", "linear test", "feature std", "params"):
        table.add_column(col, justify="right" if col != "model" else "left")
    rows = [("student", summary.get("probe") or {}, summary["student"].get("params"))]
    if summary.get("teacher"):
        t = summary["teacher"]
        rows.append(("EMA teacher" if t.get("kind") == "ema" else "teacher", t.get("probe") or {}, t.get("params")))
    for name, p, params in rows:
        table.add_row(name, _fmt(p.get("knn_test")), _fmt(p.get("linear_test")), _fmt(p.get("feature_std")),
                      _fmt(params, "{:,}"))
    console.print(table)
    for w in summary.get("warnings") or []:
        console.print(f"[yellow]warning:[/yellow] {w}")
    _print_resumed(summary, console)
    console.print(f"run directory: {run_dir} (report.md, summary.json, student.safetensors); "
                  f"baselines: alambic probe {run_dir} --baselines")


def _print_language(summary: dict[str, Any], run_dir: Path, console: Console) -> None:
    table = Table(title=f"{summary['name']} · method {summary['method']} · seed {summary['seed']}")
    for col in ("model", "test perplexity", "agreement", "forward KL", "params"):
        table.add_column(col, justify="right" if col != "model" else "left")
    test, s, t = summary.get("test") or {}, summary["student"], summary.get("teacher") or {}
    table.add_row("student", _fmt(test.get("perplexity"), "{:.3f}"), _fmt(test.get("agreement")),
                  _fmt(test.get("forward_kl")), f"{s['params']:,}")
    table.add_row("teacher", _fmt((t.get("test") or {}).get("perplexity"), "{:.3f}"), "", "",
                  _fmt(t.get("params"), "{:,}"))
    console.print(table)
    _print_resumed(summary, console)
    console.print(f"run directory: {run_dir} (report.md, summary.json, student/)")
