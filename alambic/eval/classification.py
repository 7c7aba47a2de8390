"""Classification metrics on logits: accuracy, calibration (ECE, reliability bins), NLL, agreement.

The metric functions are pure functions of tensors (``logits_NC`` [N, C] unnormalised scores,
``target_N`` [N] int64 class ids) returning Python floats, so a user's own loop can call them.
They compute in float64: a metric should not depend on whether the model ran in fp16 or fp32.

:func:`predict` is the one function here that touches a model. It runs under ``torch.no_grad()`` in eval
mode and restores every submodule's previous ``training`` flag afterwards, because evaluating in the middle
of training must not leave dropout off or BatchNorm frozen for the next step (nor switch a deliberately
frozen BatchNorm inside a training student back to train mode).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alambic.errors import AlambicError, ShapeMismatchError

__all__ = [
    "accuracy",
    "agreement",
    "eval_mode",
    "expected_calibration_error",
    "nll",
    "predict",
    "reliability_bins",
]


def _check(logits_NC: Tensor, target_N: Tensor | None = None, *, what: str = "logits") -> None:
    if logits_NC.dim() != 2:
        raise ShapeMismatchError(f"{what} must be [N, C], got shape {tuple(logits_NC.shape)}")
    if logits_NC.shape[0] == 0:
        raise AlambicError(f"{what} is empty (N = 0): a metric over no samples is undefined")
    if target_N is not None and tuple(target_N.shape) != (logits_NC.shape[0],):
        raise ShapeMismatchError(
            f"target must be [N] = [{logits_NC.shape[0]}] to match {what} {tuple(logits_NC.shape)}, "
            f"got {tuple(target_N.shape)}"
        )


def accuracy(logits_NC: Tensor, target_N: Tensor) -> float:
    """Top-1 accuracy: the fraction of samples whose arg-max class equals the target."""
    _check(logits_NC, target_N)
    return (logits_NC.argmax(dim=1) == target_N.to(logits_NC.device)).double().mean().item()


def agreement(logits_a_NC: Tensor, logits_b_NC: Tensor) -> float:
    """Top-1 agreement between two models: the fraction of samples on which their arg-max classes match.

    The student/teacher "fidelity" of Stanton et al., "Does Knowledge Distillation Really Work?", 2021,
    arXiv:2106.05945: a student can gain accuracy while agreeing less with its teacher, so both are reported.
    """
    _check(logits_a_NC, what="logits_a")
    if logits_a_NC.shape != logits_b_NC.shape:
        raise ShapeMismatchError(
            f"agreement needs logits of one shape, got {tuple(logits_a_NC.shape)} and {tuple(logits_b_NC.shape)}"
        )
    top_a, top_b = logits_a_NC.argmax(dim=1), logits_b_NC.argmax(dim=1).to(logits_a_NC.device)
    return (top_a == top_b).double().mean().item()


def nll(logits_NC: Tensor, target_N: Tensor) -> float:
    """Mean negative log-likelihood of the targets under softmax(logits), in nats."""
    _check(logits_NC, target_N)
    return F.cross_entropy(logits_NC.double(), target_N.to(logits_NC.device).long()).item()


def reliability_bins(logits_NC: Tensor, target_N: Tensor, n_bins: int = 15) -> dict[str, list]:
    """Per-bin statistics of a reliability diagram (Guo et al., 2017, arXiv:1706.04599, Sec. 2).

    The confidence of a sample is its maximum softmax probability. Bin m (1-based) holds the samples with
    confidence in ((m-1)/M, m/M], the intervals of the paper, so a confidence of exactly 1.0 falls in the last
    bin and one exactly on an inner edge falls in the lower bin.

    Returns a dict of lists of length ``n_bins``: ``lower`` and ``upper`` (bin edges), ``count`` (ints),
    ``accuracy`` and ``confidence`` (means over the bin; NaN for an empty bin, which has neither).
    """
    _check(logits_NC, target_N)
    if n_bins < 1:
        raise AlambicError(f"n_bins must be >= 1, got {n_bins}")
    prob_NC = logits_NC.double().softmax(dim=1)
    conf_N, pred_N = prob_NC.max(dim=1)
    correct_N = (pred_N == target_N.to(logits_NC.device)).double()
    # ceil(conf * M) - 1 maps ((m-1)/M, m/M] to index m-1; the clamp only matters for conf == 0.
    bin_N = (torch.ceil(conf_N * n_bins).long() - 1).clamp_(0, n_bins - 1)
    count_M = torch.bincount(bin_N, minlength=n_bins)
    sum_correct_M = torch.zeros(n_bins, dtype=torch.float64, device=bin_N.device).index_add_(0, bin_N, correct_N)
    sum_conf_M = torch.zeros(n_bins, dtype=torch.float64, device=bin_N.device).index_add_(0, bin_N, conf_N)
    counts = count_M.tolist()
    return {
        "lower": [m / n_bins for m in range(n_bins)],
        "upper": [(m + 1) / n_bins for m in range(n_bins)],
        "count": counts,
        "accuracy": [s / c if c else math.nan for s, c in zip(sum_correct_M.tolist(), counts)],
        "confidence": [s / c if c else math.nan for s, c in zip(sum_conf_M.tolist(), counts)],
    }


def expected_calibration_error(logits_NC: Tensor, target_N: Tensor, n_bins: int = 15) -> float:
    """Expected calibration error, Guo et al., "On Calibration of Modern Neural Networks", 2017,
    arXiv:1706.04599, Eq. 3: ``ECE = sum_m |B_m|/N * |acc(B_m) - conf(B_m)|`` over ``n_bins`` equal-width
    bins of the max softmax probability (binning as in :func:`reliability_bins`; empty bins contribute 0).
    """
    bins = reliability_bins(logits_NC, target_N, n_bins)
    n = logits_NC.shape[0]
    return sum(
        c / n * abs(acc - conf)
        for c, acc, conf in zip(bins["count"], bins["accuracy"], bins["confidence"])
        if c
    )


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore each submodule's own ``training`` flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _logits_of(output: object) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)  # ModelOutput and Hugging Face outputs carry .logits
    if isinstance(logits, Tensor):
        return logits
    raise AlambicError(
        f"predict: the model returned {type(output).__name__}; expected a tensor of logits "
        "or an object with a .logits tensor"
    )


def predict(model: nn.Module, batches: Iterable[Tensor]) -> Tensor:
    """Run ``model`` over an iterable of input tensors and return the concatenated logits on the CPU.

    Runs under ``torch.no_grad()`` in eval mode (dropout off, BatchNorm on running statistics) and restores
    the previous train/eval flags afterwards. Each input is moved to the device of the model's first
    parameter (or buffer), if it has one.
    """
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    device = tensor.device if tensor is not None else None
    outputs = []
    with eval_mode(model), torch.no_grad():
        for x in batches:
            if device is not None:
                x = x.to(device)
            outputs.append(_logits_of(model(x)).detach().cpu())
    if not outputs:
        raise AlambicError("predict: no batches were given")
    return torch.cat(outputs, dim=0)
