"""The networks a distillation samples, trains and reads features from, and its seeded random streams.

Every draw of a distillation (which pool model, which real batch, the weights of a fresh network, an
augmentation) comes from a generator seeded by ``(seed, stream, step, ...)`` alone, never from the global
RNG's history: a run resumed at step ``s`` draws exactly what the uninterrupted run drew at step ``s``, so
resume needs no RNG state in the checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import Tensor, nn

from alambic.models.taps import resolve_module

STREAMS = {"init": 0, "pool": 1, "step": 2, "network": 3, "augment": 4}


def derived_seed(seed: int, stream: str, *parts: int) -> int:
    """A 63-bit seed from the user seed, a named stream and integers (step, model id, reset count)."""
    text = ":".join(str(p) for p in (int(seed), STREAMS[stream], *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, stream: str, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derived_seed(seed, stream, *parts))


def fresh(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``build()`` with torch's global RNG at ``seed`` for the weight initialisation, then restored."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def embed(model: nn.Module, x: Tensor, feature: str | None) -> Tensor:
    """[B, D]: the output of ``model``'s submodule at dotted path ``feature`` (None: the model's output),
    flattened after dim 0, *with* its autograd graph (the gradient reaches ``x``)."""
    if feature is None:
        out = model(x)
        return out.reshape(out.shape[0], -1)
    captured: list[Tensor] = []
    handle = resolve_module(model, feature).register_forward_hook(lambda _m, _i, o: captured.append(o))
    try:
        model(x)
    finally:
        handle.remove()
    out = captured[-1]
    return out.reshape(out.shape[0], -1)
