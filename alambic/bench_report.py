"""What ``alambic bench`` writes: ``results.csv``, ``results.md``, ``accuracy.png`` and a table per setting.

Everything here is a function of the rows, and the rows are read from the run directories' ``summary.json``
(plus the recorded one-line errors of failed cells), so a report rebuilt from a finished bench directory is
byte-identical to the one written when it ran. Nothing timed at report time enters the files: the wall time
is the training loop's own (``summary.json`` → ``train.wall_time_s``; after an interrupted and resumed cell,
only the resumed part).

Δ vs the baseline is the mean over seeds of the paired difference (method − baseline, same seed, same
split), in accuracy points; its p-value is a paired t-test over those seeds (``scipy.stats.ttest_rel``),
reported with the number of pairs n. With n < 2, or no spread in the differences, there is no p-value.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Protocol

from rich import box
from rich.console import Console
from rich.table import Table

RESULTS_CSV, RESULTS_MD, PLOT = "results.csv", "results.md", "accuracy.png"
SIGNIFICANT = 0.05


class SuiteLike(Protocol):
    """What the report reads of a suite (:class:`alambic.bench.Suite` is one): its name and, in order, the
    names of its settings and methods. A protocol, so that the report never imports the bench that calls it."""

    name: str
    settings: Iterable[str]
    methods: Iterable[str]


@dataclass
class Row:
    """One cell of the grid; the metrics are None unless ``status == "ok"``."""

    setting: str
    method: str
    seed: int
    test_accuracy: float | None
    test_ece: float | None
    params: int | None
    latency_ms: float | None
    wall_time_s: float | None
    status: str  # ok | failed | missing
    error: str | None = None
    processes: int | None = None  # torchrun processes the run trained in (summary.json: train.processes)

    @classmethod
    def from_summary(cls, setting: str, method: str, seed: int, status: str, summary: dict[str, Any] | None,
                     error: str | None) -> "Row":
        if summary is None:
            return cls(setting, method, seed, None, None, None, None, None, status, error)
        return cls(setting, method, seed, summary["test"]["accuracy"], summary["test"].get("ece"),  # probes: no ECE
                   summary["student"]["params"], summary["student"]["latency_ms"],
                   summary["train"]["wall_time_s"], status, error,
                   summary["train"].get("processes", 1))  # summaries before train.processes: one process


@dataclass
class Line:
    """One method in one setting: the statistics a table row shows."""

    method: str
    ok: int
    total: int
    mean: float = math.nan  # accuracy, fraction
    std: float = math.nan
    delta: float | None = None  # points
    p: float | None = None
    n: int = 0
    params: int | None = None
    wall_time_s: float = math.nan


def summarize(rows: list[Row], settings: list[str], methods: list[str], baseline: str | None) -> dict[str, list[Line]]:
    """Per setting, per method: mean ± std over finished seeds, and the paired comparison with ``baseline``."""
    out: dict[str, list[Line]] = {}
    for setting in settings:
        acc = {m: {r.seed: r.test_accuracy for r in rows if r.setting == setting and r.method == m and r.status == "ok"}
               for m in methods}
        lines = []
        for m in methods:
            cells = [r for r in rows if r.setting == setting and r.method == m]
            ok = [r for r in cells if r.status == "ok"]
            line = Line(m, len(ok), len(cells))
            if ok:
                values = list(acc[m].values())
                line.mean = statistics.fmean(values)
                line.std = statistics.stdev(values) if len(values) > 1 else 0.0
                line.params = ok[0].params
                line.wall_time_s = statistics.fmean(r.wall_time_s for r in ok)
            if baseline is not None and m != baseline:
                seeds = [k for k in acc[m] if k in acc[baseline]]
                line.n = len(seeds)
                if seeds:
                    line.delta = statistics.fmean(100 * (acc[m][k] - acc[baseline][k]) for k in seeds)
                line.p = paired_p([acc[m][k] for k in seeds], [acc[baseline][k] for k in seeds])
            lines.append(line)
        out[setting] = lines
    return out


def paired_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of a paired t-test, or None where it is undefined (n < 2, no spread, no scipy)."""
    try:
        from scipy.stats import ttest_rel  # scipy comes with scikit-learn; imported here, as it is slow to import
    except ImportError:
        return None
    if len(a) < 2:
        return None
    p = float(ttest_rel(a, b).pvalue)
    return None if math.isnan(p) else p


