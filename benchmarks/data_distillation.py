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
4. writes ``OUT/results.csv`` (one row per student run), ``OUT/results.md`` (mean ± std over distillation
   seeds x student seeds) and ``DOCS/data-distillation.png``.

    python benchmarks/data_distillation.py --out runs/data-distillation
    python benchmarks/data_distillation.py --out runs/data-distillation --data mnist5k --ipc 1 10 50 \
        --distill-seeds 0 --student-seeds 0 1 2
    python benchmarks/data_distillation.py --out runs/data-distillation --report-only

One process, one torch thread (OMP/BLAS held to one too).
"""

from __future__ import annotations

import argparse
import csv
import json
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


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for data in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == data]
        ipcs = sorted({r["ipc"] for r in mine if r["ipc"] is not None})
        for protocol, title in (("ce", "a fresh ConvNet trained with cross-entropy on the set (test accuracy %)"),
                                ("regress", ("a fresh ConvNet pre-trained to regress the set's targets, then a "
                                            "linear probe on the real training split (test accuracy %)"))):
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
                    cells.append(mean_std(accs) if accs else "-")
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


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datas = list(dict.fromkeys(r["data"] for r in rows))
    fig, axes = plt.subplots(len(datas), 2, figsize=(10, 3.6 * len(datas)), squeeze=False)
    for i, data in enumerate(datas):
        mine = [r for r in rows if r["data"] == data]
        ipcs = sorted({r["ipc"] for r in mine if r["ipc"] is not None})
        for j, (protocol, title) in enumerate((("ce", "cross-entropy on the set"),
                                                ("regress", "regress targets, then linear probe"))):
            ax = axes[i][j]
            for method in METHODS:
                pts = [[r["accuracy"] for r in mine if r["set"] == method and r["ipc"] == ipc
                        and r["protocol"] == protocol] for ipc in ipcs]
                if not any(pts):
                    continue
                m = [100 * statistics.mean(p) for p in pts]
                s = [100 * statistics.stdev(p) if len(p) > 1 else 0.0 for p in pts]
                ax.errorbar(ipcs, m, yerr=s, marker="o", capsize=3, label=method)
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
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "results.csv"
    t = time.perf_counter()
    if not args.report_only:
        rows = run_all(args)
        if csv_path.exists():  # keep the rows of other datasets
            rows = [r for r in read_csv(csv_path) if r["data"] not in args.data] + rows
        write_csv(rows, csv_path)
        say(f"all done in {time.perf_counter() - t:.0f} s")
    rows = read_csv(csv_path)
    md = table(rows)
    (args.out / "results.md").write_text(md + "\n")
    print(md)
    plot(rows, args.docs / "data-distillation.png")
    say(f"wrote {csv_path}, {args.out / 'results.md'}, {args.docs / 'data-distillation.png'}")


if __name__ == "__main__":
    main()
