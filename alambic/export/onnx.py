"""Export a model to ONNX and prove the file computes what the eager model computes.

Exporter: the ``torch.export``-based ("dynamo") exporter, ``torch.onnx.export(..., dynamo=True)``, which
translates through onnxscript. It is the default since PyTorch 2.9, while the TorchScript exporter
(``dynamo=False``) is deprecated. Checked on torch 2.13 with onnxscript 0.7 and onnxruntime 1.32 for
Linear, Conv2d, BatchNorm, ReLU, Flatten and AdaptiveAvgPool2d models, including an example batch of one
(no 0/1 specialisation of the dynamic batch dimension): exporting a small model takes about a second, the
first export in a process about three (imports).

The batch dimension is exported as a named dynamic dimension ``batch``. An export can still be wrong in
ways that do not raise (a size baked in as a constant, an operator translated with other semantics), so
the file is run with onnxruntime on ``example_input`` and on a batch of another size, and compared with
the eager model under ``atol``/``rtol`` (``|onnx - eager| <= atol + rtol * |eager|``, as
:func:`numpy.allclose`); any disagreement raises :class:`AlambicError` with the largest absolute
difference.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from alambic.errors import AlambicError
from alambic.eval.classification import eval_mode

__all__ = ["export_onnx"]

_EXTRA = "ONNX export needs the optional extra: pip install 'alambic[onnx]'"
_INPUT, _OUTPUT = "input", "logits"
#: Above this many parameter bytes the weights go to an external data file (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1 << 30


def _require_onnx():
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter translates through it)
    except ImportError as e:
        raise AlambicError(_EXTRA) from e
    return onnxruntime


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints, registration warnings and deprecation warnings."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _other_batch(example_input: Tensor) -> Tensor:
    """A batch of another size than ``example_input``'s, built from its rows (so inputs stay in range)."""
    n = example_input.shape[0]
    other = n + 2 if n < 3 else n - 1
    index = torch.arange(other, device=example_input.device) % n
    return example_input[index].flip(0).contiguous()


def _eager(model: nn.Module, x: Tensor) -> np.ndarray:
    with torch.no_grad():
        out = model(x)
    if not isinstance(out, Tensor):
        raise AlambicError(f"export_onnx: the model must return one tensor, got {type(out).__name__}")
    return out.detach().cpu().float().numpy()


def _compare(session, model: nn.Module, x: Tensor, *, atol: float, rtol: float) -> None:
    expected = _eager(model, x)
    (got,) = session.run(None, {_INPUT: x.detach().cpu().numpy()})
    if got.shape != expected.shape:
        raise AlambicError(
            f"export_onnx: the exported model gives output shape {got.shape} for input {tuple(x.shape)}, "
            f"the eager model {expected.shape}"
        )
    diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    if not np.all(diff <= atol + rtol * np.abs(expected)):
        raise AlambicError(
            f"export_onnx: the exported model disagrees with the eager model on a batch of {x.shape[0]}: "
            f"max abs difference {float(diff.max()):.3g} (atol={atol}, rtol={rtol})"
        )


def export_onnx(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    opset: int | None = None,
) -> Path:
    """Export ``model`` (one tensor in, one tensor out) to ``path`` and verify it with onnxruntime.

    ``example_input`` has a leading batch dimension, exported as dynamic. The model is exported and checked
    in eval mode; its previous train/eval flags are restored afterwards. ``opset`` None uses the exporter's
    default opset. Returns the path. The eager reference runs on the model's device, onnxruntime on the
    CPU. A file that fails its check is deleted, so it cannot be shipped by mistake.
    """
    ort = _require_onnx()
    if not isinstance(example_input, Tensor) or example_input.dim() < 1 or example_input.shape[0] < 1:
        raise AlambicError("export_onnx: example_input must be a tensor with a non-empty leading batch dimension")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with eval_mode(model):
        try:
            with _quiet():
                torch.onnx.export(
                    model,
                    (example_input,),
                    str(path),
                    dynamo=True,
                    input_names=[_INPUT],
                    output_names=[_OUTPUT],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                    opset_version=opset,
                    external_data=param_bytes > _EXTERNAL_DATA_BYTES,
                    verbose=False,
                )
        except Exception as e:  # the exporter raises many types; the user needs the message
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AlambicError(f"export_onnx: torch.onnx.export failed for {type(model).__name__}: {first_line}") from e
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            device = next((p.device for p in model.parameters()), example_input.device)
            for x in (example_input, _other_batch(example_input)):
                _compare(session, model, x.to(device), atol=atol, rtol=rtol)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return path
