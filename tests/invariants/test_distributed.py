"""Several processes (torchrun, gloo on the CPU) train what one process trains.

Two processes take contiguous halves of each global batch (``train.batch_size`` is the global batch), the
gradients are averaged over ranks with each rank's loss weighted by its share of rows, and the state a
method keeps across batches is reduced where the paper's code does (DINO's center, SEED's queue). So a
2-process run ends at the 1-process run's weights up to float rounding: the summation order of a batch
mean differs (two half sums, then their mean). Measured on this machine: at most 1.5e-8 (ce, kd) on
weights of magnitude ~0.3; the tolerance is atol 1e-5 (DINO, SEED: 1e-4; their heads amplify rounding through
the softmax at τ_t = 0.04 / 0.05). A wrong shard, a missing rank weight or an unreduced center moves the
weights by 1e-3 or more.

Processes are launched with ``python -m torch.distributed.run --standalone`` (a free port each time).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alambic.recipe import load_recipe
from alambic.run import run
from alambic.train import distributed as dist
from tests.conftest import launch_torchrun, tiny_recipe

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_worker.py")


def torchrun(args: list[str], n: int = 2, check: bool = True, rerun_clears=()) -> subprocess.CompletedProcess:
    """The project's launcher (:func:`alambic.train.distributed.launch`, as ``alambic bench --nproc`` uses),
    rerun once after a rank's SIGABRT inside gloo (:func:`tests.conftest.launch_torchrun`)."""
    done = launch_torchrun(n, args, cwd=ROOT, rerun_clears=rerun_clears) if check else dist.launch(
        n, args, timeout=300, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and done.returncode != 0:
        raise AssertionError(f"torchrun failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    return done


def run_jobs(tmp: Path, jobs: list[dict], check: bool = True) -> subprocess.CompletedProcess:
    spec = tmp / f"jobs-{len(list(tmp.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    fresh = [job["out"] for job in jobs if not Path(job["out"]).exists()]  # a rerun starts these again
    return torchrun([str(WORKER), str(spec)], check=check, rerun_clears=fresh)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "student.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def recipes(teacher_run: Path) -> dict[str, dict]:
    sgd = {"epochs": 2, "lr": 0.05, "optimizer": "sgd", "log_every": 5}
    views = {"groups": {"global": {"count": 2, "scale": [0.5, 1.0], "jitter": 0.2}}}
    ssl_eval = {"latency_repeats": 1, "probe_every": 0, "linear_probe": False}
    return {
        "ce": tiny_recipe(train={**sgd, "batch_size": 64}),
        # 45 rows do not split evenly over 2 ranks (23 + 22), nor does the last batch of an epoch (43):
        # the rank weights make the gradient the global batch's mean all the same
        # (every row labelled: a term averaged over the labelled rows only is the global mean only when each
        # rank holds its share of them, as composed batches (train.labeled_per_batch) arrange)
        "kd": tiny_recipe(teacher={"run": str(teacher_run)},
                          method={"name": "kd", "temperature": 4.0, "alpha": 0.5},
                          train={**sgd, "batch_size": 45, "optimizer": "adam", "lr": 0.01}),
        "dino": tiny_recipe(student={"arch": "mlp", "hidden": [32]}, teacher={"ema": {"momentum": 0.99}},
                            views=views, eval=ssl_eval,
                            method={"name": "dino", "out_dim": 16, "hidden": 32, "bottleneck": 8,
                                    "head_batchnorm": False, "teacher_temperature": 0.04},
                            train={"epochs": 1, "batch_size": 64, "lr": 0.003, "log_every": 5}),
        "seed": tiny_recipe(student={"arch": "mlp", "hidden": [16]}, teacher={"run": str(teacher_run)},
                            views={"groups": {"global": {"count": 1, "scale": [0.5, 1.0], "jitter": 0.2}}},
                            eval=ssl_eval,
                            method={"name": "seed", "queue_size": 256, "teacher_feature": "body",
                                    "teacher_temperature": 0.05, "hidden": 16},
                            train={"epochs": 1, "batch_size": 64, "lr": 0.003, "log_every": 5}),
    }


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, teacher_run) -> dict[str, Path]:
    """Every recipe of :func:`recipes` trained by 2 processes in one torchrun launch."""
    tmp = tmp_path_factory.mktemp("ddp")
    outs = {name: tmp / name for name in recipes(teacher_run)}
    run_jobs(tmp, [{"recipe": r, "out": str(outs[name])} for name, r in recipes(teacher_run).items()])
    return outs


@pytest.mark.parametrize("name, atol", [("ce", 1e-5), ("kd", 1e-5), ("dino", 1e-4)])
def test_two_processes_end_at_the_one_process_weights(tmp_path, teacher_run, two_process_runs, name, atol):
    one = run(load_recipe(recipes(teacher_run)[name]), tmp_path / "one", progress=False)
    two = json.loads((two_process_runs[name] / "summary.json").read_text())
    assert two["train"]["steps"] == one["train"]["steps"]
    a, b = weights(tmp_path / "one"), weights(two_process_runs[name])
    assert max_difference(a, b) <= atol
    assert max_difference(a, {k: torch.zeros_like(v) for k, v in a.items()}) > 100 * atol  # not zeros
    if name == "dino":  # the center is the EMA of the global batch's teacher mean (all-reduced)
        c1 = load_file(str(tmp_path / "one" / "checkpoint.safetensors"))["method.center"]
        c2 = load_file(str(two_process_runs[name] / "checkpoint.safetensors"))["method.center"]
        torch.testing.assert_close(c1, c2, rtol=0, atol=1e-5)
        assert float(c1.abs().max()) > 1e-3
    # one writer: rank 0's metrics, each step once
    steps = [r["step"] for r in map(json.loads, (two_process_runs[name] / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == sorted(set(steps))


def test_seed_queues_the_all_gathered_batch_in_rank_order(tmp_path, teacher_run, two_process_runs):
    """SEED's queue after 2 processes holds the frozen teacher's embeddings of the global batches in the
    one-process order. (Its weights match only statistically: the projector's BatchNorm normalises each
    rank's rows with their own statistics, as in any DDP run without SyncBatchNorm.)"""
    run(load_recipe(recipes(teacher_run)["seed"]), tmp_path / "one", progress=False)
    q1 = load_file(str(tmp_path / "one" / "checkpoint.safetensors"))
    q2 = load_file(str(two_process_runs["seed"] / "checkpoint.safetensors"))
    assert int(q1["method.queue_filled"]) == int(q2["method.queue_filled"]) == 256
    assert int(q1["method.queue_ptr"]) == int(q2["method.queue_ptr"])
    torch.testing.assert_close(q1["method.queue"], q2["method.queue"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_a_killed_rank_resumes_into_the_uninterrupted_two_process_weights(tmp_path, two_process_runs):
    """Rank 1 dies after step 30 (checkpoints every 4 steps: the last at 28), the group ends with it; a
    `torchrun ... alambic run --resume` with the same N continues bit-identically (dropout draws included:
    the checkpoint holds each rank's RNG)."""
    recipe = tiny_recipe(student={"arch": "mlp", "hidden": [16], "dropout": 0.1},
                         train={"epochs": 2, "batch_size": 64, "lr": 0.01, "log_every": 5, "checkpoint_every": 4})
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_jobs(tmp_path, [{"recipe": recipe, "out": str(straight)}])
    failed = run_jobs(tmp_path, [{"recipe": recipe, "out": str(killed), "kill_at": 30}], check=False)
    assert failed.returncode != 0 and not (killed / "student.safetensors").exists()
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    torchrun(["-m", "alambic", "run", str(tmp_path / "recipe.yaml"), "--out", str(killed), "--resume", "--quiet"])
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["train"]["resumed_from_step"] == 28
    a, b = weights(straight), weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_method_with_unreduced_state_refuses_several_processes(tmp_path):
    recipe = tiny_recipe(method={"name": "pskd"}, train={"epochs": 1, "batch_size": 64})
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    done = torchrun(["-m", "alambic", "run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "r"), "--quiet"],
                    check=False)
    assert done.returncode != 0
    assert "method pskd keeps state across batches that is not reduced across processes yet" in done.stderr + done.stdout
