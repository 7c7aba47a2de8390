"""Gradient averaging over ranks (:func:`alambic.train.distributed.average_gradients`) keeps one process's
meaning of "no gradient": a parameter no rank used stays ``grad = None``, so AdamW's weight decay and moments
leave it where one process would; one some rank used gets the mean with zeros from the others."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import launch_torchrun

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("gradient_average_worker.py")


def test_a_parameter_no_rank_used_keeps_no_gradient_and_is_not_moved_by_weight_decay(tmp_path):
    out = tmp_path / "grads"
    done = launch_torchrun(2, [str(WORKER), str(out)], cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"{out}.{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert got["grads"]["both"] == [1.5] * 3  # (1 + 2) / 2
        assert got["grads"]["first"] == [2.0] * 3  # (4 + 0) / 2: rank 1's missing gradient counts as zero
        assert got["grads"]["none"] is None
        assert got["extra"] == [3.0]  # summed, riding in the same all-reduce
        assert got["after"]["none"] == [1.0] * 3  # untouched by AdamW (a zero gradient would decay it to 0.95)
        assert got["after"]["first"] != [1.0] * 3
    assert ranks[0]["after"] == ranks[1]["after"]
