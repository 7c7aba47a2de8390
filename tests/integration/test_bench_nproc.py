"""``alambic bench`` cells in N processes (``nproc: N`` / ``--nproc N``): each cell is ``torchrun -m alambic run``
launched by the project's launcher (gloo on the CPU); the results record the processes, and a cell finished
with another number of processes is not passed off as this one."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alambic.bench import bench
from alambic.bench_report import read_csv
from tests.conftest import launch_torchrun

SUITE = {
    "name": "procs",
    "base": {"data": {"name": "digits"}, "student": {"arch": "mlp", "hidden": [16]},
             "train": {"epochs": 1, "batch_size": 64, "lr": 0.01, "log_every": 5},
             "eval": {"latency_repeats": 1}},
    "methods": {"ce": {"method": {"name": "ce"}}},
    "seeds": [0],
}


def test_a_cell_finished_in_another_number_of_processes_is_not_reused(tmp_path):
    out = tmp_path / "bench"
    rows = bench(SUITE, out, progress=False)
    assert [r.processes for r in rows] == [1] and rows[0].status == "ok"
    assert read_csv(out / "results.csv")[0]["processes"] == "1"
    assert "processes (torchrun" not in (out / "results.md").read_text()
    rows = bench(out, out, nproc=2, report_only=True, progress=False)
    assert rows[0].status == "failed"
    assert "holds a finished run in 1 process(es), the bench asks for 2: delete it to rerun" in rows[0].error
    with pytest.raises(Exception, match="--nproc must be at least 1"):
        bench(SUITE, out, nproc=0, progress=False)


@pytest.mark.slow
def test_a_two_process_cell_is_what_alambic_run_gives_under_torchrun(tmp_path):
    """The cell (2 processes) and ``torchrun --nproc-per-node 2 -m alambic run`` of the cell's recipe end at
    the same weights, bit for bit, and report the same test accuracy; the results say 2 processes."""
    out = tmp_path / "bench"
    rows = bench({**SUITE, "nproc": 2}, out, progress=False)
    assert rows[0].status == "ok", rows[0].error
    cell = out / "runs" / "default" / "ce" / "seed0"
    summary = json.loads((cell / "summary.json").read_text())
    assert summary["train"]["processes"] == 2
    assert read_csv(out / "results.csv")[0]["processes"] == "2"
    assert "Each run trained in 2 processes" in (out / "results.md").read_text()

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(yaml.safe_load((cell / "recipe.yaml").read_text())))
    done = launch_torchrun(2, ["-m", "alambic", "run", str(recipe), "--out", str(tmp_path / "direct"), "--quiet"],
                           rerun_clears=[tmp_path / "direct"])
    assert done.returncode == 0, done.stderr[-3000:]
    direct = json.loads((tmp_path / "direct" / "summary.json").read_text())
    assert direct["train"]["processes"] == 2 and direct["test"] == summary["test"]
    a, b = load_file(str(cell / "student.safetensors")), load_file(str(tmp_path / "direct" / "student.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_failing_cell_in_two_processes_is_its_one_line_error(tmp_path):
    """pskd keeps unreduced state and refuses several processes: the row carries that line, once (not once
    per rank), and the bench goes on."""
    suite = {**SUITE, "nproc": 2, "methods": {"pskd": {"method": {"name": "pskd"}}}}
    rows = bench(suite, tmp_path / "bench", progress=False)
    assert rows[0].status == "failed" and "\n" not in rows[0].error
    assert rows[0].error.count("method pskd keeps state across batches that is not reduced across processes yet: "
                               "run it in one process (without torchrun)") == 1, rows[0].error
