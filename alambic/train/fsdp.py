"""``train.shard: fsdp``: the student's parameters, gradients and optimizer state sharded over ranks (FSDP2).

PyTorch's ``fully_shard`` (Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel",
2023, arXiv:2304.11277; FSDP2 = per-parameter DTensor sharding) is applied to each top-level child of the
student that holds parameters, then to the student itself: each rank keeps ``1/N`` of every parameter (dim 0),
all-gathers a child's parameters just before its forward (and again in the backward) and reduce-scatters
its gradients, averaged over ranks. It runs on CPUs with gloo (torch 2.13; checked by
tests/invariants/test_sync_fsdp.py) and on CUDA with NCCL.

What the loop does around it:

- the method's own parameters (heads, projectors) are not sharded; their gradients are averaged by the
  loop's flat all-reduce as before, and each rank's loss is weighted by its share of rows as before;
- **checkpoints hold full tensors** (every rank all-gathers, rank 0 writes one ordinary checkpoint): the
  same file format as an unsharded run, and a resume re-shards them (:func:`load_full_state`,
  :func:`shard_optimizer_state`);
- validation runs on every rank while the student is sharded (its forwards are collectives), rank 0 writes;
- at the end of ``fit`` :func:`consolidate` turns the student back into an ordinary module holding full
  tensors on every rank, so evaluation, export and ``student.safetensors`` are those of any run.

The frozen teacher is not sharded (it runs under ``no_grad``; sharding it is left to a GPU machine's needs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from alambic.train import distributed as dist


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def shard(student: nn.Module, device: torch.device) -> None:
    """``fully_shard`` each top-level child holding parameters, then the root (its remaining parameters)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.current().size,))
    for child in student.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    fully_shard(student, mesh=mesh)


def is_sharded(p: Tensor) -> bool:
    return isinstance(p, _dtensor())


def full_module_state(module: nn.Module) -> dict[str, Tensor]:
    """The module's state_dict with every sharded tensor all-gathered (a collective: every rank calls it)."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach().clone() for k, v in module.state_dict().items()}


def load_full_state(module: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Load full tensors into a sharded module: each rank keeps its shard (every rank holds the full file)."""
    from torch.distributed.tensor import distribute_tensor

    current = module.state_dict()
    out = {}
    for k, v in tensors.items():
        cur = current.get(k)
        out[k] = (distribute_tensor(v.to(cur.device, cur.dtype), cur.device_mesh, cur.placements)
                  if cur is not None and is_sharded(cur) else v)
    module.load_state_dict(out)


class _FullOptimizer:
    """An optimizer whose ``state_dict`` holds full tensors (for :func:`alambic.train.state.optimizer_state`)."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt = opt

    def state_dict(self) -> dict[str, Any]:
        sd = self.opt.state_dict()
        for pid in sorted(sd["state"]):  # the same order on every rank: the all-gathers pair up
            sd["state"][pid] = {k: (v.full_tensor() if is_sharded(v) else v) for k, v in sd["state"][pid].items()}
        return sd


def full_optimizer(opt: torch.optim.Optimizer) -> _FullOptimizer:
    return _FullOptimizer(opt)


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After ``load_state_dict`` of full tensors: each sharded parameter's state tensors re-sharded like it."""
    from torch.distributed.tensor import distribute_tensor

    for p, state in opt.state.items():
        if not is_sharded(p):
            continue
        for k, v in list(state.items()):
            if torch.is_tensor(v) and not is_sharded(v) and tuple(v.shape) == tuple(p.shape):
                state[k] = distribute_tensor(v.to(p.device, v.dtype), p.device_mesh, p.placements)


def consolidate(student: nn.Module) -> None:
    """Undo ``fully_shard`` in place: full parameters on every rank (a collective), the module's own class and
    none of FSDP's hooks (the user's and the taps' stay). After it the student is an ordinary module."""
    from torch.distributed.fsdp import FSDPModule

    for m in list(student.modules()):  # the same order on every rank: the all-gathers pair up
        for name, p in list(m.named_parameters(recurse=False)):
            if is_sharded(p):  # a sharded child's parameters sit in its submodules too
                setattr(m, name, nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad))
        if isinstance(m, FSDPModule):
            m.__class__ = next(c for c in type(m).__mro__[1:] if not issubclass(c, FSDPModule))
    for m in student.modules():
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            for key in [k for k, h in hooks.items() if "fsdp" in getattr(h, "__module__", "") + repr(h)]:
                del hooks[key]
