"""Distillation through data on digits (and MNIST-5k): sets at 1, 5, 10 images per class, a fresh ConvNet on each.

For each dataset this script
1. trains the frozen self-supervised teacher (BYOL, ``recipes/self_supervised/<data>-byol.yaml``) once;
2. distils every set: method (random, herding, dm, krr_st) x images per class x distillation seed, with the
   recipes ``recipes/distill_data/<data>-<method>.yaml`` (``alambic.distill_data.distill_data``, resumable:
   a finished set is reused);
3. trains fresh students on every set, with ``alambic.run`` (resumable, a finished run is reused):
   - ``ce`` (labelled sets only): cross-entropy on the set, accuracy on the real test split (the classic
     dataset-distillation protocol, ``<data>-student-ce.yaml``);
   - ``regress``: pre-trained to regress the set's targets (KRR-ST's learned Y_s, else the teacher's
     representations of the set's images), then a linear probe on the real labelled training split, scored
     on the real test split (KRR-ST's protocol, ``<data>-student-regress.yaml``);
   plus references: the same students on the whole real training split, and the network at random
   initialisation (linear probe, no training);
4. writes ``OUT/results.csv`` (one row per student run; a later invocation over other sizes, methods or seeds
   adds its runs to it), ``OUT/results.md`` (mean ± std over distillation seeds x student seeds, and the
   difference to the random subset of the same size with Welch's p) and one figure per dataset
   (``DOCS/data-distillation.png`` for digits, ``DOCS/data-distillation-<data>.png`` otherwise); with
   ``--docs-csv`` also the dataset's rows of ``DOCS/data-distillation-results.csv``.

    python benchmarks/data_distillation.py --out runs/data-distillation
    python benchmarks/data_distillation.py --out runs/data-distillation --data mnist5k --ipc 1 10 \
        --distill-seeds 0 --student-seeds 0 1 2
    python benchmarks/data_distillation.py --out runs/data-distillation --data mnist5k --ipc 50 \
        --methods random herding dm --distill-seeds 0 --student-seeds 0 1 2 --docs-csv
    python benchmarks/data_distillation.py --out runs/data-distillation --report-only

One process, one torch thread (OMP/BLAS held to one too).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("random", "herding", "dm", "krr_st")
LABELLED = ("random", "herding", "dm")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def teacher_run(data: str, out: Path) -> Path:
    from alambic.recipe import load_recipe
    from alambic.run import run

    path = out / data / "teacher-byol"
    t = time.perf_counter()
    summary = run(load_recipe(ROOT / "recipes" / "self_supervised" / f"{data}-byol.yaml"), path, resume=True,
                  progress=False)
    say(f"{data}: teacher {path} linear test {summary['test']['linear_accuracy']:.4f} "
        f"({time.perf_counter() - t:.0f} s)")
    return path


def distil(data: str, method: str, ipc: int, seed: int, teacher: Path, out: Path, extra: list[str]) -> Path:
    from alambic.distill_data import distill_data, load_distill_recipe

    path = out / data / "sets" / f"{method}-ipc{ipc}-s{seed}"
    recipe = load_distill_recipe(ROOT / "recipes" / "distill_data" / f"{data}-{method}.yaml",
                                 [f"teacher.run={teacher}", f"seed={seed}", f"distill.images_per_class={ipc}",
                                  *extra])
    manifest = distill_data(recipe, path, resume=True, progress=False)
    say(f"{data}: set {path.name} ({manifest['size']} images, {manifest['wall_time_s']:.1f} s)")
    return path


def student(data: str, protocol: str, seed: int, out: Path, name: str, overrides: list[str]) -> dict[str, Any]:
    from alambic.recipe import load_recipe
    from alambic.run import run

    path = out / data / "students" / protocol / f"{name}-st{seed}"
    t = time.perf_counter()
    summary = run(load_recipe(ROOT / "recipes" / "distill_data" / f"{data}-student-{protocol}.yaml",
                              [f"seed={seed}", *overrides]), path, resume=True, progress=False)
    acc = summary["test"]["accuracy"]
    return {"accuracy": acc, "knn_accuracy": summary["test"].get("knn_accuracy"), "train_s": summary["train"]["wall_time_s"], "wall_s": time.perf_counter() - t,
            "run": str(path)}


def random_init_probe(data: str, seed: int) -> float:
    """Linear probe (test) of the student network at random initialisation, seed ``seed`` (no training)."""
    from alambic.data import build_data
    from alambic.models.zoo import build_model
    from alambic.probe import probe_model
    from alambic.recipe import load_recipe
    from alambic.train.seeding import seed_everything

    recipe = load_recipe(ROOT / "recipes" / "distill_data" / f"{data}-student-regress.yaml",
                         [f"seed={seed}", "data.distilled=null", "teacher=null", "method.name=ce"])
    bundle = build_data(recipe.data)
    seed_everything(seed)
    net = build_model(recipe.student, bundle.input_shape, bundle.num_classes)
    return probe_model(net, "pool", bundle)["linear_test"]


def krr_objective(data: str, out: Path, set_names: list[str], steps=(0, 20, 100), nets: int = 5) -> list[dict]:
    """KRR-ST's objective on held-out images: for fresh networks (seeds 1000..) trained ``T`` steps on
    ``MSE(net(X_s), Y_s)`` (SGD 0.1, momentum 0.9, wd 1e-3, as the pool), the KRR head solved on the set's
    features predicts the teacher's representation of the real *validation* images; mean MSE over networks.
    Whether the distillation lowered what it optimises, beyond the images and networks it saw."""
    import torch
    import torch.nn.functional as F

    from alambic.distill_data import load_distill_recipe, load_set
    from alambic.distill_data.build import make_context
    from alambic.distill_data.networks import embed, fresh
    from alambic.losses import krr_st_loss

    teacher = out / data / "teacher-byol"
    recipe = load_distill_recipe(ROOT / "recipes" / "distill_data" / f"{data}-krr_st.yaml", [f"teacher.run={teacher}"])
    ctx, bundle, _ = make_context(recipe)
    feature = recipe.distill.options.feature
    y_val = ctx.teacher(bundle.val.x).double()
    rows = []
    for name in set_names:
        s = load_set(out / data / "sets" / name)
        k = s.targets.shape[1]
        for t in steps:
            losses = []
            for seed in range(nets):
                net = fresh(lambda: ctx.network(k), 1000 + seed)  # noqa: B023  (called at once)
                opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
                for _ in range(t):
                    net.train()
                    opt.zero_grad()
                    F.mse_loss(net(s.images), s.targets).backward()
                    opt.step()
                net.eval()
                with torch.no_grad():
                    losses.append(float(krr_st_loss(embed(net, s.images, feature).double(), s.targets.double(),
                                                    embed(net, bundle.val.x, feature).double(), y_val)))
            rows.append({"data": data, "set": name, "net_steps": t, "val_krr_mse": statistics.mean(losses)})
        say(f"{data}: KRR objective of {name}: " + ", ".join(f"{r['net_steps']} steps {r['val_krr_mse']:.4f}"
                                                             for r in rows if r["set"] == name))
    return rows


def few_label_probes(rows: list[dict[str, Any]], labels_per_class: int, out: Path) -> list[dict[str, Any]]:
    """Linear probe of every ``regress`` student with only ``labels_per_class`` labelled real training images
    per class (a class-balanced subset, seed 0; C still chosen on the validation split), scored on test: the
    full-label probe sits near its ceiling on digits, a few-label probe separates representations more.
    Memoised in ``OUT/few_label_probe.csv`` by run directory."""
    import torch

    from alambic.data import build_data
    from alambic.distill_data.random_subset import class_balanced_subset
    from alambic.eval.probes import extract_features, linear_probe
    from alambic.models.zoo import build_model
    from alambic.recipe import load_recipe
    from alambic.student import load_student
    from alambic.train.seeding import seed_everything

    cache_path = out / "few_label_probe.csv"
    cache = {}
    if cache_path.exists():
        with open(cache_path) as fh:
            cache = {(r["run"], int(r["labels_per_class"])): float(r["accuracy"]) for r in csv.DictReader(fh)}
    bundles: dict[str, Any] = {}
    result = []
    for r in rows:
        if r["protocol"] != "regress":
            continue
        key = (r["run"] or f"random-init-{r['data']}-{r['student_seed']}", labels_per_class)
        if key not in cache:
            data = r["data"]
            if data not in bundles:
                recipe = load_recipe(ROOT / "recipes" / "distill_data" / f"{data}-student-regress.yaml",
                                     ["data.distilled=null", "teacher=null", "method.name=ce"])
                bundles[data] = (recipe, build_data(recipe.data))
            recipe, bundle = bundles[data]
            if r["run"]:
                model, meta = load_student(r["run"])
                feature = meta["features"]
            else:  # the network at random initialisation, the student's seed
                seed_everything(int(r["student_seed"]))
                model, feature = build_model(recipe.student, bundle.input_shape, bundle.num_classes), "pool"
            pick = class_balanced_subset(bundle.train.y, labels_per_class, seed=0, num_classes=bundle.num_classes)
            with torch.no_grad():
                tr, va, te = (extract_features(model, x, feature) for x in (bundle.train.x[pick], bundle.val.x,
                                                                              bundle.test.x))
                cache[key] = linear_probe(tr, bundle.train.y[pick], va, bundle.val.y, te,
                                          bundle.test.y)["test_accuracy"]
        result.append({**r, "protocol": f"probe{labels_per_class}", "accuracy": cache[key]})
    with open(cache_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, ["run", "labels_per_class", "accuracy"])
        w.writeheader()
        w.writerows({"run": k[0], "labels_per_class": k[1], "accuracy": v} for k, v in cache.items())
    return result


def run_all(args) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    out = args.out
    rows: list[dict[str, Any]] = []
    for data in args.data:
        teacher = teacher_run(data, out)
        extra = args.distill_overrides
        for method in args.methods:
            for ipc in args.ipc:
                for dseed in args.distill_seeds:
                    if method == "herding" and dseed != args.distill_seeds[0]:
                        continue  # deterministic: the same set for every seed
                    t = time.perf_counter()
                    set_dir = distil(data, method, ipc, dseed, teacher, out, extra)
                    set_s = json.loads((set_dir / "manifest.json").read_text())["wall_time_s"]
                    protocols = ["regress"] + (["ce"] if method in LABELLED else [])
                    for protocol in protocols:
                        over = [f"data.distilled={set_dir}"]
                        if protocol == "regress":
                            over.append(f"teacher.distilled={set_dir}")
                        for sseed in args.student_seeds:
                            r = student(data, protocol, sseed, out, f"{method}-ipc{ipc}-s{dseed}", over)
                            rows.append({"data": data, "set": method, "ipc": ipc, "distill_seed": dseed,
                                         "protocol": protocol, "student_seed": sseed, "set_s": set_s, **r})
                    accs = [r["accuracy"] for r in rows if r["data"] == data and r["set"] == method
                            and r["ipc"] == ipc and r["distill_seed"] == dseed]
                    say(f"{data}: {method} ipc {ipc} seed {dseed}: {len(accs)} students, mean "
                        f"{statistics.mean(accs):.4f} ({time.perf_counter() - t:.0f} s)")
        for sseed in args.student_seeds:  # references: the whole real training split, random init
            r = student(data, "ce", sseed, out, "whole-train", ["data.distilled=null"])
            rows.append({"data": data, "set": "whole train", "ipc": None, "distill_seed": None, "protocol": "ce",
                         "student_seed": sseed, "set_s": None, **r})
            r = student(data, "regress", sseed, out, "whole-train",
                        ["data.distilled=null", f"teacher={{run: {teacher}}}", "method.teacher_feature=pool"])
            rows.append({"data": data, "set": "whole train", "ipc": None, "distill_seed": None,
                         "protocol": "regress", "student_seed": sseed, "set_s": None, **r})
            rows.append({"data": data, "set": "random init", "ipc": None, "distill_seed": None,
                         "protocol": "regress", "student_seed": sseed, "set_s": None, "accuracy":
                         random_init_probe(data, sseed), "train_s": 0.0, "wall_s": 0.0, "run": ""})
        say(f"{data}: references done")
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    keys = ["data", "set", "ipc", "distill_seed", "protocol", "student_seed", "accuracy", "knn_accuracy", "train_s", "set_s",
            "wall_s", "run"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, keys, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


ROW_KEY = ("data", "set", "ipc", "distill_seed", "protocol", "student_seed")


def merge_rows(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``old`` rows whose run (``ROW_KEY``) is not among ``new``'s, then ``new``: an invocation with fewer sizes,
    methods or seeds (``--ipc 50 --methods random``) adds its runs to the CSV instead of dropping the others."""
    def key(r: dict[str, Any]) -> tuple[str, ...]:
        return tuple("" if r.get(k) is None else str(r[k]) for k in ROW_KEY)

    fresh = {key(r) for r in new}
    return [r for r in old if key(r) not in fresh] + list(new)


