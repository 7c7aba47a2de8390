"""Runs recipes in a torchrun process group for tests/invariants/test_distributed.py (not a test itself).

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/invariants/distributed_worker.py JOBS.json

JOBS.json is a list of ``{"recipe": {...}, "out": DIR, "kill_at": STEP or null}``, run in order in the same
process group; ``kill_at`` makes rank 1 alone stop (KeyboardInterrupt, as a kill) after that optimizer step,
which ends every process of the group: put such a job last. ``"probe": PATH`` records each rank's sharded
teacher into ``PATH.<rank>.json`` (:class:`TeacherProbe`).
"""

from __future__ import annotations

import json
import sys

import torch

import alambic  # noqa: F401  (registers datasets, models, methods)
from alambic.recipe import load_recipe
from alambic.run import run
from alambic.train import Callback, fsdp
from alambic.train import distributed as dist
from tests.conftest import KillAt


class TeacherProbe(Callback):
    """This rank's view of a sharded teacher (``teacher.shard: fsdp``) while it trains: local and full parameter
    counts, whether anything asks for or holds a gradient, how far its local shard moved from the start, and the
    teacher forwards run by the end of each step (a forward pre-hook on the teacher's root)."""

    def __init__(self, path: str):
        self.path, self.forwards, self.record = path, 0, {"forwards": [], "grads": 0}

    def _count(self, *_):
        self.forwards += 1

    def on_fit_start(self, trainer, resumed):
        (model,) = trainer.sharded_teachers
        params = list(model.parameters())
        self.start = [p.to_local().clone() for p in params]
        self.record.update(
            local=sum(p.to_local().numel() for p in params), full=sum(p.numel() for p in params),
            all_sharded=all(fsdp.is_sharded(p) for p in params), requires_grad=any(p.requires_grad for p in params),
            training=model.training)
        model.register_forward_pre_hook(self._count)

    def on_step_end(self, trainer, step, logs):
        self.record["forwards"].append(self.forwards)
        # FSDP registers the gathered tensors as the module's parameters while a unit is unsharded: after the
        # step every unit, the root (an LM's embeddings and output layer) included, holds its shards again
        self.record["resharded"] = self.record.get("resharded", True) and all(
            fsdp.is_sharded(p) for p in trainer.sharded_teachers[0].parameters())
        self.record["grads"] += sum(p.grad is not None for p in trainer.sharded_teachers[0].parameters())

    def on_epoch_end(self, trainer, epoch, val):
        if epoch == trainer.epochs:
            now = [p.to_local() for p in trainer.sharded_teachers[0].parameters()]
            self.record["moved"] = max(float((a - b).abs().max()) for a, b in zip(self.start, now))
            self.record["forwards_end"] = self.forwards
            with open(f"{self.path}.{dist.current().rank}.json", "w") as f:
                json.dump(self.record, f)


def main(path: str) -> None:
    torch.set_num_threads(1)
    for job in json.loads(open(path).read()):
        recipe = load_recipe(job["recipe"])
        dist.init(torch.device("cpu"))
        kill = job.get("kill_at")
        callbacks = [KillAt(kill)] if kill is not None and dist.current().rank == 1 else []
        if job.get("probe"):
            callbacks.append(TeacherProbe(job["probe"]))
        run(recipe, job["out"], progress=False, callbacks=callbacks)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
