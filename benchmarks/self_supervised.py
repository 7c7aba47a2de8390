"""Self-supervised pre-training without labels, judged by kNN and linear probes against two baselines.

For every cell of a suite (dataset x method x seed, each a recipe under ``recipes/self_supervised/``) this
script trains the student without labels (``alambic.run.run(..., resume=True)``: a finished run is reused,
an interrupted one continues), probes it with ``alambic.probe.probe_run(run_dir, baselines=True)`` (the
student, the same network at the run's seed before training, and the raw pixels; written to
``RUN_DIR/probe.json``), and writes

- ``OUT/results.csv``: one row per run;
- ``OUT/results.md``: per dataset, random init, raw pixels and each method, kNN and linear test accuracy
  (mean ± std over seeds), the paired difference to the same network at random initialisation (paired
  t-test over seeds, ``scipy.stats.ttest_rel``, when scipy is installed), and the training wall time;
- ``DOCS/self_supervised_curves.png``: the online kNN accuracy on the validation split during training
  (mean over seeds), one panel per dataset, one line per method;
- ``DOCS/self_supervised_results.csv``: a copy of ``results.csv``.

    python benchmarks/self_supervised.py --suite benchmarks/suites/ssl.yaml --out runs/ssl
    python benchmarks/self_supervised.py --suite benchmarks/suites/ssl.yaml --out runs/ssl --report-only
    python benchmarks/self_supervised.py --suite benchmarks/suites/ssl.yaml --only mnist5k/byol

Cost. The raw-pixel baseline depends only on the data, and the random-initialisation baseline only on the
data, the architecture and the seed, yet ``probe_run`` recomputes both for every run; the student's own
probe was already computed by the run (``summary.json: probe``). A linear probe on 46,000 glyphs takes
minutes on one CPU thread, so by default this script memoises those three (keyed by the data fingerprint
and a hash of the network's weights and buffers, stored in ``OUT/probe_cache.json``); ``--no-cache``
recomputes everything. The numbers are the same either way (the probes are deterministic).

One training process at a time; torch, BLAS and OpenMP are held to one thread (``--threads``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

_THREADS = "1"
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, _THREADS)

import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS_CSV, RESULTS_MD, CACHE = "results.csv", "results.md", "probe_cache.json"
CURVES_PNG, DOCS_CSV = "self_supervised_curves.png", "self_supervised_results.csv"


# ------------------------------------------------------------------------------------------- the suite
def load_suite(path: Path) -> dict[str, Any]:
    """The suite: ``seeds``, and ``cells``, each ``{data, method, recipe, seeds?, overrides?, teacher?}``.

    ``teacher: <method>`` names another cell of the same dataset whose seed-0 run is this cell's frozen
    teacher (``teacher.run`` is set to that run directory under ``--out``); that cell must come earlier.
    """
    suite = yaml.safe_load(path.read_text())
    if not isinstance(suite, dict) or not isinstance(suite.get("cells"), list):
        raise SystemExit(f"{path}: a suite needs a list of cells")
    seeds = suite.get("seeds", [0, 1, 2])
    seen: set[tuple[str, str]] = set()
    for i, cell in enumerate(suite["cells"]):
        missing = [k for k in ("data", "method", "recipe") if k not in cell]
        if missing:
            raise SystemExit(f"{path}: cell {i} lacks {missing}")
        cell.setdefault("seeds", seeds)
        cell.setdefault("overrides", {})
        key = (cell["data"], cell["method"])
        if key in seen:
            raise SystemExit(f"{path}: two cells named {cell['data']}/{cell['method']}")
        t = cell.get("teacher")
        if t is not None and (cell["data"], t) not in seen:
            raise SystemExit(f"{path}: cell {cell['data']}/{cell['method']} needs its teacher cell "
                             f"{cell['data']}/{t} earlier in the suite")
        seen.add(key)
    return suite


def run_dir(out: Path, cell: dict[str, Any], seed: int) -> Path:
    return out / cell["data"] / cell["method"] / f"seed{seed}"


def overrides(cell: dict[str, Any], seed: int, out: Path) -> list[str]:
    """``key.path=value`` strings: the cell's overrides, its teacher's run directory, then the seed."""
    items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in cell["overrides"].items()]
    if cell.get("teacher"):
        items.append(f"teacher.run={out / cell['data'] / cell['teacher'] / 'seed0'}")
    items.append(f"seed={seed}")
    return items


# ------------------------------------------------------------------------------------ probe memoisation
def weights_hash(model) -> str:
    h = hashlib.sha1()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ProbeCache:
    """Memoises ``alambic.probe.pixel_baseline`` and ``probe_model`` inside ``probe_run`` (see the module doc)."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.hits = 0

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))

    @staticmethod
    def model_key(model, feature, data, k, temperature) -> str:
        return f"model:{data.fingerprint}:{weights_hash(model)}:{feature}:{k}:{temperature}"

    def install(self):
        """Patch ``alambic.probe``'s two functions; returns a function that restores them."""
        import alambic.probe as P

        orig_pixels, orig_model = P.pixel_baseline, P.probe_model

        def pixel_baseline(data, *, k=20, temperature=0.07, test=True):
            key = f"pixels:{data.fingerprint}:{k}:{temperature}:{test}"
            if key not in self.data:
                self.data[key] = orig_pixels(data, k=k, temperature=temperature, test=test)
                self.save()
            else:
                self.hits += 1
            return dict(self.data[key])

        def probe_model(model, feature, data, *, k=20, temperature=0.07, batch_size=512, test=True, linear=True,
                        max_train=None):
            plain = test and linear and max_train is None
            key = self.model_key(model, feature, data, k, temperature) if plain else None
            if key is None or key not in self.data:
                res = orig_model(model, feature, data, k=k, temperature=temperature, batch_size=batch_size,
                                 test=test, linear=linear, max_train=max_train)
                if key is not None:
                    self.data[key] = res
                    self.save()
                return res
            self.hits += 1
            return dict(self.data[key])

        P.pixel_baseline, P.probe_model = pixel_baseline, probe_model

        def restore():
            P.pixel_baseline, P.probe_model = orig_pixels, orig_model
        return restore

    def prefill_student(self, rdir: Path, summary: dict[str, Any]) -> None:
        """The run already probed its final student (``summary.json: probe``): store it under that network's key."""
        from alambic.recipe.load import load_recipe
        from alambic.run import load_student

        probe, feature = summary.get("probe"), summary.get("feature")
        if not probe or feature is None:
            return
        recipe = load_recipe(rdir / "recipe.yaml")
        ev = recipe.eval
        if (ev.knn_k, ev.knn_temperature) != (20, 0.07):
            return  # probe_run's defaults differ from what the run used
        model, _ = load_student(rdir)

        class _D:  # only the fingerprint enters the key; building the data again would cost seconds
            fingerprint = summary["data_fingerprint"]
        self.data.setdefault(self.model_key(model, feature, _D, 20, 0.07), probe)


