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

``teacher.shard: fsdp`` shards a frozen network teacher the same way (:func:`shard_teacher`), independently of
the student: each decoder layer (a transformers causal LM) or else each top-level child holding parameters is
one unit, then the root, all with ``reshard_after_forward=True`` (passed explicitly: FSDP2 otherwise keeps the
root's parameters, an LM's embeddings and output layer, gathered after the forward, for a backward that a
teacher never runs). Each rank keeps ``1/N`` of the teacher; its forward, under ``no_grad`` and in eval mode,
all-gathers one unit at a time and frees it after, so the teacher's peak is one gathered unit plus the shards.
No gradient, no reduce-scatter and no optimizer state: the teacher stays frozen. Every forward is a collective,
so every rank must run the teacher the same number of times: the loop splits every rank's rows into the same
number of ``grad_accum`` chunks, validation runs on every rank, and the recipe refuses teachers that run
conditionally (a cache, which runs only on rows it has not seen). At the end of ``fit`` :func:`consolidate`
gathers the teacher back into an ordinary module (evaluation and the report run it on rank 0 alone).
The teacher is loaded whole on every rank before it is sharded, so sharding lowers its memory during training,
not the peak at load.
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


def teacher_units(model: nn.Module) -> list[nn.Module]:
    """The modules of a teacher each sharded as one unit: a causal LM's decoder layers (behind
    :class:`~alambic.models.causal_lm.CausalLMLogits` or bare), else the top-level children holding parameters.
    The rest (an LM's embeddings, tied output layer and final norm) belong to the root unit."""
    from alambic.models.causal_lm import LanguageModelError, decoder_layers

    for candidate in (getattr(model, "lm", None), model):
        if isinstance(candidate, nn.Module):
            try:
                return list(decoder_layers(candidate))
            except LanguageModelError:
                pass
    return [child for child in model.children() if any(True for _ in child.parameters())]


def shard_teacher(model: nn.Module, device: torch.device) -> None:
    """``fully_shard`` a frozen teacher over every rank (``teacher.shard: fsdp``; see the module docstring)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.current().size,))
    for unit in teacher_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    model.register_forward_hook(_forget_forward_order)  # after FSDP's own post-forward hook


def _forget_forward_order(module: nn.Module, args: Any, output: Any) -> None:
    """FSDP2 (torch 2.13) records every unit's forward for the backward's prefetch order and clears the record
    only at the end of a backward, which a teacher never runs: without this it grows by one entry per unit and
    forward for the whole run. Private state, so a torch that renames it is left alone."""
    try:
        state = module._get_fsdp_state()
        state._comm_ctx.post_forward_order.clear()
        for s in state._state_ctx.all_states:
            for group in s._fsdp_param_groups:
                group._post_forward_indices.clear()
    except AttributeError:
        pass


def teacher_models(teacher: Any) -> list[nn.Module]:
    """The networks to shard: the teacher's own or each ensemble member's, where it asks (``shard == "fsdp"``).
    A sharded teacher behind a cache is refused in one line: the cache runs it only on rows it has not seen."""
    from alambic.errors import AlambicError

    out = []
    for t in getattr(teacher, "teachers", None) or ([teacher] if teacher is not None else []):
        if getattr(getattr(t, "teacher", None), "shard", "none") == "fsdp":
            raise AlambicError(f"teacher.shard: fsdp behind {type(t).__name__}: it runs the teacher only on the rows it "
                               "has not cached, a different number of forwards on each rank; use cache: off")
        if getattr(t, "shard", "none") == "fsdp":
            out.append(t.model)
    return out


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
