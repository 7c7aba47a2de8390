"""Probes of every run of a finished cross-modal bench, with their baselines, as mean ± std over the seeds.

    python benchmarks/crossmodal_probes.py runs/bench/crossmodal

`alambic bench benchmarks/suites/crossmodal.yaml` reports each run's headline: the classifier's test accuracy
for ``ce``, the linear probe's for the label-free ``ppkt`` and ``slidr``. This puts them on one footing: the
linear and kNN probes of the pooled PointNet feature of every run (``ce``'s too), of the same network at its
seed's random initialisation, and of the raw point coordinates (``alambic probe RUN --baselines`` for each
run; written into each run's probe.json). Prints a markdown table; nothing is timed.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from alambic.probe import probe_run


def mean_std(values: list[float]) -> str:
    pct = [100 * v for v in values]
    sd = statistics.stdev(pct) if len(pct) > 1 else 0.0
    return f"{statistics.mean(pct):.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="a finished bench directory (its runs/<setting>/<method>/seed<k>)")
    args = parser.parse_args()
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    baselines_done: set[tuple[str, str]] = set()  # (setting, seed): the same network and inputs for every method
    for run in sorted(args.bench.glob("runs/*/*/seed*")):
        if not (run / "finished.json").is_file():
            continue
        setting, method, seed = run.parent.parent.name, run.parent.name, run.name
        baselines = (setting, seed) not in baselines_done
        result = probe_run(run, baselines=baselines)
        names = [("student", method)] + ([("random_init", "random init"), ("pixels", "raw points")] if baselines else [])
        baselines_done.add((setting, seed))
        for name, label in names:
            cell = rows.setdefault((label, setting), {"linear_test": [], "knn_test": []})
            for key in cell:
                cell[key].append(result[name][key])
    print("| representation | setting | linear probe test % | kNN test % | runs |")
    print("|---|---|---|---|---|")
    for (label, setting), cell in rows.items():
        print(f"| {label} | {setting} | {mean_std(cell['linear_test'])} | {mean_std(cell['knn_test'])} | "
              f"{len(cell['linear_test'])} |")


if __name__ == "__main__":
    main()
