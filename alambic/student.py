"""The finished student of a run directory: ``student.safetensors`` (weights) and ``student.json`` (what
rebuilds the network: arch, input shape, classes, and for a deployable method its ``deploy`` entry).

:mod:`alambic.run` writes them; :mod:`alambic.probe`, :mod:`alambic.export` and users read them back with
:func:`load_student`. It lives below both so that neither the probes nor the export import the whole run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from alambic import methods as _methods  # noqa: F401  (registers methods: a student.json may name one to rebuild)
from alambic.errors import RunDirError
from alambic.export.weights import load_weights
from alambic.models.zoo import build_model
from alambic.recipe.load import model_spec
from alambic.registry import METHODS

STUDENT_WEIGHTS, STUDENT_META = "student.safetensors", "student.json"


def load_student(run_dir: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The finished student of ``run_dir`` (rebuilt from ``student.json``) and that metadata."""
    run_dir = Path(run_dir)
    meta_path = run_dir / STUDENT_META
    if not meta_path.exists():
        raise RunDirError(f"{run_dir} has no finished student ({meta_path.name} missing): did the run finish?")
    meta = json.loads(meta_path.read_text())
    model = build_model(model_spec(meta["arch"], "student.json: arch"), tuple(meta["input_shape"]), meta["num_classes"])
    if "deploy" in meta:
        model = METHODS.get(meta["deploy"]["method"]).obj.rebuild(model, meta["deploy"])
    load_weights(model, run_dir / STUDENT_WEIGHTS)
    return model, meta
