"""The report of a self-supervised run: what the representation learned, how it got there, and warnings.

Read from the run directory alone, like :mod:`alambic.report.markdown`: ``summary.json`` (``kind:
representation``, the final probes), ``metrics.jsonl`` (training loss and monitors; ``split: probe``
records of the online kNN probes) and, if ``alambic probe --baselines`` ran, ``probe.json`` (raw pixels
and random initialisation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from alambic.report.plots import _empty, _label, _save
from alambic.train.state import atomic_write_text

PROBE_JSON = "probe.json"


def plot_probe_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """Training loss (left), online kNN validation accuracy of student and EMA teacher (middle), and the
    monitors the method reports (right), against the optimizer step."""
    train = sorted((r for r in records if r.get("split") == "train"), key=lambda r: r["step"])
    probes = sorted((r for r in records if r.get("split") == "probe"), key=lambda r: r["step"])
    fig = Figure(figsize=(14, 4), layout="constrained")
    ax_loss, ax_knn, ax_mon = fig.subplots(1, 3)
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="black")
    else:
        _empty(ax_loss, "no training records")
    _label(ax_loss, "loss", "training loss")
    if probes:
        for who, color in (("student", "tab:blue"), ("teacher", "tab:orange")):
            pts = [(r["step"], r[who]["knn_val"]) for r in probes if isinstance(r.get(who), dict)]
            if pts:
                ax_knn.plot(*zip(*pts), marker="o", label=who, color=color)
        ax_knn.legend(loc="best", fontsize="small")
    else:
        _empty(ax_knn, "no online probes")
    _label(ax_knn, "kNN accuracy (val)", "online kNN probe")
    names = sorted({k for r in train for k in (r.get("monitors") or {})})
    for name in names:
        pts = [(r["step"], r["monitors"][name]) for r in train if name in (r.get("monitors") or {})]
        ax_mon.plot(*zip(*pts), label=name)
    if names:
        ax_mon.legend(loc="best", fontsize="small")
    else:
        _empty(ax_mon, "no monitors")
    _label(ax_mon, "value", "collapse monitors")
    return _save(fig, path)


def _pct(v: Any) -> str:
    return "—" if not isinstance(v, (int, float)) else f"{100 * v:.2f}"


def render_representation_report(run_dir: Path, summary: dict[str, Any], records: list[dict[str, Any]]) -> Path:
    curves = plot_probe_curves(records, run_dir / "plots" / "probe_curves.png")
    rows = [("student (final)", summary.get("probe") or {})]
    if summary.get("teacher") and summary["teacher"].get("probe"):
        kind = "EMA teacher (final)" if summary["teacher"].get("kind") == "ema" else "frozen teacher"
        rows.append((kind, summary["teacher"]["probe"]))
    first = next((r for r in records if r.get("split") == "probe" and r.get("step") == 0), None)
    baselines = json.loads((run_dir / PROBE_JSON).read_text()) if (run_dir / PROBE_JSON).is_file() else {}
    for key, label in (("random_init", "same network, random init"), ("pixels", "raw pixels")):
        if key in baselines:
            rows.append((label, baselines[key]))
    table = ["| representation | kNN test % | linear test % | kNN val % | feature std | effective rank |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, p in rows:
        table.append(f"| {label} | {_pct(p.get('knn_test'))} | {_pct(p.get('linear_test'))} | {_pct(p.get('knn_val'))} "
                     f"| {p.get('feature_std', float('nan')):.4f} | {p.get('rank', float('nan')):.1f} |")
    train = summary.get("train") or {}
    lines = [
        f"# {summary['name']}", "",
        "## What was run", "",
        f"- method: `{summary['method']}` (self-supervised: no label reached training)",
        f"- seed: {summary.get('seed')}",
        f"- representation: tap `{summary.get('feature')}` of the student backbone (the projection head is dropped)",
        f"- training: {train.get('steps')} steps, {train.get('epochs')} epochs, {train.get('wall_time_s')} s"
        + (f" for the {train['wall_time_covers']}" if train.get("wall_time_covers") else ""),
        *([f"- views: student {', '.join(train['views']['student'])}; teacher {', '.join(train['views']['teacher'])}"]
          if train.get("views") else []), "",
        "## Probes", "",
        "kNN: cosine, weighted votes exp(sim/T) (Wu et al. 2018, arXiv:1805.01978); linear: logistic regression "
        "on standardised features, C chosen on the validation split. Both fit on the labelled training samples.", "",
        *table, "",
    ]
    if first is not None:
        lines += [f"Online kNN (val) at step 0, the random-initialisation baseline: {_pct(first['student'].get('knn_val'))} %.", ""]
    if not baselines:
        lines += ["Baselines (raw pixels, random init): run `alambic probe RUN_DIR --baselines`.", ""]
    warnings = summary.get("warnings") or []
    lines += ["## Warnings", ""] + ([f"- {w}" for w in warnings] or ["none"]) + [""]
    lines += ["## Training", "", f"![probe curves]({curves.relative_to(run_dir).as_posix()})", ""]
    report = run_dir / "report.md"
    atomic_write_text(report, "\n".join(lines))  # a kill or a full disk leaves no half report
    return report
