"""A teacher that is a function, not a network: any callable, or a scikit-learn estimator.

Covers the seed papers whose teacher is an algorithm (HOG targets, a controller, a bandit policy) and the
common case of distilling a classical model (random forest, gradient boosting, SVM) into a small network
that exports to ONNX. Outputs are computed without gradients and treated as constants.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from alambic.data.batch import Batch
from alambic.errors import AlambicError
from alambic.teachers.base import ModelOutput


def estimator_logits(estimator: Any, x: Tensor) -> Tensor:
    """Logits from a fitted estimator: ``log predict_proba`` when it has one, else ``decision_function``.

    Class probabilities of exactly 0 (a random forest's leaves) are clipped to 1e-8 so the logits stay
    finite. A binary ``decision_function`` d becomes the two logits ``[0, d]``, whose softmax is the
    logistic of d.
    """
    flat = x.detach().reshape(len(x), -1).cpu().double().numpy()
    if hasattr(estimator, "predict_proba"):
        proba = np.asarray(estimator.predict_proba(flat), dtype=np.float64)
        out = np.log(np.clip(proba, 1e-8, None))
    elif hasattr(estimator, "decision_function"):
        out = np.asarray(estimator.decision_function(flat), dtype=np.float64)
        if out.ndim == 1:
            out = np.stack([np.zeros_like(out), out], axis=1)
    else:
        raise AlambicError(
            f"estimator {type(estimator).__name__} has neither predict_proba nor decision_function"
        )
    return torch.from_numpy(out).to(torch.float32).to(x.device)


class AnalyticTeacher:
    """Wraps ``fn(inputs) -> logits`` (a Tensor or array) or a fitted scikit-learn estimator."""

    def __init__(self, fn: Callable[[Tensor], Any] | Any, fingerprint: str | None = None):
        if callable(fn) and not hasattr(fn, "predict_proba") and not hasattr(fn, "decision_function"):
            self._call = fn
            self._estimator = None
        else:
            self._call = None
            self._estimator = fn
        self._fingerprint = fingerprint
        # whether fingerprint() covers everything the outputs depend on (see there); a given one is trusted
        self.fingerprint_complete = fingerprint is not None

    @torch.no_grad()
    def outputs(self, batch: Batch, views: Sequence[str]) -> dict[str, ModelOutput]:
        outs = {}
        for view in views:
            x = batch.views[view]
            if self._estimator is not None:
                logits = estimator_logits(self._estimator, x)
            else:
                out = self._call(x)
                logits = out if torch.is_tensor(out) else torch.as_tensor(np.asarray(out))
            outs[view] = ModelOutput(logits.detach().to(torch.float32).to(x.device))
        return outs

    def use_taps(self, paths: Sequence[str]) -> None:
        if paths:
            raise AlambicError(f"an analytic teacher has no layers to tap, but the method asks for {list(paths)}")

    def after_step(self, student: nn.Module, step: int) -> None:
        return None

    def fingerprint(self) -> str:
        """16 hex digits naming what this teacher computes (the key of a teacher cache on disk).

        For an estimator, the sha256 of its pickled fitted state (streamed into the hash, never unpickled):
        parameters alone would give two forests of equal parameters but other trees (``random_state=None``)
        one fingerprint. An estimator that cannot be pickled gets a fingerprint of its parameters and fitted
        arrays, which :attr:`fingerprint_complete` marks as not safe to key a disk cache on; so does a plain
        callable (its name says nothing about what it computes)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            if self._estimator is not None:
                est = self._estimator
                h.update(type(est).__module__.encode() + b":" + type(est).__qualname__.encode())
                try:
                    pickle.Pickler(_HashWriter(h), protocol=4).dump(est)
                    self.fingerprint_complete = True
                except Exception:  # a lambda or an open handle inside: parameters and fitted arrays only
                    h = hashlib.sha256(type(est).__qualname__.encode())
                    h.update(json.dumps(est.get_params(deep=False), sort_keys=True, default=repr).encode())
                    for name in sorted(vars(est)):
                        value = getattr(est, name)
                        if name.endswith("_") and isinstance(value, np.ndarray) and value.dtype != object:
                            h.update(name.encode() + np.ascontiguousarray(value).tobytes())
            else:
                h.update(getattr(self._call, "__qualname__", repr(self._call)).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint


class _HashWriter:
    """A file-like sink that feeds what is written to a hash (a pickle streamed without holding it whole)."""

    def __init__(self, h: Any):
        self.h = h

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return len(data)
