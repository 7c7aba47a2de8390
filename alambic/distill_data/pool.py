"""KRR-ST's model pool: networks trained online on the synthetic set, each reset to fresh weights when it
reaches its age limit.

Lee et al., "Self-Supervised Dataset Distillation for Transfer Learning" (KRR-ST), ICLR 2024,
arXiv:2310.06511, Algorithm 1: the outer loss is computed with the features of a model drawn from a pool
of ``num_models`` networks; after each outer step the drawn model takes one optimiser step on
``MSE(model(X_s), Y_s)``, and a model that has taken ``max_age`` steps is replaced by a freshly
initialised one, so the pool always covers networks early and late in training on the current set. At
the start each model is trained for a random number of steps in ``[1, max_age)`` (staggered ages).

**The official code's reset bug** (db-Lee/selfsup_dd, ``model_pool.py``, ``ModelPool.update``): when
``iterations[idx] >= online_iteration`` it builds a new model and optimiser but never sets
``iterations[idx]`` back to 0. From then on every draw of that model finds the counter still at the
limit and re-initialises it again, without ever training it: after its first reset, each pool member is
a freshly initialised, untrained network forever, and the outer loss sees only random-feature kernels.
Here a reset sets the age to 0 and the fresh model then takes its step, as the algorithm describes; the
number of resets of each slot is kept (it also seeds the fresh weights, so a resumed run rebuilds them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from alambic.distill_data.networks import derived_seed, fresh
from alambic.errors import AlambicError


class ModelPool:
    """``size`` networks from ``build()`` (weights seeded by ``(seed, slot, resets)``), each with its own SGD
    optimiser (lr, momentum 0.9, weight decay), trained online on ``MSE(model(x), y)``."""

    def __init__(self, build: Callable[[], nn.Module], size: int, max_age: int, seed: int, *, lr: float = 0.1,
                 momentum: float = 0.9, weight_decay: float = 1e-3, device: torch.device | str = "cpu"):
        if size < 1 or max_age < 1:
            raise AlambicError(f"model pool: size and max_age must be >= 1, got {size} and {max_age}")
        self.build, self.size, self.max_age, self.seed = build, size, max_age, int(seed)
        self.lr, self.momentum, self.weight_decay, self.device = lr, momentum, weight_decay, device
        self.ages = [0] * size
        self.resets = [0] * size
        self.models: list[nn.Module] = []
        self.opts: list[torch.optim.Optimizer] = []
        for slot in range(size):
            model, opt = self._new(slot)
            self.models.append(model)
            self.opts.append(opt)

    def _new(self, slot: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = fresh(self.build, derived_seed(self.seed, "pool", slot, self.resets[slot])).to(self.device)
        opt = torch.optim.SGD(model.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        return model, opt

    def reset(self, slot: int) -> None:
        """Fresh weights and optimiser for ``slot``; its age goes back to 0 (the official code forgot this)."""
        self.resets[slot] += 1
        self.models[slot], self.opts[slot] = self._new(slot)
        self.ages[slot] = 0

    def train_step(self, slot: int, x: Tensor, y: Tensor) -> float:
        """One SGD step of ``slot`` on ``MSE(model(x), y)`` (train mode; x and y are constants)."""
        model, opt = self.models[slot], self.opts[slot]
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x.detach()), y.detach())
        loss.backward()
        opt.step()
        self.ages[slot] += 1
        return float(loss.detach())

    def update(self, slot: int, x: Tensor, y: Tensor) -> float:
        """After an outer step that used ``slot``: reset it if it has reached ``max_age`` steps, then train it
        one step."""
        if self.ages[slot] >= self.max_age:
            self.reset(slot)
        return self.train_step(slot, x, y)

    def warm_up(self, x: Tensor, y: Tensor, generator: torch.Generator) -> None:
        """Train each slot for a random number of steps in ``[1, max_age)`` (1 when max_age <= 2)."""
        for slot in range(self.size):
            steps = 1 if self.max_age <= 2 else int(torch.randint(1, self.max_age, (1,), generator=generator))
            for _ in range(steps):
                self.train_step(slot, x, y)

    # -- checkpoint ----------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        from alambic.train.state import module_state, optimizer_state, prefixed

        tensors: dict[str, Tensor] = {}
        opts = []
        for slot, (model, opt) in enumerate(zip(self.models, self.opts)):
            tensors.update(prefixed(f"pool.{slot}.model", module_state(model)))
            t, m = optimizer_state(opt)
            tensors.update(prefixed(f"pool.{slot}.opt", t))
            opts.append(m)
        return tensors, {"ages": list(self.ages), "resets": list(self.resets), "opts": opts}

    def load_state(self, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
        from alambic.train.state import load_optimizer_state, unprefixed

        self.ages, self.resets = [int(a) for a in meta["ages"]], [int(r) for r in meta["resets"]]
        for slot in range(self.size):
            self.models[slot], self.opts[slot] = self._new(slot)
            self.models[slot].load_state_dict(unprefixed(f"pool.{slot}.model", tensors))
            load_optimizer_state(self.opts[slot], unprefixed(f"pool.{slot}.opt", tensors), meta["opts"][slot])
