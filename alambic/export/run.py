"""``alambic export RUN_DIR``: the finished student of a run, as ONNX (checked) or safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from alambic.run import load_student


def export_run(run_dir: str | Path, fmt: str = "onnx", out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    model, meta = load_student(run_dir)
    if fmt == "safetensors":
        from alambic.export.weights import export_safetensors

        path = Path(out) if out else run_dir / "export" / "student.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        return export_safetensors(model, path, metadata={"alambic": json.dumps(meta)})
    from alambic.export.onnx import export_onnx

    path = Path(out) if out else run_dir / "export" / "student.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.rand(2, *meta["input_shape"], generator=torch.Generator().manual_seed(0))
    return export_onnx(model, example, path)
