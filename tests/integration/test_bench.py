"""``alambic bench``: the grid, its files, resuming, report-only, failures and worker processes.

One small suite (digits, 1 epoch; ce, kd and a cell that fails at run time; 2 settings; 2 seeds) is run
once per module; the tests read its directory, rerun it, and rebuild its report.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from scipy.stats import ttest_rel

import alambic.bench
from alambic.bench import bench, cell_data, load_suite
from alambic.bench_report import read_csv
from alambic.cli import main
from alambic.run import run
from alambic.train.loop import Trainer

TRAIN = {"epochs": 1, "batch_size": 64, "lr": 0.01}
SUITE = {
    "name": "t",
    "base": {"data": {"name": "digits"}, "student": {"arch": "mlp", "hidden": [16]}, "train": TRAIN,
             "eval": {"latency_repeats": 2}},
    "teacher": {"data": {"name": "digits"}, "student": {"arch": "mlp", "hidden": [32]},
                "train": {**TRAIN, "epochs": 2}, "eval": {"latency_repeats": 2}},
    "methods": {
        "ce": {"method": {"name": "ce"}},
        "kd": ["method={name: kd, temperature: 2.0}"],
        # validates (a factory path is only imported when the student is built), then fails at run time
        "broken": {"method": {"name": "ce"}, "student": {"module": "math:no_such_factory"}},
    },
    "settings": {"full": {}, "scarce": {"data.labeled_fraction": 0.2}},
    "seeds": 2,
}
CELLS = {(s, m, str(k)) for s in ("full", "scarce") for m in ("ce", "kd", "broken") for k in (0, 1)}
SAME_EVERYWHERE = ("setting", "method", "seed", "test_accuracy", "test_ece", "params", "status", "error")


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "out"
    bench(SUITE, out, progress=False)
    return out


@pytest.fixture
def no_training(monkeypatch):
    def boom(self, resume=False):
        raise AssertionError("training happened")

    monkeypatch.setattr(Trainer, "fit", boom)


def test_one_csv_row_per_cell_read_from_the_run_directories(out):
    rows = read_csv(out / "results.csv")
    assert len(rows) == len(CELLS) and {(r["setting"], r["method"], r["seed"]) for r in rows} == CELLS
    for r in rows:
        run_dir = out / "runs" / r["setting"] / r["method"] / f"seed{r['seed']}"
        if r["method"] == "broken":  # reported, not fatal: the other cells ran
            assert r["status"] == "failed" and r["test_accuracy"] == ""
            assert "math:no_such_factory" in r["error"] and "\n" not in r["error"]
            continue
        summary = json.loads((run_dir / "summary.json").read_text())
        assert r["status"] == "ok" and float(r["test_accuracy"]) == summary["test"]["accuracy"]
        assert float(r["wall_time_s"]) == summary["train"]["wall_time_s"] and int(r["params"]) > 0
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
        assert recipe["seed"] == int(r["seed"])
        assert recipe["data"]["labeled_fraction"] == (0.2 if r["setting"] == "scarce" else 1.0)
        # the suite's teacher (trained once) teaches kd; ce trains alone
        teacher = {"run": str((out / "teacher").resolve()), "cache": "off", "shard": "none"}
        assert recipe.get("teacher") == (teacher if r["method"] == "kd" else None)
    assert json.loads((out / "teacher" / "summary.json").read_text())["train"]["epochs"] == 2
    assert yaml.safe_load((out / "suite.yaml").read_text())["seeds"] == [0, 1]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_matches_a_hand_computation_from_the_csv(out):
    rows = read_csv(out / "results.csv")
    md = (out / "results.md").read_text()
    for setting in ("full", "scarce"):
        section = md.split(f"## {setting}\n")[1].split("\n## ")[0]
        acc = {m: {r["seed"]: float(r["test_accuracy"]) for r in rows
                   if r["setting"] == setting and r["method"] == m} for m in ("ce", "kd")}
        for m, by_seed in acc.items():
            values = list(by_seed.values())
            cell = f"| {m} | {100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f} |"
            assert cell in section, (cell, section)
        delta = statistics.fmean(100 * (acc["kd"][k] - acc["ce"][k]) for k in ("0", "1"))
        p = ttest_rel([acc["kd"][k] for k in "01"], [acc["ce"][k] for k in "01"]).pvalue
        p_text = f"{p:.3g}" + ("*" if p < 0.05 else "")
        assert f"| {delta:+.2f} | {p_text} | 2 |" in section.split("| kd |")[1].split("\n")[0]
        assert "| broken | failed |" in section and "| 0/2 |" in section
        assert "- `broken` seed 1: failed: 'math:no_such_factory'" in section


def test_a_rerun_trains_nothing_and_writes_the_same_report(out, no_training, monkeypatch):
    started = []
    monkeypatch.setattr(alambic.bench, "run", lambda recipe, run_dir, **kw: started.append(Path(run_dir)) or
                        run(recipe, run_dir, **kw))
    before = (out / "results.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("**/summary.json")}
    rows = bench(out, out, progress=False)  # the bench directory itself: its suite.yaml
    assert (out / "results.md").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in out.glob("**/summary.json")} == stamps
    # finished cells (and the teacher) are read, not run again; the failed cells are retried, and fail again
    assert sorted(started) == sorted(out.resolve() / "runs" / s / "broken" / f"seed{k}" for s in ("full", "scarce")
                                     for k in (0, 1))
    assert sum(r.status == "ok" for r in rows) == 8 and all("training happened" not in (r.error or "") for r in rows)


def test_report_only_rebuilds_identical_files_from_the_run_directories(out, no_training, capsys):
    md, csv = (out / "results.md").read_text(), (out / "results.csv").read_text()
    for name in ("results.md", "results.csv", "accuracy.png"):
        (out / name).unlink()
    assert main(["bench", str(out), "--report-only", "--quiet"]) == 0
    assert (out / "results.md").read_text() == md and (out / "results.csv").read_text() == csv
    assert (out / "accuracy.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_a_finished_cell_of_another_recipe_is_reported_never_reused(out, tmp_path, no_training):
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    changed = {**SUITE, "base": {**SUITE["base"], "train": {**TRAIN, "lr": 0.02}}}
    rows = bench(changed, copy, progress=False)
    ok = [r for r in rows if r.method != "broken"]
    assert all(r.status == "failed" and "holds a finished run of another recipe (at train.lr" in r.error for r in ok)


def test_switching_the_teacher_cache_reuses_finished_cells(out, tmp_path, no_training):
    """teacher_cache changes speed, not results: cells finished with the live teacher count as done."""
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    rows = bench({**SUITE, "teacher_cache": "memory"}, copy, progress=False)
    assert sum(r.status == "ok" for r in rows) == 8 and all(r.method == "broken" for r in rows if r.status != "ok")


def test_two_workers_give_the_results_of_one(out, tmp_path):
    # one setting of the suite (the failing cells included); the teacher that the first bench trained,
    # given as a run directory; the cells run in 2 worker processes
    suite = {**SUITE, "settings": {"scarce": SUITE["settings"]["scarce"]}, "teacher": str(out / "teacher"),
             "workers": 2}
    bench(suite, tmp_path / "w2", progress=False)
    one = [r for r in read_csv(out / "results.csv") if r["setting"] == "scarce"]
    two = read_csv(tmp_path / "w2" / "results.csv")
    assert [[r[k] for k in SAME_EVERYWHERE] for r in two] == [[r[k] for k in SAME_EVERYWHERE] for r in one]
    assert len(two) == 6 and {r["status"] for r in two} == {"ok", "failed"}


def test_overrides_merge_replace_and_the_teacher_goes_where_needed(tmp_path):
    suite, _ = load_suite({
        "name": "o", "base": {"method": {"name": "kd", "alpha": 0.3}, "teacher": {"run": "elsewhere"},
                              "data": {"name": "digits", "val_fraction": 0.1}},
        "teacher": {"student": {"arch": "mlp"}},
        "methods": {"kd4": {"method": {"name": "kd", "temperature": 4}}, "ce": {"method": {"name": "ce"}},
                    "ema": ["teacher={ema: {momentum: 0.9}}", "method.alpha=0.5"]},
        "settings": {"few": {"data.labeled_fraction": 0.1}, "data": {"data": {"split_seed": 3}}},
        "seeds": [7]})
    teacher = tmp_path / "teacher"
    kd4, injected = cell_data(suite, "kd4", "few", 7, teacher)
    assert kd4["method"] == {"name": "kd", "alpha": 0.3, "temperature": 4}  # same method: options merge
    assert kd4["teacher"] == {"run": str(teacher)} and injected and kd4["seed"] == 7
    assert kd4["data"] == {"name": "digits", "val_fraction": 0.1, "labeled_fraction": 0.1}
    ce, injected = cell_data(suite, "ce", "data", 7, teacher)
    assert ce["method"] == {"name": "ce"} and "teacher" not in ce and not injected  # another method: replaced
    assert ce["data"] == {"name": "digits", "val_fraction": 0.1, "split_seed": 3}
    ema, injected = cell_data(suite, "ema", "few", 7, teacher)
    assert ema["teacher"] == {"ema": {"momentum": 0.9}} and not injected  # the cell's own teacher wins
    assert ema["method"] == {"name": "kd", "alpha": 0.5}


def _suite_file(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({**SUITE, **changes}))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"seed": 3}, "seed: unknown key"),
    ({"methods": {"ce": {}, "kd": {"method": {"name": "kd", "temperature": -1}}}},
     "methods.kd: method.temperature: must be greater than 0, got -1"),
    ({"settings": {"x": {"train.lr": -1}}}, "every cell: train.lr: must be greater than 0, got -1"),
    ({"methods": {"a/b": {}}}, "methods: label 'a/b' must be a plain name"),
    ({"base": "nope.yaml"}, "base: recipe file not found: "),
    ({"seeds": 0}, "seeds: a count of seeds must be at least 1, got 0"),
])
def test_a_bad_suite_exits_2_naming_the_key_before_anything_trains(tmp_path, capsys, changes, message):
    assert main(["bench", str(_suite_file(tmp_path, **changes)), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}"), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_named_suite_teachers_are_trained_once_and_cells_point_at_them(tmp_path):
    """`teachers: {wide: ...}` is trained into OUT/teachers/wide; `{run: "@wide"}` and "@teacher" resolve to
    the runs; an unknown name fails before anything trains; a second bench trains nothing again."""
    small = {"data": {"name": "digits"}, "student": {"arch": "mlp", "hidden": [8]}, "train": TRAIN,
             "eval": {"latency_repeats": 2}}
    suite = {**SUITE, "teacher": small, "settings": {"full": {}}, "seeds": 1,
             "teachers": {"wide": {**small, "student": {"arch": "mlp", "hidden": [24]}}},
             "methods": {"kd_wide": {"method": {"name": "kd"}, "teacher": {"run": "@wide"}},
                         "pair": {"method": {"name": "multi_teacher"},
                                  "teachers": [{"run": "@teacher"}, {"run": "@wide"}]}}}
    bad = {**suite, "methods": {"x": {"method": {"name": "kd"}, "teacher": {"run": "@nope"}}}}
    with pytest.raises(Exception, match="no suite teacher named 'nope'"):
        bench(bad, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad" / "teacher").exists()
    out = tmp_path / "out"
    rows = bench(suite, out, progress=False)
    assert all(r.status == "ok" for r in rows), rows
    wide, main_teacher = (out / "teachers" / "wide").resolve(), (out / "teacher").resolve()
    kd = yaml.safe_load((out / "runs" / "full" / "kd_wide" / "seed0" / "recipe.yaml").read_text())
    assert kd["teacher"] == {"run": str(wide), "cache": "off", "shard": "none"}
    pair = yaml.safe_load((out / "runs" / "full" / "pair" / "seed0" / "recipe.yaml").read_text())
    assert pair["teachers"] == [{"run": str(main_teacher), "cache": "off", "shard": "none"}, {"run": str(wide), "cache": "off", "shard": "none"}]
    stamp = (wide / "summary.json").stat().st_mtime_ns
    bench(suite, out, progress=False)
    assert (wide / "summary.json").stat().st_mtime_ns == stamp


BENCH_SUITES = [p for p in sorted((Path(__file__).parents[2] / "benchmarks" / "suites").glob("*.yaml"))
                if "methods" in yaml.safe_load(p.read_text())]  # ssl.yaml is benchmarks/self_supervised.py's


@pytest.mark.parametrize("path", BENCH_SUITES, ids=lambda p: p.stem)
def test_every_published_suite_plans_every_cell(path, tmp_path):
    """A typo in a published suite fails here, not an hour into `alambic bench`."""
    from alambic.bench import plan

    suite, _ = load_suite(path)
    p = plan(suite, tmp_path, teacher_ready=False)
    assert len(p.cells) == len(suite.methods) * len(suite.settings) * len(suite.seeds) > 0


def test_compare_settings_pairs_cells_by_method_and_seed(tmp_path, capsys):
    """benchmarks/compare_settings.py: Δ is the mean paired difference over the seeds both settings finished."""
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "compare_settings.py"
    spec = importlib.util.spec_from_file_location("compare_settings", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    header = "setting,method,seed,test_accuracy,test_ece,params,latency_ms,wall_time_s,status,error\n"
    rows = ["a,kd,0,0.50,,,,,ok,", "a,kd,1,0.60,,,,,ok,", "a,kd,2,0.90,,,,,ok,",
            "b,kd,0,0.55,,,,,ok,", "b,kd,1,0.70,,,,,ok,", "b,kd,2,,,,,,failed,boom", "b,ce,0,0.4,,,,,ok,"]
    (tmp_path / "results.csv").write_text(header + "\n".join(rows) + "\n")
    mod.main([f"{tmp_path}:a", f"{tmp_path}:b"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3  # header, rule, kd only: ce has no cell in setting a
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    # seeds 0 and 1 only (seed 2 failed in b): A = 55.00 ± 7.07, B = 62.50 ± 10.61, Δ = (5 + 10) / 2
    assert cells[:4] == ["kd", "55.00 ± 7.07", "62.50 ± 10.61", "+7.50"] and cells[5] == "2"
    with pytest.raises(SystemExit, match="no finished cell of setting 'c'"):
        mod.main([f"{tmp_path}:a", f"{tmp_path}:c"])


def test_suite_teacher_cache_reaches_every_suite_teacher_and_no_other(tmp_path):
    from alambic.bench import plan

    suite = {**SUITE, "teacher_cache": "disk",
             "teachers": {"wide": {**SUITE["teacher"], "student": {"arch": "mlp", "hidden": [48]}}},
             "methods": {"ce": {"method": {"name": "ce"}}, "kd": {"method": {"name": "kd"}},
                         "two": {"method": {"name": "multi_teacher"}, "teachers": [{"run": "@teacher"}, {"run": "@wide"}]},
                         "ema": {"method": {"name": "mean_teacher"}, "teacher": {"ema": {"momentum": 0.9}}}}}
    cells = {c.method: c.recipe for c in plan(load_suite(suite)[0], tmp_path, teacher_ready=False).cells}
    assert cells["ce"].teacher is None
    assert cells["kd"].teacher.cache == "disk"
    assert [t.cache for t in cells["two"].teachers] == ["disk", "disk"]
    assert cells["ema"].teacher.cache == "off"  # a cell's own teacher is left as written
    off = {c.method: c.recipe for c in plan(load_suite({**SUITE})[0], tmp_path, teacher_ready=False).cells}
    assert off["kd"].teacher.cache == "off"


def test_an_unexpected_error_in_a_cell_says_where_it_came_from(tmp_path, monkeypatch):
    from alambic.bench import run_cell

    def boom(*args, **kwargs):
        return {}["features.block1"]

    monkeypatch.setattr(alambic.bench, "run", boom)
    summary, error = run_cell({"name": "x"}, str(tmp_path))
    assert summary is None and "\n" not in error
    assert error.startswith("KeyError: 'features.block1' (test_bench.py:") and "in boom; ALAMBIC_DEBUG=1" in error


def test_an_error_origin_is_named_from_the_package_not_from_a_checkout_named_alambic(tmp_path):
    from alambic.bench import _shown_path

    assert _shown_path(alambic.bench.__file__) == "alambic/bench.py"
    assert _shown_path(str(Path(alambic.bench.__file__).parent / "train" / "loop.py")) == "alambic/train/loop.py"
    # a checkout folder named `alambic` holding the tests: its files are not package files
    assert _shown_path(str(tmp_path / "alambic" / "tests" / "integration" / "test_bench.py")) == "test_bench.py"
