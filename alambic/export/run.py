"""``alambic export RUN_DIR``: the finished student of a run, as ONNX (checked) or safetensors.

The student of a self-supervised run (``student.json`` names its ``features``) is exported as its
representation: the ONNX graph maps inputs to the embedding the probes read, not to the untrained logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from alambic.run import load_student


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None,
               say: Callable[[str], None] | None = None, *, trust_code: bool = False) -> Path:
    """Export the student of ``run_dir``; ``say`` receives a line on how the ONNX file was checked.

    A run whose ``student.json`` names a user factory (``arch: module``) is refused unless ``trust_code``
    (CLI: ``--trust-code``): rebuilding that student imports and runs the factory, so a received run
    directory could otherwise run any code (see :func:`alambic.student.load_student`)."""
    run_dir = Path(run_dir)
    model, meta = load_student(run_dir, trust_code=trust_code)
    if meta.get("features"):  # a self-supervised run: what it learned is the representation, not logits
        from alambic.models.heads import Representation

        model = Representation(model, meta["features"]).eval()
    if fmt == "safetensors":
        from alambic.export.weights import export_safetensors

        path = Path(out) if out else run_dir / "export" / "student.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        return export_safetensors(model, path, metadata={"alambic": json.dumps(meta)})
    from alambic.export.onnx import export_onnx_checked

    path = Path(out) if out else run_dir / "export" / "student.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, *meta["input_shape"], generator=torch.Generator().manual_seed(0))
    # without onnxruntime the file is exported unchecked, and `say` tells so
    path, check = export_onnx_checked(model, example, path, require_onnxruntime=say is None)
    if say is not None:
        say(str(check))
    return path
