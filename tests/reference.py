"""Reference math in NumPy (float64) that tests compare alambic's torch code against.

Written independently of the code under test, straight from the equations: a softmax, the
cross-entropy over labelled rows, and Hinton's T²-scaled KL.
"""

from __future__ import annotations

import math

import numpy as np

from alambic.data.batch import IGNORE_INDEX


def np_softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_ce(logits, target) -> float:
    """Mean of −log p[i, y_i] over the rows whose target is a label; 0 when there is none."""
    rows = [(i, y) for i, y in enumerate(target) if y != IGNORE_INDEX]
    p = np_softmax(logits)
    return float(np.mean([-math.log(p[i, y]) for i, y in rows])) if rows else 0.0


def np_kd(s, t, temp) -> float:
    """``T² · mean_i Σ_c p_t log(p_t / p_s)`` at temperature T (Hinton et al. 2015)."""
    p_s, p_t = np_softmax(np.asarray(s, dtype=np.float64) / temp), np_softmax(np.asarray(t, dtype=np.float64) / temp)
    return float(temp**2 * (p_t * np.log(p_t / p_s)).sum(-1).mean())
