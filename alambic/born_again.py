"""Born-again networks: a chain of generations, each student of one architecture taught by the last.

Furlanello et al., "Born-Again Neural Networks", ICML 2018, arXiv:1805.04770. Generation 0 trains the
recipe's student on its labels (``ce``); generation k trains a fresh student of the same architecture with
KD from generation k − 1's finished run (``teacher.run``). The paper's BANs learn from the teacher's
output distribution alone (its "+L" variants add the label loss back), so unless the recipe's own method
is ``kd`` (whose settings are then kept) the generations use ``kd`` with ``alpha: 1`` (no label term)
at ``temperature: 1``. Each generation is an ordinary run directory ``out_dir/gen{k}``; rerunning resumes
an unfinished generation and skips finished ones. Generation k uses seed ``recipe.seed + k`` (a fresh
initialisation and batch order; the data split, keyed by ``data.split_seed``, stays the same).

    from alambic.born_again import born_again
    results = born_again("recipes/self_kd/born_again_digits.yaml", "runs/ban-digits", generations=3)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from alambic.recipe.load import apply_override, load_recipe, read_yaml
from alambic.recipe.schema import Recipe
from alambic.run import run

BAN_KD = {"name": "kd", "alpha": 1.0, "temperature": 1.0}
"""KD settings of a generation when the recipe's method is not ``kd``: teacher targets only, plain softmax."""

RESULTS = "born_again.json"


def generation_recipe(base: dict[str, Any], k: int, out_dir: Path) -> dict[str, Any]:
    """The recipe data of generation ``k``: ``ce`` for k = 0, else KD from ``out_dir/gen{k-1}``."""
    data = {key: value for key, value in base.items() if key not in ("teacher", "teachers", "method")}
    method = base.get("method") or {"name": "ce"}
    data["name"] = f"{base.get('name', 'run')}-gen{k}"
    data["seed"] = int(base.get("seed", 0)) + k
    if k == 0:
        data["method"] = {"name": "ce"}
    else:
        data["method"] = dict(method) if method.get("name") == "kd" else dict(BAN_KD)
        data["teacher"] = {"run": str(out_dir / f"gen{k - 1}")}
        student = base.get("student")
        if isinstance(student, dict) and (student.get("arch") == "module" or "module" in student):
            # gen k-1's student comes from the factory the user's own recipe names: loading it runs no other code
            data["teacher"]["trust_code"] = True
    return data


def born_again(recipe: str | Path | dict[str, Any] | Recipe, out_dir: str | Path, generations: int = 3,
               progress: bool = True, overrides: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Train ``generations`` born-again generations into ``out_dir/gen0 .. gen{N-1}``; one result per generation.

    ``recipe`` is a YAML path, a recipe dict or a loaded :class:`Recipe`; its ``teacher``/``teachers``
    sections are ignored (each generation's teacher is the previous generation) and ``overrides``
    (``key.path=value``) apply to every generation. Returns, per generation, ``{"generation", "run_dir",
    "method", "test_accuracy", "teacher_fingerprint", "summary"}`` (the run's full summary), and writes the
    same list, without the summaries, to ``out_dir/born_again.json``.
    """
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    out_dir = Path(out_dir)
    if isinstance(recipe, Recipe):
        base = recipe.resolved()
    elif isinstance(recipe, dict):
        base = json.loads(json.dumps(recipe, default=str))  # a deep copy of plain data
    else:
        base = read_yaml(Path(recipe))
    for item in overrides:
        apply_override(base, item)
    results = []
    for k in range(generations):
        run_dir = out_dir / f"gen{k}"
        spec = load_recipe(generation_recipe(base, k, out_dir))
        summary = run(spec, run_dir, resume=True, progress=progress)
        teacher = summary.get("teacher") or {}
        results.append({"generation": k, "run_dir": str(run_dir), "method": summary["method"],
                        "test_accuracy": summary["test"]["accuracy"],
                        "teacher_fingerprint": teacher.get("fingerprint"), "summary": summary})
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = [{k: v for k, v in r.items() if k != "summary"} for r in results]
    (out_dir / RESULTS).write_text(json.dumps(listing, indent=2))
    return results