def _has_scipy() -> bool:
    import importlib.util

    return importlib.util.find_spec("scipy") is not None


def write_outputs(out: Path, suite: SuiteLike, rows: list[Row], baseline: str | None,
                  teacher: dict[str, Any] | None, console: Console) -> None:
    settings, methods = list(suite.settings), list(suite.methods)
    stats = summarize(rows, settings, methods, baseline)
    write_csv(out / RESULTS_CSV, rows)
    (out / RESULTS_MD).write_text(markdown(suite.name, stats, rows, baseline, teacher))
    plot(out / PLOT, suite.name, stats)
    for setting, lines in stats.items():
        table = Table(title=f"{suite.name} · {setting} · test accuracy % (mean ± std over seeds)",
                      box=box.SIMPLE_HEAD, pad_edge=False)
        cols = _columns(baseline)
        keep = [i for i, col in enumerate(cols) if col != "params"]  # in results.md; 80 columns are few
        for i in keep:
            table.add_column(cols[i], justify="left" if i == 0 else "right", no_wrap=True)
        for line in lines:
            cells = _cells(line, baseline)
            table.add_row(*(cells[i] for i in keep))
        console.print(table)
    failed = [r for r in rows if r.status != "ok"]
    if failed:
        console.print(f"[yellow]{len(failed)} of {len(rows)} cells did not finish[/] (see {out / RESULTS_MD})")
    console.print(f"wrote {out / RESULTS_MD}, {out / RESULTS_CSV}, {out / PLOT}")


def write_csv(path: Path, rows: list[Row]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f.name for f in fields(Row)])
        for row in rows:
            writer.writerow(["" if v is None else v for v in astuple(row)])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _columns(baseline: str | None) -> list[str]:
    versus = [f"Δ vs {baseline}", "p", "n"] if baseline else []
    return ["method", "test acc %", *versus, "params", "s/run", "runs ok"]


def _cells(line: Line, baseline: str | None) -> list[str]:
    acc = "failed" if not line.ok else f"{100 * line.mean:.2f} ± {100 * line.std:.2f}"
    versus = []
    if baseline:
        if line.method == baseline:
            versus = ["baseline", "", ""]
        else:
            delta = "—" if line.delta is None else f"{line.delta:+.2f}"
            p = "—" if line.p is None else ("<0.001" if line.p < 0.001 else f"{line.p:.3g}")
            versus = [delta, p + ("*" if line.p is not None and line.p < SIGNIFICANT else ""), str(line.n)]
    params = "" if line.params is None else f"{line.params:,}"
    wall = "" if not line.ok else f"{line.wall_time_s:.2f}"
    return [line.method, acc, *versus, params, wall, f"{line.ok}/{line.total}"]


