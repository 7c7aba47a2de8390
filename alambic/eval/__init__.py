"""Evaluation: classification metrics and efficiency measurements of a trained model."""

from alambic.eval.classification import (
    accuracy,
    agreement,
    eval_mode,
    expected_calibration_error,
    nll,
    predict,
    reliability_bins,
)
from alambic.eval.efficiency import cpu_latency_ms, parameter_count, size_on_disk

__all__ = [
    "accuracy",
    "agreement",
    "cpu_latency_ms",
    "eval_mode",
    "expected_calibration_error",
    "nll",
    "parameter_count",
    "predict",
    "reliability_bins",
    "size_on_disk",
]