def read_csv(path: Path) -> list[dict[str, Any]]:
    out = []
    with open(path) as fh:
        for r in csv.DictReader(fh):
            r["accuracy"] = float(r["accuracy"])
            r["ipc"] = int(r["ipc"]) if r["ipc"] else None
            for k in ("set_s", "train_s"):
                r[k] = float(r[k]) if r[k] else None
            out.append(r)
    return out


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def versus_random(accs: list[float], base: list[float]) -> str:
    """`` (+1.2, p = 0.03)``: the difference of means (points) to the random subset of the same size, with
    Welch's t-test over the runs (student seeds are shared between sets: read p as a guide); "" if either
    side has fewer than 2 runs."""
    if len(accs) < 2 or len(base) < 2:
        return ""
    from scipy.stats import ttest_ind

    diff = 100 * (statistics.mean(accs) - statistics.mean(base))
    p = float(ttest_ind(accs, base, equal_var=False).pvalue)
    if p != p:  # both constant
        return f" ({diff:+.1f})"
    if p >= 1e-3:
        return f" ({diff:+.1f}, p = {p:.2g})"
    return f" ({diff:+.1f}, p < 1e-{min(12, int(-math.log10(p)))})"


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for data in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == data]
        ipcs = sorted({r["ipc"] for r in mine if r["ipc"] is not None})
        few = sorted({r["protocol"] for r in mine if r["protocol"].startswith("probe")})
        for protocol, title in (("ce", "a fresh ConvNet trained with cross-entropy on the set (test accuracy %)"),
                                ("regress", ("a fresh ConvNet pre-trained to regress the set's targets, then a "
                                             "linear probe on the real training split (test accuracy %)")),
                                *((p, (f"the same regress students, probed with only {p[5:]} labelled real images "
                                      "per class (test accuracy %)")) for p in few)):
            lines += [f"### {data}: {title}", "",
                      "| set | " + " | ".join(f"{i} / class" for i in ipcs) + " | n per cell | set s (mean) |",
                      "|---|" + "---|" * (len(ipcs) + 2)]
            for method in [m for m in (*METHODS,) if any(r["set"] == m and r["protocol"] == protocol for r in mine)]:
                cells, ns, secs = [], set(), []
                for ipc in ipcs:
                    accs = [r["accuracy"] for r in mine if r["set"] == method and r["ipc"] == ipc
                            and r["protocol"] == protocol]
                    secs += [r["set_s"] for r in mine if r["set"] == method and r["ipc"] == ipc
                             and r["protocol"] == protocol and r["set_s"] is not None]
                    base = [r["accuracy"] for r in mine if r["set"] == "random" and r["ipc"] == ipc
                            and r["protocol"] == protocol]
                    cells.append(mean_std(accs) + ("" if method == "random" else versus_random(accs, base))
                                 if accs else "-")
                    if accs:
                        ns.add(len(accs))
                lines.append(f"| {method} | " + " | ".join(cells) +
                             f" | {'/'.join(str(n) for n in sorted(ns))} | {statistics.mean(secs):.1f} |")
            for ref in ("whole train", "random init"):
                accs = [r["accuracy"] for r in mine if r["set"] == ref and r["protocol"] == protocol]
                if accs:
                    lines.append(f"| *{ref}* | {mean_std(accs)} (any size) |" + " |" * (len(ipcs) - 1)
                                 + f" {len(accs)} | |")
            lines.append("")
    return "\n".join(lines)