def markdown(name: str, stats: dict[str, list[Line]], rows: list[Row], baseline: str | None,
             teacher: dict[str, Any] | None) -> str:
    lines = [f"# bench: {name}", "",
             "Test accuracy (%) is the mean ± std (sample std) over the seeds whose run finished."]
    if baseline:
        lines.append(f"Δ vs `{baseline}`: mean paired difference, in accuracy points, over the n seeds both ran; "
                     f"p: paired t-test over those seeds{'' if _has_scipy() else ' (scipy missing: no p-values)'}; "
                     f"* marks p < {SIGNIFICANT}.")
    else:
        lines.append("No `ce` baseline in the suite, so no differences are tested.")
    lines.append("s/run: mean wall time of the training loop per run, in seconds.")
    procs = sorted({r.processes for r in rows if r.processes is not None})
    if procs and procs != [1]:
        lines.append(f"Each run trained in {' or '.join(map(str, procs))} processes (torchrun; `train.batch_size` is "
                     "the global batch); s/run is rank 0's.")
    if teacher is not None:
        lines.append(f"Teacher: test accuracy {100 * teacher['test']['accuracy']:.2f} %, "
                     f"{teacher['student']['params']:,} params.")
    cols = _columns(baseline)
    for setting, entries in stats.items():
        lines += ["", f"## {setting}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cells(line, baseline)) + " |" for line in entries]
        bad = [r for r in rows if r.setting == setting and r.status != "ok"]
        if bad:
            lines += ["", "Cells without a result:", ""]
            lines += [f"- `{r.method}` seed {r.seed}: {r.status}: {r.error}" for r in bad]
    return "\n".join(lines) + "\n"


def plot(path: Path, name: str, stats: dict[str, list[Line]]) -> Path:
    """:func:`accuracy_figure`, saved to ``path``; returns ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: see alambic.report.plots

    fig = accuracy_figure(name, stats)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120)
    return path


def accuracy_figure(name: str, stats: dict[str, list[Line]]):
    """One panel per setting, one row per method: mean test accuracy as a dot, ± std as a bar.

    The axis spans the data (every mean ± std, padded), not 0–100 %: methods a point or two apart at
    90 % would be bars of the same length. Hence dots rather than bars (a bar's length would start at
    an arbitrary cut-off), each labelled with its value. Methods are labelled on the axis rather than by
    colour, so the plot stays readable with dozens of methods; the baseline's mean is a dashed line
    across each panel. Returns the :class:`~matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure

    settings = list(stats)
    methods = [line.method for line in next(iter(stats.values()))]
    fig = Figure(figsize=(1.5 + 4.5 * len(settings), 1.4 + 0.3 * len(methods)), layout="constrained")
    axes = fig.subplots(1, len(settings), sharey=True, squeeze=False)[0]
    ys = list(range(len(methods)))[::-1]  # first method on top
    for ax, setting in zip(axes, settings):
        lines = stats[setting]
        done = [(y, line) for y, line in zip(ys, lines) if not math.isnan(line.mean)]
        for y, line in done:
            color = "tab:gray" if line.method == "ce" else "tab:blue"
            ax.errorbar(100 * line.mean, y, xerr=100 * line.std, fmt="o", color=color, capsize=3)
            ax.annotate(f"{100 * line.mean:.2f}", (100 * line.mean, y), textcoords="offset points",
                        xytext=(0, 5), ha="center", fontsize="x-small")
        for y, line in zip(ys, lines):
            if math.isnan(line.mean):
                ax.annotate("failed", (0.02, y), xycoords=("axes fraction", "data"), va="center",
                            fontsize="small", color="tab:red")
        lo, hi = _span([100 * (line.mean + sign * line.std) for _, line in done for sign in (-1, 1)])
        ax.set_xlim(lo, hi)
        base = next((line for line in lines if line.method == "ce"), None)
        if base is not None and not math.isnan(base.mean):
            ax.axvline(100 * base.mean, color="black", linestyle="--", linewidth=1)
        ax.set_title(setting)
        ax.set_xlabel("test accuracy (%)")
        ax.set_ylim(-0.7, len(methods) - 0.3)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(ys, methods)
    fig.suptitle(f"{name}: test accuracy, mean ± std over seeds (dashed: ce; axis zoomed to the data)")
    return fig


def _span(values: list[float]) -> tuple[float, float]:
    """An axis range around ``values``: padded by 15 % of their spread, at least 1 point wide, within 0–100."""
    if not values:
        return 0.0, 100.0
    lo, hi = min(values), max(values)
    pad = max(0.15 * (hi - lo), 0.5)
    return max(0.0, lo - pad), min(100.0, hi + pad)
