"""How much a cached teacher saves: the same KD run with the teacher live and with `teacher.cache: memory`.

Both runs train the glyphs benchmark's student (CNN [8, 16]) by KD (T = 4, alpha = 0.9) from a frozen CNN
[32, 64, 128] teacher (random weights: speed does not depend on them), on one torch thread, for the same
number of steps, in alternating order over `--rounds` rounds. The wall time of each run (from its
summary.json: the training loop, cache filling included) and the ratio live / cached are printed; the
cached run computes each training sample's teacher output once, in its first epoch.

    python benchmarks/teacher_cache.py                       # MNIST-5k, 5 epochs (about a minute)
    python benchmarks/teacher_cache.py --data glyphs --size 16 --epochs 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from alambic.recipe import load_recipe
from alambic.run import run


def recipe(data: dict, epochs: int, cache: str) -> dict:
    return {
        "name": f"cache-{cache}",
        "data": data,
        "student": {"arch": "cnn", "channels": [8, 16]},
        "teacher": {"model": {"arch": "cnn", "channels": [32, 64, 128]}, "cache": cache},
        "method": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
        "train": {"epochs": epochs, "batch_size": 64, "lr": 0.003, "threads": 1, "log_every": 50},
        "eval": {"latency_repeats": 2},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="mnist5k", help="digits | mnist5k | glyphs")
    ap.add_argument("--size", type=int, default=None, help="glyphs image size")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = {"name": args.data, **({"size": args.size} if args.size else {})}
    times: dict[str, list[float]] = {"off": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = ["off", "memory"] if r % 2 == 0 else ["memory", "off"]
            for cache in order:
                summary = run(load_recipe(recipe(data, args.epochs, cache)), Path(tmp) / f"{cache}-{r}", progress=False)
                times[cache].append(summary["train"]["wall_time_s"])
                stats = summary["train"].get("teacher_cache")
                extra = f"  (teacher rows computed {stats['misses']}, served {stats['hits']})" if stats else ""
                print(f"round {r}  cache={cache:<6}  {summary['train']['steps']} steps  "
                      f"{summary['train']['wall_time_s']:7.2f} s  test acc {summary['test']['accuracy']:.4f}{extra}")
    live, cached = statistics.median(times["off"]), statistics.median(times["memory"])
    print(f"\nmedian wall time: live teacher {live:.2f} s, cached teacher {cached:.2f} s; "
          f"speed-up live/cached = {live / cached:.2f}x over {args.epochs} epochs")


if __name__ == "__main__":
    main()
