"""Each rank's gradients through :func:`alambic.train.distributed.average_gradients`, for
tests/invariants/test_gradient_average.py (not a test itself):

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/invariants/gradient_average_worker.py OUT

Parameter ``both`` gets a gradient on every rank, ``first`` on rank 0 only, ``none`` on no rank; an AdamW step
with weight decay follows. Each rank writes ``OUT.<rank>.json``.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

from alambic.train import distributed as dist


def main(out: str) -> None:
    world = dist.init(torch.device("cpu"))
    rank = world.rank
    params = {name: nn.Parameter(torch.ones(3)) for name in ("both", "first", "none")}
    (params["both"] * (rank + 1.0)).sum().backward()
    if rank == 0:
        (params["first"] * 4.0).sum().backward()
    loss = dist.average_gradients(list(params.values()), torch.tensor([float(rank + 1)]))
    grads = {k: (None if p.grad is None else p.grad.tolist()) for k, p in params.items()}
    torch.optim.AdamW(list(params.values()), lr=0.1, weight_decay=0.5).step()
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"grads": grads, "extra": loss.tolist(), "after": {k: p.tolist() for k, p in params.items()}}, f)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
