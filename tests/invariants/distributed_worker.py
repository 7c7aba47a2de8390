"""Runs recipes in a torchrun process group for tests/invariants/test_distributed.py (not a test itself).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/invariants/distributed_worker.py JOBS.json

JOBS.json is a list of ``{"recipe": {...}, "out": DIR, "kill_at": STEP or null}``, run in order in the same
process group; ``kill_at`` makes rank 1 alone stop (KeyboardInterrupt, as a kill) after that optimizer step,
which ends every process of the group: put such a job last.
"""

from __future__ import annotations

import json
import sys

import torch

import alambic  # noqa: F401  (registers datasets, models, methods)
from alambic.recipe import load_recipe
from alambic.run import run
from tests.conftest import KillAt
from alambic.train import distributed as dist


def main(path: str) -> None:
    torch.set_num_threads(1)
    for job in json.loads(open(path).read()):
        recipe = load_recipe(job["recipe"])
        dist.init(torch.device("cpu"))
        kill = job.get("kill_at")
        callbacks = [KillAt(kill)] if kill is not None and dist.current().rank == 1 else []
        run(recipe, job["out"], progress=False, callbacks=callbacks)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
