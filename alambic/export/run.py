"""``alambic export RUN_DIR``: the finished student of a run, as ONNX (checked) or safetensors.

The student of a language run (``student.json`` kind ``causal_lm``) is its causal LM: safetensors holds its
weights (``save_pretrained``'s names, with alambic's digest), and the ONNX graph maps token ids
``input_ids`` [batch, sequence] to next-token logits [batch, sequence, V], both axes dynamic, checked with
onnxruntime on batches of other sizes and lengths (no KV cache: each call recomputes the whole sequence).

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
    if meta.get("kind") == "causal_lm":
        return _export_causal_lm(run_dir, model, meta, fmt, out, say)
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


def _export_causal_lm(run_dir: Path, lm: torch.nn.Module, meta: dict, fmt: str, out: str | Path | None,
                      say: Callable[[str], None] | None) -> Path:
    """A language run's student: its weights as safetensors, or ids -> logits as checked ONNX."""
    from alambic.models.causal_lm import CausalLMLogits

    if fmt == "safetensors":
        from alambic.export.weights import export_safetensors

        path = Path(out) if out else run_dir / "export" / "student.safetensors"
        return export_safetensors(lm, path, metadata={"alambic": json.dumps(meta)})
    from alambic.export.onnx import export_onnx_checked

    path = Path(out) if out else run_dir / "export" / "student.onnx"
    vocab = int(meta.get("vocab_size") or lm.config.vocab_size)
    ids = lambda b, t, s: torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(s))  # noqa: E731
    path, check = export_onnx_checked(
        CausalLMLogits(lm).eval(), ids(2, 8, 0), path, require_onnxruntime=say is None,
        dynamic_dims={0: "batch", 1: "sequence"}, check_inputs=(ids(2, 8, 0), ids(3, 5, 1), ids(1, 13, 2)),
        input_name="input_ids")
    if say is not None:
        say(str(check))
    return path