def plot_path(docs: Path, data: str) -> Path:
    return docs / ("data-distillation.png" if data == "digits" else f"data-distillation-{data}.png")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = list(dict.fromkeys(r["data"] for r in rows))
    few = sorted({r["protocol"] for r in rows if r["protocol"].startswith("probe")})
    panels = [("ce", "cross-entropy on the set"), ("regress", "regress targets, then linear probe"),
              *((p, f"regress, then probe with {p[5:]} labels/class") for p in few)]
    fig, axes = plt.subplots(len(datas), len(panels), figsize=(5 * len(panels), 3.6 * len(datas)), squeeze=False)
    for i, data in enumerate(datas):
        mine = [r for r in rows if r["data"] == data]
        ipcs = sorted({r["ipc"] for r in mine if r["ipc"] is not None})
        for j, (protocol, title) in enumerate(panels):
            ax = axes[i][j]
            for method in METHODS:
                pts = {ipc: [r["accuracy"] for r in mine if r["set"] == method and r["ipc"] == ipc
                             and r["protocol"] == protocol] for ipc in ipcs}
                pts = {ipc: p for ipc, p in pts.items() if p}  # a method may skip sizes (KRR-ST at 50 on MNIST-5k)
                if not pts:
                    continue
                m = [100 * statistics.mean(p) for p in pts.values()]
                s = [100 * statistics.stdev(p) if len(p) > 1 else 0.0 for p in pts.values()]
                ax.errorbar(list(pts), m, yerr=s, marker="o", capsize=3, label=method)
            for ref, style in (("whole train", "--"), ("random init", ":")):
                accs = [r["accuracy"] for r in mine if r["set"] == ref and r["protocol"] == protocol]
                if accs:
                    ax.axhline(100 * statistics.mean(accs), ls=style, color="gray", label=ref)
            ax.set_xscale("log")
            ax.set_xticks(ipcs, [str(x) for x in ipcs])
            ax.set_xlabel("images per class")
            ax.set_ylabel("test accuracy %")
            ax.set_title(f"{data}: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/data-distillation"))
    p.add_argument("--data", nargs="+", default=["digits"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--ipc", nargs="+", type=int, default=[1, 5, 10])
    p.add_argument("--distill-seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--student-seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--distill-overrides", nargs="*", default=[], help="key=value for every distillation recipe")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--docs-csv", action="store_true",
                   help="also write --data's rows (with the few-label probes) into DOCS/data-distillation-results.csv, "
                        "keeping the other datasets' rows")
    p.add_argument("--few-labels", type=int, default=5,
                   help="also probe every regress student with this many labelled images per class (0: off)")
    p.add_argument("--krr-objective", action="store_true",
                   help="also measure KRR-ST's objective on the validation split for the seed-0 sets")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "results.csv"
    t = time.perf_counter()
    if not args.report_only:
        rows = run_all(args)
        if csv_path.exists():  # keep the rows of other datasets, sizes, methods and seeds
            rows = merge_rows(read_csv(csv_path), rows)
        write_csv(rows, csv_path)
        say(f"all done in {time.perf_counter() - t:.0f} s")
    # herding is deterministic: its set is the same for every distillation seed, so only seed 0 counts
    rows = [r for r in read_csv(csv_path) if not (r["set"] == "herding" and r["distill_seed"] not in ("0", 0))]
    if args.few_labels:
        rows += few_label_probes(rows, args.few_labels, args.out)
    md = table(rows)
    (args.out / "results.md").write_text(md + "\n")
    print(md)
    for data in dict.fromkeys(r["data"] for r in rows):  # one figure per dataset (digits: the original name)
        plot([r for r in rows if r["data"] == data], plot_path(args.docs, data))
    if args.docs_csv:
        docs_csv = args.docs / "data-distillation-results.csv"
        kept = read_csv(docs_csv) if docs_csv.exists() else []
        write_csv([r for r in kept if r["data"] not in args.data] + [r for r in rows if r["data"] in args.data],
                  docs_csv)
        say(f"wrote the {', '.join(args.data)} rows of {docs_csv} (other datasets kept)")
    if args.krr_objective:
        import torch

        torch.set_num_threads(1)
        krr_rows = []
        for data in args.data:
            names = [f"{m}-ipc{i}-s0" for i in args.ipc for m in args.methods
                     if (args.out / data / "sets" / f"{m}-ipc{i}-s0").is_dir()]
            krr_rows += krr_objective(data, args.out, names)
        with open(args.out / "krr_objective.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, ["data", "set", "net_steps", "val_krr_mse"])
            w.writeheader()
            w.writerows(krr_rows)
    say(f"wrote {csv_path}, {args.out / 'results.md'} and the figures in {args.docs}")


if __name__ == "__main__":
    main()
