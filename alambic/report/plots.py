"""The two figures of a run report: learning curves and a reliability diagram.

Each is built by a ``*_figure`` function that returns the :class:`~matplotlib.figure.Figure` (to inspect or
test) and saved by a ``plot_*`` function.

Figures are built with :class:`matplotlib.figure.Figure` and saved through the Agg canvas directly, not
through ``pyplot``: nothing is registered with pyplot's global figure manager (so nothing leaks when a
report is rendered in a loop) and the process-wide backend is left alone (rendering a report inside a
notebook does not switch its backend). This needs no display, like ``matplotlib.use("Agg")``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

from alambic.eval.classification import expected_calibration_error, reliability_bins

__all__ = ["learning_curves_figure", "plot_learning_curves", "plot_reliability", "reliability_figure"]


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")  # atomic: a kill leaves no half PNG
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_learning_curves(metrics: list[dict], path: str | os.PathLike) -> Path:
    """:func:`learning_curves_figure`, saved to ``path``; returns ``path``."""
    return _save(learning_curves_figure(metrics), path)


def learning_curves_figure(metrics: list[dict]) -> Figure:
    """One panel per curve against step: the training loss, each of its terms, the validation accuracy.

    Terms live on scales of their own (a KD term times T² next to a CE near 0.1; a feature loss in the
    hundreds), so each gets its own panel and y-axis: drawn on one axis, the small ones are a flat line.
    ``metrics`` are the records of ``metrics.jsonl``: ``split == "train"`` records carry ``step``, ``loss``
    and optionally ``terms`` (name -> value); ``split == "val"`` records carry ``step`` and ``accuracy``.
    Other records are ignored.
    """
    train = sorted((r for r in metrics if r.get("split") == "train"), key=lambda r: r["step"])
    val = sorted((r for r in metrics if r.get("split") == "val" and "accuracy" in r), key=lambda r: r["step"])
    term_names = sorted({name for r in train for name in (r.get("terms") or {})})
    panels = 2 + len(term_names)
    cols = min(panels, 3)
    rows = -(-panels // cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    ax_loss, ax_val, term_axes = axes[0], axes[panels - 1], axes[1:panels - 1]
    for ax in axes[panels:]:
        ax.set_visible(False)

    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="black", linewidth=2)
    else:
        _empty(ax_loss, "no training records")
    _label(ax_loss, "loss", "training loss (total)")
    for ax, name, color in zip(term_axes, term_names, _COLORS):
        points = [(r["step"], r["terms"][name]) for r in train if name in (r.get("terms") or {})]
        ax.plot(*zip(*points), color=color, linewidth=1.5)
        _label(ax, name, f"loss term: {name}")

    if val:
        ax_val.plot([r["step"] for r in val], [r["accuracy"] for r in val], marker="o", color="tab:green")
    else:
        _empty(ax_val, "no validation records")
    _label(ax_val, "accuracy", "validation accuracy")
    return fig


_COLORS = ["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 4


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _label(ax, ylabel: str, title: str) -> None:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def plot_reliability(
    logits_NC: Tensor,
    target_N: Tensor,
    path: str | os.PathLike,
    n_bins: int = 15,
    teacher_logits_NC: Tensor | None = None,
) -> Path:
    """:func:`reliability_figure`, saved to ``path``; returns ``path``."""
    return _save(reliability_figure(logits_NC, target_N, n_bins, teacher_logits_NC), path)


def reliability_figure(
    logits_NC: Tensor,
    target_N: Tensor,
    n_bins: int = 15,
    teacher_logits_NC: Tensor | None = None,
) -> Figure:
    """Reliability diagram (Guo et al., 2017, arXiv:1706.04599, Fig. 1): accuracy per confidence bin as bars,
    the diagonal of perfect calibration, and the ECE in the title. With ``teacher_logits_NC`` the teacher's
    per-bin accuracy is overlaid as a step outline. Empty bins have no bar.

    Below it, the number of test samples in each bin (the paper's confidence histogram): a bin of three
    samples says little, and most samples usually sit in the last bins.
    """
    bins = reliability_bins(logits_NC, target_N, n_bins)
    ece = expected_calibration_error(logits_NC, target_N, n_bins)
    width = 1.0 / n_bins
    centers = [lo + width / 2 for lo in bins["lower"]]

    fig = Figure(figsize=(5, 6.5), layout="constrained")
    ax, ax_count = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    filled = [i for i, c in enumerate(bins["count"]) if c]
    ax.bar(
        [centers[i] for i in filled],
        [bins["accuracy"][i] for i in filled],
        width=width,
        edgecolor="black",
        color="tab:blue",
        alpha=0.8,
        label="student accuracy",
    )
    ax.scatter(
        [bins["confidence"][i] for i in filled],
        [bins["confidence"][i] for i in filled],
        marker="_",
        color="tab:red",
        s=60,
        zorder=3,
        label="mean confidence",
    )
    title = f"student ECE = {ece:.4f}"
    if teacher_logits_NC is not None:
        t_bins = reliability_bins(teacher_logits_NC, target_N, n_bins)
        t_ece = expected_calibration_error(teacher_logits_NC, target_N, n_bins)
        # a bar outline: the step plot goes through both edges of each non-empty bin
        xs, ys = [], []
        for lo, hi, acc in zip(t_bins["lower"], t_bins["upper"], t_bins["accuracy"]):
            xs += [lo, hi]
            ys += [acc, acc] if not math.isnan(acc) else [math.nan, math.nan]
        ax.plot(xs, ys, color="tab:orange", linewidth=2, label="teacher accuracy")
        title += f", teacher ECE = {t_ece:.4f}"
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability diagram, {n_bins} bins\n{title}", fontsize="medium")
    ax.legend(loc="upper left", fontsize="small")
    counts = ax_count.bar(centers, bins["count"], width=width, edgecolor="black", color="tab:gray")
    ax_count.bar_label(counts, labels=[str(c) if c else "" for c in bins["count"]], fontsize="x-small")
    ax_count.set_ylim(0, 1.25 * max(max(bins["count"]), 1))  # room for the labels
    ax_count.set_ylabel("samples")
    ax_count.set_xlabel("confidence (max softmax probability)")
    return fig
