"""BatchNorm whose batch statistics are those of the global batch, on any device and backend (gloo included).

``train.sync_batchnorm: true`` with several processes converts the trained BatchNorm layers (the student's
and the method's heads) to :class:`SyncBatchNorm`. torch's own ``nn.SyncBatchNorm`` refuses CPU tensors
("expected input tensor to be on GPU or XPU", torch 2.13), so this is a small replacement: in training mode
each rank computes, per channel, its row count ``n_r``, mean ``m_r`` and sum of squared deviations ``M2_r``;
one all-gather brings every rank's three, combined as Chan et al. ("Updating formulae and a pairwise
algorithm for computing sample variances", 1979):

    n = Σ n_r,   mean = Σ n_r m_r / n,   M2 = Σ (M2_r + n_r (m_r − mean)²),   var = M2 / n

(no E[x²] − E[x]² cancellation), then normalises its rows with the global mean and variance, and updates the
running statistics with them (the unbiased variance M2 / (n − 1), as BatchNorm does): every rank's running
statistics stay identical. The gradient flows through the gathered statistics (the backward of the
all-gather all-reduces the gradient of every rank's statistics), so the gradients are those of the
one-process batch: Ioffe & Szegedy, "Batch Normalization", 2015, arXiv:1502.03167, computed over all ranks'
rows as Peng et al.'s cross-GPU BatchNorm ("MegDet", 2018, arXiv:1711.07240).

One process, or evaluation mode: plain ``F.batch_norm``. The state_dict keys are BatchNorm's, so checkpoints
and exports are unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import Tensor, nn

from alambic.train import distributed as dist


class _GatherRows(torch.autograd.Function):
    """``[N, ...]``: every rank's ``x`` stacked in rank order; backward: the sum over ranks of the gradient of
    this rank's row (each rank's loss read every rank's statistics)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        tdist.all_reduce(grad)
        return grad[tdist.get_rank()]


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the rows of every rank (1d, 2d or 3d: channels on dim 1)."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training or not self.track_running_stats) or not dist.active():
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        n_r = x.new_tensor(float(x.numel() // x.shape[1]))
        xf = x.float()
        m_r = xf.mean(dims)
        m2_r = ((xf - m_r.view(1, -1, *[1] * (x.dim() - 2))) ** 2).sum(dims)
        stats = _GatherRows.apply(torch.cat([n_r.float().reshape(1), m_r, m2_r]))  # [N, 1 + 2C]
        c = x.shape[1]
        counts, means, m2s = stats[:, :1], stats[:, 1 : 1 + c], stats[:, 1 + c :]
        n = counts.sum()
        mean = (counts * means).sum(0) / n
        var_sum = (m2s + counts * (means - mean) ** 2).sum(0)
        var = var_sum / n
        if self.training and self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased = var_sum / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(mean.to(self.running_mean.dtype), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(unbiased.to(self.running_var.dtype), alpha=momentum)
        shape = (1, -1, *[1] * (x.dim() - 2))
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> int:
    """Replace every BatchNorm layer under ``module`` with :class:`SyncBatchNorm`, in place, keeping its
    parameters and buffers (the same tensors: taps, optimizers and checkpoints see no change); returns how
    many were converted."""
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, SyncBatchNorm):
                sync = SyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                     child.track_running_stats)
                for key in ("weight", "bias"):
                    setattr(sync, key, getattr(child, key))
                for key in ("running_mean", "running_var", "num_batches_tracked"):
                    sync._buffers[key] = child._buffers.get(key)
                sync.train(child.training)
                setattr(parent, name, sync)
                count += 1
    return count