# ------------------------------------------------------------------------------------------ running
def run_all(suite: dict[str, Any], out: Path, only: list[str], cache: ProbeCache | None) -> None:
    from alambic.probe import probe_run
    from alambic.recipe.load import load_recipe
    from alambic.run import run

    jobs = [(c, s) for c in suite["cells"] for s in c["seeds"] if _selected(c, only)]
    start = time.time()
    for i, (cell, seed) in enumerate(jobs, 1):
        rdir = run_dir(out, cell, seed)
        label = f"[{i}/{len(jobs)}] {cell['data']}/{cell['method']}/seed{seed}"
        done = (rdir / "summary.json").exists()
        print(f"{label}: {'finished run, probing' if done else 'training'} ({time.time() - start:.0f} s elapsed)",
              flush=True)
        t0 = time.time()
        recipe = load_recipe(ROOT / cell["recipe"] if not Path(cell["recipe"]).is_absolute() else cell["recipe"],
                             overrides(cell, seed, out))
        try:
            summary = run(recipe, rdir, resume=True, progress=False)
        except Exception as exc:  # one broken cell must not lose the others
            print(f"{label}: FAILED: {type(exc).__name__}: {exc}", flush=True)
            continue
        t1 = time.time()
        if not (rdir / "probe.json").exists():
            if cache is not None:
                cache.prefill_student(rdir, summary)
            probe_run(rdir, baselines=True)
        res = json.loads((rdir / "probe.json").read_text())
        print(f"{label}: kNN {100 * res['student']['knn_test']:.2f} (init {100 * res['random_init']['knn_test']:.2f}, "
              f"pixels {100 * res['pixels']['knn_test']:.2f}), linear {100 * res['student']['linear_test']:.2f} "
              f"(init {100 * res['random_init']['linear_test']:.2f}, pixels {100 * res['pixels']['linear_test']:.2f}); "
              f"train {summary['train']['wall_time_s']:.0f} s, run {t1 - t0:.0f} s, probe {time.time() - t1:.0f} s",
              flush=True)


def _selected(cell: dict[str, Any], only: list[str]) -> bool:
    return not only or any(o in (cell["data"], f"{cell['data']}/{cell['method']}") for o in only)


# ------------------------------------------------------------------------------------------ reporting
FIELDS = ["data", "method", "seed", "arch", "steps", "epochs", "batch_size", "wall_time_s",
          "knn_test", "linear_test", "knn_val", "linear_val", "feature_std", "rank",
          "init_knn_test", "init_linear_test", "pixels_knn_test", "pixels_linear_test", "pixels_knn_val",
          "ema_teacher_knn_test", "ema_teacher_linear_test", "collapse_warnings", "final_monitors"]


