"""Several processes, one run: ``torchrun --nproc-per-node N -m alambic run RECIPE --out DIR``.

What stays the same as one process (DDP: Li et al., "PyTorch Distributed: Experiences on Accelerating Data
Parallel Training", 2020, arXiv:2006.15704):

- **the global batch.** ``train.batch_size`` is the global batch. Every rank walks the same loader order (a
  pure function of (seed, epoch)) and keeps a contiguous slice of each global batch (:func:`shard`: rank r
  takes rows ``[r·B/N, (r+1)·B/N)``, sizes differing by at most one), so the N slices, in rank order, are the
  one-process batch, augmentations included (a batch's views are drawn from its own seeded generator
  before it is sliced).
- **the gradient.** After the local backward, :func:`average_gradients` averages the gradients of every
  trained parameter, the student's and the method's own (projectors, regressors), in one flat all-reduce.
  Not DDP's module wrapper: methods call the student once per view before one backward, leave parameters
  unused (SEED never reads the classifier) or change which ones they train between phases (FitNets'
  hint stage), and own parameters outside the student, all of which DDP's reducer refuses or misses; the
  flat all-reduce gives up DDP's overlap of communication with the backward (what large GPU models gain
  from; see benchmarks/ddp_overhead.py for the cost on small ones). Each rank scales its loss by ``N · B_r / B`` (:func:`loss_weight`), so the mean over ranks is the mean over
  the global batch's rows even when the last batch of an epoch does not split evenly (nothing is
  dropped). This holds for losses that are means over rows; a loss over pairs of rows within the batch
  (RKD, SP, CRD's in-batch terms) sees only its rank's rows, as in every DDP implementation.
- **state a method keeps across batches** is reduced where the paper's code does: DINO's center
  (the sum of teacher outputs over ranks / the global row count), SEED's queue (the all-gathered
  batch, in rank order). A method that keeps such state without reducing it refuses to run on several
  processes (``Method.distributed_safe = False``), rather than train something else silently.
- **one writer.** Rank 0 writes metrics, checkpoints, the report; the other ranks wait at barriers. A
  checkpoint holds every rank's torch RNG state, so a resume with the same N replays the same steps.

BatchNorm normalises with its rank's rows (rank 0's running statistics are broadcast before each step, as
DDP's ``broadcast_buffers`` does), so a student with BatchNorm matches the one-process run only
statistically, unless ``train.sync_batchnorm`` (:mod:`alambic.train.sync_batchnorm`: the global batch's
statistics, on gloo too). ``train.shard: fsdp`` shards the student instead of replicating it
(:mod:`alambic.train.fsdp`). gloo on CPUs, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from alambic.errors import AlambicError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> World:
    """The torchrun world (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process without them."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise AlambicError(f"torchrun's environment is malformed ({exc})") from None
    return World(rank, size, local)


def init(device: torch.device | None = None) -> World:
    """Join torchrun's process group (gloo for CPUs, NCCL for CUDA) once; a no-op for one process."""
    world = from_env()
    if world.size <= 1 or dist.is_initialized():
        return current()
    backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                            timeout=datetime.timedelta(minutes=10))
    return current()


