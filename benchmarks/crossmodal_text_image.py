"""Text -> image distillation on ``emoji_text``: retrieval and probes of emoji-image students taught by MiniLM.

    python benchmarks/crossmodal_text_image.py --out runs/crossmodal-text-image --seeds 0 1 2

Trains (or reuses, when finished) ``recipes/crossmodal/{instance_nce,comodo}_emoji.yaml`` at each seed into
``OUT/<method>/seed<k>``, then scores every student on the held-out test emoji:

- retrieval among the test emoji, both ways: text -> image (each name's MiniLM embedding ranks the test
  images) and image -> text, top-1 and top-5, chance 1/N and 5/N;
  - ``head``: the student's embedding through the method's projection head (read from the run's final
    checkpoint: the head is the method's, not the deployed student's), cosine to the text embeddings;
  - ``ridge``: a ridge map from the student's pooled feature (standardised) to the text embeddings, fit on the
    training pairs, its strength chosen on the validation emoji (mean of both top-1s): the same read-out for
    every representation, so a distilled student and the baselines compare on one footing;
- a linear probe of the pooled feature on the emoji's Unicode group (9 classes; the run's own probe).

Baselines, the "student alone": the same CNN at each seed's random initialisation (what the runs start from)
and the raw pixels, each with the ridge map and the linear probe. Prints a markdown table (mean ± std over the
seeds) and writes ``OUT/results.json``; nothing is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from alambic.data.emoji_text import TEXT
from alambic.data.paired import paired_data
from alambic.data.splits import build_data
from alambic.eval.probes import extract_features
from alambic.models.heads import MLPHead
from alambic.models.zoo import build_model
from alambic.probe import cached_pixel_baseline, probe_model
from alambic.recipe import load_recipe
from alambic.run import run
from alambic.student import load_student
from alambic.train import state as st
from alambic.train.seeding import seed_everything

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "crossmodal"
ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def retrieval(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Row i of ``a`` (queries) against all rows of ``b`` (keys); the match is row i. Top-1/5 of a->b and b->a."""
    sims = F.normalize(a, dim=1) @ F.normalize(b, dim=1).t()
    out = {}
    for name, s in (("t2i", sims.t()), ("i2t", sims)):  # a = images, b = texts
        rank = (s > s.diagonal()[:, None]).sum(1)
        out[f"{name}_top1"], out[f"{name}_top5"] = float((rank < 1).float().mean()), float((rank < 5).float().mean())
    return out


def ridge(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
          test: tuple[torch.Tensor, torch.Tensor]) -> dict[str, float]:
    """Retrieval through a ridge map feature -> text embedding fit on train, its alpha chosen on val."""
    mu, sd = train[0].mean(0), train[0].std(0) + 1e-6
    x = lambda f: torch.cat([(f.double() - mu) / sd, torch.ones(len(f), 1, dtype=torch.float64)], 1)
    xtr, ytr = x(train[0]), train[1].double()
    best = None
    gram = xtr @ xtr.t()  # the dual form: N x N, cheaper than D x D for raw pixels
    for alpha in ALPHAS:
        w = xtr.t() @ torch.linalg.solve(gram + alpha * torch.eye(len(xtr), dtype=torch.float64), ytr)
        r = retrieval(x(val[0]) @ w, val[1].double())
        score = r["t2i_top1"] + r["i2t_top1"]
        if best is None or score > best[0]:
            best = (score, alpha, w)
    result = retrieval(x(test[0]) @ best[2], test[1].double())
    return {**result, "alpha": best[1]}


def head_of(run_dir: Path, in_dim: int, out_dim: int, hidden: int) -> MLPHead:
    tensors, _ = st.load(run_dir / "checkpoint.safetensors")
    head = MLPHead(in_dim, out_dim, hidden)
    head.load_state_dict({k[len("method.projector."):]: v for k, v in tensors.items() if k.startswith("method.projector.")})
    return head.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/crossmodal-text-image"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["instance_nce", "comodo"])
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {}
    recipe0 = load_recipe(RECIPES / f"{args.methods[0]}_emoji.yaml")
    data = build_data(recipe0.data)
    z = paired_data(recipe0.data).views[TEXT]
    texts = {s: z[getattr(data, s).index] for s in ("train", "val", "test")}
    images = {s: getattr(data, s).x for s in ("train", "val", "test")}
    print(f"emoji: {len(data.train)} train, {len(data.val)} val, {len(data.test)} test; chance top-1 "
          f"{1 / len(data.test):.4f}, top-5 {5 / len(data.test):.4f}", flush=True)

    def add(name: str, row: dict[str, float]) -> None:
        results.setdefault(name, []).append(row)
        print(name, json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)

    pixels = {s: images[s].flatten(1) for s in images}
    row = ridge(*((pixels[s], texts[s]) for s in ("train", "val", "test")))
    row["linear_probe"] = cached_pixel_baseline(data)["linear_test"]
    add("pixels + ridge", row)
    for seed in args.seeds:
        seed_everything(seed)
        fresh = build_model(recipe0.student, data.input_shape, data.num_classes)
        feats = {s: extract_features(fresh, images[s], "pool") for s in images}
        row = ridge(*((feats[s], texts[s]) for s in ("train", "val", "test")))
        row["linear_probe"] = probe_model(fresh, "pool", data)["linear_test"]
        add("random init + ridge", row)
    for method in args.methods:
        for seed in args.seeds:
            recipe = load_recipe(RECIPES / f"{method}_emoji.yaml", [f"seed={seed}"])
            run_dir = args.out / method / f"seed{seed}"
            summary = run(recipe, run_dir, progress=False)
            student, _ = load_student(run_dir)
            feats = {s: extract_features(student, images[s], "pool") for s in images}
            head = head_of(run_dir, feats["test"].shape[1], z.shape[1], recipe.method.options.hidden)
            with torch.no_grad():
                row = retrieval(head(feats["test"]), texts["test"])
            row["linear_probe"] = summary["test"]["linear_accuracy"]
            add(f"{method} (head)", row)
            add(f"{method} + ridge", ridge(*((feats[s], texts[s]) for s in ("train", "val", "test"))))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    def cell(rows: list[dict[str, float]], key: str) -> str:
        vals = [100 * r[key] for r in rows if key in r]
        if not vals:
            return ""
        return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"

    keys = ("t2i_top1", "t2i_top5", "i2t_top1", "i2t_top5", "linear_probe")
    print("| representation | text->image top-1 % | top-5 % | image->text top-1 % | top-5 % | linear probe % | n |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        print(f"| {name} | " + " | ".join(cell(rows, k) for k in keys) + f" | {len(rows)} |")


if __name__ == "__main__":
    main()