def collect(suite: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    rows = []
    for cell in suite["cells"]:
        for seed in cell["seeds"]:
            rdir = run_dir(out, cell, seed)
            if not (rdir / "summary.json").exists() or not (rdir / "probe.json").exists():
                print(f"missing: {rdir} (not run or not probed)", flush=True)
                continue
            s = json.loads((rdir / "summary.json").read_text())
            p = json.loads((rdir / "probe.json").read_text())
            r = yaml.safe_load((rdir / "recipe.yaml").read_text())
            st = r["student"]
            arch = st["arch"] + (" " + str(st["channels"]) if "channels" in st else
                                 f" dim {st.get('dim')} depth {st.get('depth')} patch {st.get('patch_size')}")
            t = s.get("teacher") or {}
            rows.append({
                "data": cell["data"], "method": cell["method"], "seed": seed, "arch": arch,
                "steps": s["train"]["steps"], "epochs": s["train"]["epochs"], "batch_size": r["train"]["batch_size"],
                "wall_time_s": s["train"]["wall_time_s"],
                "knn_test": p["student"]["knn_test"], "linear_test": p["student"]["linear_test"],
                "knn_val": p["student"]["knn_val"], "linear_val": p["student"]["linear_val"],
                "feature_std": p["student"]["feature_std"], "rank": p["student"]["rank"],
                "init_knn_test": p["random_init"]["knn_test"], "init_linear_test": p["random_init"]["linear_test"],
                "pixels_knn_test": p["pixels"]["knn_test"], "pixels_linear_test": p["pixels"]["linear_test"],
                "pixels_knn_val": p["pixels"]["knn_val"],
                "ema_teacher_knn_test": (t.get("test") or {}).get("knn_accuracy") if t.get("kind") == "ema" else None,
                "ema_teacher_linear_test": (t.get("test") or {}).get("accuracy") if t.get("kind") == "ema" else None,
                "collapse_warnings": len(s.get("warnings", [])),
                "final_monitors": json.dumps(final_monitors(rdir)),
            })
    return rows


def final_monitors(rdir: Path) -> dict[str, float]:
    last: dict[str, float] = {}
    with open(rdir / "metrics.jsonl") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("monitors"):
                last = {k: round(float(v), 4) for k, v in rec["monitors"].items()}
    return last


def curves(suite: dict[str, Any], out: Path) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """data -> method -> (steps, online kNN val accuracy of the student averaged over the seeds that have it)."""
    res: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for cell in suite["cells"]:
        per_step: dict[int, list[float]] = {}
        for seed in cell["seeds"]:
            path = run_dir(out, cell, seed) / "metrics.jsonl"
            if not path.exists():
                continue
            with open(path) as fh:
                for line in fh:
                    rec = json.loads(line)
                    if rec.get("split") == "probe":
                        per_step.setdefault(int(rec["step"]), []).append(rec["student"]["knn_val"])
        if per_step:
            n = max(len(v) for v in per_step.values())
            steps = sorted(s for s, v in per_step.items() if len(v) == n)
            res.setdefault(cell["data"], {})[cell["method"]] = (steps, [statistics.fmean(per_step[s]) for s in steps])
    return res


def _pct(values: list[float]) -> str:
    if not values:
        return "-"
    m = 100 * statistics.fmean(values)
    return f"{m:.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{m:.2f}"


def _paired(a: list[float], b: list[float]) -> str:
    """Mean of a − b in points, with a paired t-test p-value when scipy is there and it is defined."""
    d = [100 * (x - y) for x, y in zip(a, b)]
    if not d:
        return "-"
    text = f"{statistics.fmean(d):+.2f}"
    try:
        from scipy.stats import ttest_rel
    except ImportError:
        return text
    if len(d) >= 2 and statistics.pstdev(d) > 0:
        p = float(ttest_rel(a, b).pvalue)
        if not math.isnan(p):
            text += f" (p={p:.2g})"
    return text


def table(rows: list[dict[str, Any]], data: str) -> list[str]:
    sel = [r for r in rows if r["data"] == data]
    lines = ["| representation | network | steps | kNN test % | linear test % | Δ kNN vs init | Δ linear vs init "
             "| train s |", "|---|---|---|---|---|---|---|---|"]
    for arch in dict.fromkeys(r["arch"] for r in sel):
        init = {r["seed"]: r for r in sel if r["arch"] == arch}  # identical for every method at a seed
        lines.append(f"| random init | {arch} | 0 | {_pct([r['init_knn_test'] for r in init.values()])} | "
                     f"{_pct([r['init_linear_test'] for r in init.values()])} | | | |")
    if sel:
        lines.append(f"| raw pixels | - | - | {100 * sel[0]['pixels_knn_test']:.2f} | "
                     f"{100 * sel[0]['pixels_linear_test']:.2f} | | | |")
    for method in dict.fromkeys(r["method"] for r in sel):
        m = sorted((r for r in sel if r["method"] == method), key=lambda r: r["seed"])
        walls = [r["wall_time_s"] for r in m]
        lines.append(
            f"| **{method}** (n={len(m)}) | {m[0]['arch']} | {m[0]['steps']} | {_pct([r['knn_test'] for r in m])} | "
            f"{_pct([r['linear_test'] for r in m])} | {_paired([r['knn_test'] for r in m], [r['init_knn_test'] for r in m])} | "
            f"{_paired([r['linear_test'] for r in m], [r['init_linear_test'] for r in m])} | "
            f"{statistics.fmean(walls):.0f} |")
    return lines


def write_report(suite: dict[str, Any], out: Path, docs: Path | None) -> None:
    rows = collect(suite, out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / RESULTS_CSV, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)
    md = [f"# Self-supervised suite `{suite.get('name', 'ssl')}`", "",
          "Test accuracy (%) of a weighted kNN (k=20, T=0.07, cosine) and of a linear probe (C chosen on val), both "
          "fit on the labelled training split, on the frozen representation; mean ± std over seeds. Δ: paired "
          "difference to the same network at the same seed before training, in points (paired t-test). Train s: "
          "the training loop's wall time (one thread).", ""]
    for data in dict.fromkeys(r["data"] for r in rows):
        md += [f"## {data}", "", *table(rows, data), ""]
    (out / RESULTS_MD).write_text("\n".join(md))
    print(f"wrote {out / RESULTS_CSV} and {out / RESULTS_MD} ({len(rows)} runs)", flush=True)
    print("\n".join(md), flush=True)
    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        (docs / DOCS_CSV).write_text((out / RESULTS_CSV).read_text())
        plot_curves(curves(suite, out), rows, docs / CURVES_PNG)
        print(f"wrote {docs / DOCS_CSV} and {docs / CURVES_PNG}", flush=True)


def plot_curves(data: dict[str, dict[str, tuple[list[int], list[float]]]], rows: list[dict[str, Any]],
                path: Path) -> None:
    """One panel per dataset: the online kNN accuracy (val) against optimizer steps, one line per method."""
    from matplotlib.figure import Figure

    if not data:
        return
    fig = Figure(figsize=(5.2 * len(data), 4.2), layout="constrained")
    axes = fig.subplots(1, len(data), squeeze=False)[0]
    names = list(dict.fromkeys(m for methods in data.values() for m in methods))
    palette = ["C0", "C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8", "C9"]
    color = {m: palette[i % len(palette)] for i, m in enumerate(names)}  # one colour per method in every panel
    for ax, (name, methods) in zip(axes, data.items()):
        for method, (steps, acc) in methods.items():
            ax.plot(steps, [100 * a for a in acc], marker="o", markersize=3, label=method, color=color[method])
        pix = next((r["pixels_knn_val"] for r in rows if r["data"] == name), None)
        if pix is not None:
            ax.axhline(100 * pix, color="black", linestyle="--", linewidth=1, label="raw pixels (val)")
        ax.set_title(f"{name}: online kNN (val), mean over seeds")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("kNN accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default=str(ROOT / "benchmarks/suites/ssl.yaml"))
    ap.add_argument("--out", default="runs/ssl", help="root of the run directories (OUT/<data>/<method>/seed<k>)")
    ap.add_argument("--docs", default=str(ROOT / "docs/results"),
                    help="where the curve plot and a copy of results.csv go ('' = nowhere)")
    ap.add_argument("--only", action="append", default=[], help="run only DATA or DATA/METHOD (repeatable)")
    ap.add_argument("--report-only", action="store_true", help="no training or probing: report the finished runs")
    ap.add_argument("--no-cache", action="store_true", help="recompute every probe (see the module doc)")
    ap.add_argument("--threads", type=int, default=1, help="torch and BLAS threads (default 1)")
    args = ap.parse_args(argv)

    suite = load_suite(Path(args.suite))
    out = Path(args.out)
    if not args.report_only:
        import torch

        torch.set_num_threads(args.threads)
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(args.threads)
        except ImportError:
            pass
        cache = None if args.no_cache else ProbeCache(out / CACHE)
        restore = cache.install() if cache is not None else None
        try:
            run_all(suite, out, args.only, cache)
        finally:
            if restore is not None:
                restore()
    write_report(suite, out, Path(args.docs) if args.docs else None)


if __name__ == "__main__":
    main()