def rank_device(device: torch.device) -> torch.device:
    """``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per process); other devices as given."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", from_env().local_rank if from_env().size > 1 else torch.cuda.current_device())
    return device


def torchrun_command(nproc: int, args: Sequence[str]) -> list[str]:
    """``torchrun --standalone --nproc-per-node N ARGS`` with this interpreter (``python -m
    torch.distributed.run``: the torch alambic runs on, a free rendezvous port on each launch)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def launch(nproc: int, args: Sequence[str], *, timeout: float | None = None, cwd: str | Path | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run :func:`torchrun_command` to completion, output captured; the launched processes import this copy
    of alambic (its folder leads ``PYTHONPATH``), as do tests and ``alambic bench``'s cells."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([root, *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    return subprocess.run(torchrun_command(nproc, args), cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def current() -> World:
    if not active():
        return World()
    return World(dist.get_rank(), dist.get_world_size(), from_env().local_rank)


def active() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def shard(n: int, world: World) -> slice:
    """Rows of a global batch of ``n`` that rank ``world.rank`` takes: contiguous, sizes differing by at most
    one (the first ``n % N`` ranks take one more), in rank order."""
    base, extra = divmod(n, world.size)
    start = world.rank * base + min(world.rank, extra)
    return slice(start, start + base + (1 if world.rank < extra else 0))


def loss_weight(local: int, total: int, world: World) -> float:
    """``N · B_r / B``: DDP's mean over ranks of the weighted local means is the mean over the global batch."""
    return world.size * local / total


def all_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over ranks (a new tensor; ``t`` itself when alone)."""
    if not active():
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def gather_rows(t: Tensor) -> Tensor:
    """The rows of ``t`` [B_r, ...] of every rank, concatenated in rank order (ranks may hold different B_r)."""
    if not active():
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    most = int(max(int(s) for s in sizes))
    padded = t.new_zeros((most, *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def average_gradients(params: Iterable[nn.Parameter], extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Mean of the gradients of ``params`` over ranks, in one flat all-reduce (for parameters outside DDP's
    module: a method's projectors). A parameter without a gradient on this rank counts as zero where another
    rank has one; a parameter no rank gave a gradient keeps ``grad = None``, as in one process, so that the
    optimizer leaves it alone (a zero gradient would still move it through weight decay and momentum).

    ``extra`` (a float vector, e.g. the step's weighted loss and terms) rides in the same all-reduce and comes
    back summed over ranks: one collective per step instead of two."""
    if not active():
        return extra
    params = [p for p in params if p.requires_grad]
    if not params:
        return _summed(extra)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    like = grads[0]
    uniform = all(g.dtype == like.dtype and g.device == like.device for g in grads)
    # which ranks hold a gradient, per parameter: in the same all-reduce when the dtypes allow it
    held = torch.tensor([float(p.grad is not None) for p in params], dtype=like.dtype if uniform else torch.float32,
                        device=like.device)
    parts = [g.reshape(-1) for g in grads]
    if uniform:
        parts.append(held)
    else:
        held = _summed(held)
    together = uniform and extra is not None and extra.dtype == like.dtype and extra.device == like.device
    if together:
        parts.append(extra.reshape(-1))
    else:
        extra = _summed(extra)
    flat = torch.cat(parts)
    n = sum(g.numel() for g in grads)
    size = dist.get_world_size()
    # N a power of two: scaled by 1/N before the all-reduce, while ``flat`` is hot in this core's cache (after
    # the all-reduce the first pass over it costs several times more); scaling by a power of two is exact and
    # commutes with the rounding of each addition, so sum(g·(1/N)) is sum(g)/N bit for bit (gradients below
    # 2^-125, where the scaled value turns subnormal, aside). Other N: the sum, then one division, as before.
    scale_first = size & (size - 1) == 0
    if scale_first:
        flat[:n].mul_(1.0 / size)
    dist.all_reduce(flat)
    if not scale_first:
        flat[:n].div_(size)  # in place, once: each gradient is a view of ``flat``
    if uniform:
        held = flat[n: n + len(params)]
    # read on the host only where this rank lacked a gradient (a rank with every one keeps every one: no sync)
    kept = [True] * len(params) if all(p.grad is not None for p in params) else [h > 0 for h in held.tolist()]
    for p, g, piece, keep in zip(params, grads, flat[:n].split([g.numel() for g in grads]), kept):
        p.grad = piece.view_as(g) if keep else None
    return flat[n + len(params):] if together else extra


def _summed(t: torch.Tensor | None) -> torch.Tensor | None:
    """A copy of ``t`` summed over ranks (None stays None)."""
    if t is None:
        return None
    t = t.clone()
    dist.all_reduce(t)
    return t


def broadcast_module(module: nn.Module) -> None:
    """Rank 0's parameters and buffers on every rank (a method's heads built after seeding, in setup)."""
    if not active():
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, 0)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


def shutdown() -> None:
    """Leave the process group, every rank together: a barrier first, so that no rank tears its gloo pairs down
    while another still holds them (a rank then died of SIGABRT at exit, "terminate called without an active
    exception", after its work had finished)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def batchnorm_buffers(*modules: nn.Module) -> list[Tensor]:
    """The floating-point running statistics of the BatchNorm layers under ``modules`` that are not
    synchronised (a :class:`~alambic.train.sync_batchnorm.SyncBatchNorm` keeps every rank's identical)."""
    from alambic.train.sync_batchnorm import SyncBatchNorm

    return [b for m in modules for bn in m.modules()
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and not isinstance(bn, SyncBatchNorm)
            for b in bn.buffers() if b.dtype.is_floating_point]


def broadcast_buffers(*modules: nn.Module, bufs: list[Tensor] | None = None) -> None:
    """Rank 0's BatchNorm running statistics on every rank, in one flat broadcast, as DDP's
    ``broadcast_buffers`` does before each forward (other buffers, a method's reduced state, are left alone).
    ``bufs``: :func:`batchnorm_buffers` listed once (the loop's per-step call walks no modules)."""
    if not active():
        return
    bufs = batchnorm_buffers(*modules) if bufs is None else bufs
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1).float() for b in bufs])
    dist.broadcast(flat, 0)
    offset = 0
    for b in bufs:
        b.copy_(flat[offset : offset + b.numel()].view_as(b))
        offset += b.numel()
