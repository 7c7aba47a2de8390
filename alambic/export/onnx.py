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
difference. :func:`export_onnx_checked` also returns what the check found (:class:`OnnxCheck`), for a
command to print; with ``require_onnxruntime=False`` a missing onnxruntime skips the check (and says so)
instead of failing the export.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from alambic.errors import AlambicError
from alambic.eval.classification import eval_mode

__all__ = ["OnnxCheck", "export_onnx", "export_onnx_checked"]

_EXTRA = "ONNX export needs the optional extra: pip install 'alambic[onnx]'"
_INPUT, _OUTPUT = "input", "logits"
#: Above this many parameter bytes the weights go to an external data file (protobuf's 2 GiB limit).
_EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class OnnxCheck:
    """What the onnxruntime check of an export found: the batches compared, the largest absolute
    difference from the eager model and the tolerance; or, when it did not run, why (``skipped``)."""

    batch_sizes: tuple[int, ...] = ()
    max_abs_diff: float | None = None
    atol: float = 0.0
    rtol: float = 0.0
    runtime: str = ""  # onnxruntime's version
    skipped: str | None = None

    def __str__(self) -> str:
        if self.skipped is not None:
            return f"not checked against PyTorch: {self.skipped}"
        sizes = " and ".join(str(n) for n in self.batch_sizes)
        return (f"checked with onnxruntime {self.runtime} on {len(self.batch_sizes)} inputs (batches of {sizes}): "
                f"max |Δ| {self.max_abs_diff:.2g} (tolerance {self.atol:g} + {self.rtol:g}·|eager|)")


def _require_onnx(require_onnxruntime: bool = True):
    """onnxruntime, or None when it is missing and not required; onnx and onnxscript are always needed."""
    try:
        import onnx  # noqa: F401  (the exporter needs it)
        import onnxscript  # noqa: F401  (the dynamo exporter translates through it)
    except ImportError as e:
        raise AlambicError(_EXTRA) from e
    try:
        import onnxruntime
    except ImportError as e:
        if require_onnxruntime:
            raise AlambicError(_EXTRA) from e
        return None
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


def _compare(session, model: nn.Module, x: Tensor, *, atol: float, rtol: float, input_name: str = _INPUT) -> float:
    """The largest absolute difference between onnxruntime and the eager model on ``x``; raises beyond
    the tolerance."""
    expected = _eager(model, x)
    (got,) = session.run(None, {input_name: x.detach().cpu().numpy()})
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
    return float(diff.max()) if diff.size else 0.0


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
    return export_onnx_checked(model, example_input, path, atol=atol, rtol=rtol, opset=opset)[0]


def export_onnx_checked(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    opset: int | None = None,
    require_onnxruntime: bool = True,
    dynamic_dims: dict[int, str] | None = None,
    check_inputs: tuple[Tensor, ...] | None = None,
    input_name: str = _INPUT,
) -> tuple[Path, OnnxCheck]:
    """:func:`export_onnx`, returning also what the check found. Without onnxruntime and with
    ``require_onnxruntime=False`` the file is exported unchecked and the :class:`OnnxCheck` says why.

    ``dynamic_dims`` names the input's dynamic dimensions (default ``{0: "batch"}``; a causal LM adds
    ``{1: "sequence"}``), ``check_inputs`` the inputs compared with onnxruntime (default ``example_input`` and a
    batch of another size), ``input_name`` the graph's input (``input_ids`` for a causal LM)."""
    ort = _require_onnx(require_onnxruntime)
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
                    input_names=[input_name],
                    output_names=[_OUTPUT],
                    dynamic_shapes=({d: torch.export.Dim(n) for d, n in (dynamic_dims or {0: "batch"}).items()},),
                    opset_version=opset,
                    external_data=param_bytes > _EXTERNAL_DATA_BYTES,
                    verbose=False,
                )
        except Exception as e:  # the exporter raises many types; the user needs the message
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AlambicError(f"export_onnx: torch.onnx.export failed for {type(model).__name__}: {first_line}") from e
        if ort is None:
            return path, OnnxCheck(atol=atol, rtol=rtol, skipped="onnxruntime is not installed "
                                   "(pip install onnxruntime, or pip install 'alambic[onnx]')")
        try:
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            device = next((p.device for p in model.parameters()), example_input.device)
            batches = tuple(check_inputs) if check_inputs else (example_input, _other_batch(example_input))
            worst = max(_compare(session, model, x.to(device), atol=atol, rtol=rtol, input_name=input_name)
                        for x in batches)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
    return path, OnnxCheck(tuple(int(x.shape[0]) for x in batches), worst, atol, rtol, ort.__version__)
