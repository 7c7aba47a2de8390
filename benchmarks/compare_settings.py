"""Compare one setting of a finished bench with a setting of another (or the same) bench, method by method.

`alambic bench` tests every method against the suite's baseline within a setting. An ablation often asks
another question: does a change of setting (here, composed batches instead of uniform ones) move a given
method? This script pairs the cells of two settings by method and seed and prints, per method, both means
and the paired difference B - A in accuracy points with its paired t-test (the same test as the bench's).

    python benchmarks/compare_settings.py runs/bench/glyphs-long:scarce \\
        runs/bench/glyphs-scarce-batches:composed8 runs/bench/glyphs-scarce-batches:composed32

The first argument is the reference A; every further one is compared with it. Only methods and seeds
present (and finished) in both are compared. Output is a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from alambic.bench_report import RESULTS_CSV, paired_p, read_csv


def load(spec: str) -> tuple[str, dict[str, dict[int, float]]]:
    """``BENCH_DIR:SETTING`` -> (label, {method: {seed: test accuracy}}) of its finished cells."""
    directory, _, setting = spec.rpartition(":")
    if not directory or not setting:
        sys.exit(f"error: want BENCH_DIR:SETTING, got {spec!r}")
    path = Path(directory) / RESULTS_CSV
    if not path.is_file():
        sys.exit(f"error: {path} not found (run `alambic bench ... --report-only` on {directory} first)")
    cells: dict[str, dict[int, float]] = {}
    for row in read_csv(path):
        if row["setting"] == setting and row["status"] == "ok" and row["test_accuracy"]:
            cells.setdefault(row["method"], {})[int(row["seed"])] = float(row["test_accuracy"])
    if not cells:
        sys.exit(f"error: no finished cell of setting {setting!r} in {path}")
    return f"{Path(directory).name}:{setting}", cells


def mean_std(values: list[float]) -> str:
    values = [100 * v for v in values]
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{spread}"


def compare(ref: tuple[str, dict], other: tuple[str, dict]) -> list[str]:
    (a_name, a), (b_name, b) = ref, other
    lines = [f"| method | {a_name} | {b_name} | Δ (B − A) | p (paired t) | n |", "|---|---|---|---|---|---|"]
    for method in b:
        if method not in a:
            continue
        seeds = sorted(set(a[method]) & set(b[method]))
        if not seeds:
            continue
        xa, xb = [a[method][s] for s in seeds], [b[method][s] for s in seeds]
        delta = statistics.fmean(100 * (y - x) for x, y in zip(xa, xb))
        p = paired_p(xb, xa)
        p_text = "—" if p is None else f"{p:.3g}{'*' if p < 0.05 else ''}"
        lines.append(f"| {method} | {mean_std(xa)} | {mean_std(xb)} | {delta:+.2f} | {p_text} | {len(seeds)} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference", help="BENCH_DIR:SETTING, the A of every comparison")
    ap.add_argument("others", nargs="+", help="BENCH_DIR:SETTING, each compared with the reference")
    args = ap.parse_args(argv)
    ref = load(args.reference)
    for spec in args.others:
        print("\n".join(compare(ref, load(spec))) + "\n")


if __name__ == "__main__":
    main()
