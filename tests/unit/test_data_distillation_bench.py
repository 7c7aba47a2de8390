"""benchmarks/data_distillation.py's bookkeeping: an invocation over fewer sizes or methods adds its runs to the
results CSV (it used to drop every other row of the same dataset), and the comparison with the random subset."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("data_distillation_bench", ROOT / "benchmarks" / "data_distillation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(set_, ipc, seed, acc, data="mnist5k", protocol="ce"):
    return {"data": data, "set": set_, "ipc": ipc, "distill_seed": 0, "protocol": protocol, "student_seed": seed,
            "accuracy": acc, "set_s": 1.0, "train_s": 2.0, "wall_s": 2.0, "run": f"runs/{set_}-{ipc}-{seed}"}


def test_a_later_invocation_over_other_sizes_keeps_the_earlier_rows(bench, tmp_path):
    first = [_row("random", 1, s, 0.5) for s in range(3)] + [_row("krr_st", 10, s, 0.9, protocol="regress")
                                                             for s in range(3)]
    path = tmp_path / "results.csv"
    bench.write_csv(first, path)
    later = [_row("random", 50, s, 0.9) for s in range(3)] + [_row("random", 1, 0, 0.6)]  # one run redone
    merged = bench.merge_rows(bench.read_csv(path), later)
    bench.write_csv(merged, path)
    back = bench.read_csv(path)
    assert len(back) == 9  # 6 earlier + 3 new sizes; the redone run replaces its old row
    assert sorted((r["set"], r["ipc"], r["student_seed"], r["accuracy"]) for r in back if r["ipc"] == 1) == [
        ("random", 1, "0", 0.6), ("random", 1, "1", 0.5), ("random", 1, "2", 0.5)]
    assert sum(r["set"] == "krr_st" for r in back) == 3
    assert sum(r["ipc"] == 50 for r in back) == 3


def test_references_without_a_size_are_merged_by_their_seed(bench):
    ref = {**_row("whole train", None, 0, 0.97), "distill_seed": None}
    merged = bench.merge_rows([ref, {**ref, "student_seed": 1}], [{**ref, "accuracy": 0.98}])
    assert sorted(r["accuracy"] for r in merged) == [0.97, 0.98]


def test_versus_random_reports_the_difference_and_welch_p(bench):
    cell = bench.versus_random([0.90, 0.91, 0.92], [0.80, 0.81, 0.82])
    assert cell.startswith(" (+10.0, p < 1e-")
    assert bench.versus_random([0.80, 0.83, 0.79], [0.80, 0.81, 0.82]).startswith(" (-0.3, p = 0.")
    assert bench.versus_random([0.9], [0.8, 0.81]) == ""
    assert bench.plot_path(Path("d"), "digits") == Path("d/data-distillation.png")
    assert bench.plot_path(Path("d"), "mnist5k") == Path("d/data-distillation-mnist5k.png")


def test_a_method_run_at_fewer_sizes_is_tabled_and_plotted(bench, tmp_path):
    """KRR-ST ran at 1 and 10 images per class, the others also at 50: the table shows '-' for the missing
    cell and the figure is drawn (the plot used to fail on the empty cell)."""
    rows = [_row(m, ipc, s, 0.5 + 0.01 * s + 0.05 * (m == "dm"), protocol=p) for m in ("random", "dm")
            for ipc in (1, 10, 50)
            for s in range(3) for p in ("ce", "regress")]
    rows += [_row("krr_st", ipc, s, 0.6, protocol="regress") for ipc in (1, 10) for s in range(3)]
    md = bench.table(rows)
    krr = next(line for line in md.splitlines() if line.startswith("| krr_st"))
    assert krr.split(" | ")[3] == "-" and "| 3 |" in krr
    bench.plot(rows, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0
