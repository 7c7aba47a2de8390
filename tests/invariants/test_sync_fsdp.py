"""Several processes (torchrun, gloo on the CPU): ``train.sync_batchnorm`` and ``train.shard: fsdp``.

- **sync_batchnorm.** torch's ``nn.SyncBatchNorm`` refuses CPU tensors (torch 2.13), so alambic converts the
  BatchNorm layers to :class:`alambic.train.sync_batchnorm.SyncBatchNorm` (global statistics through one
  all-gather, gradients through it). A 2-process run of a BatchNorm student then ends at the 1-process
  weights and running statistics (measured: see the tolerances below); without the option each rank
  normalises with its own half batch's statistics and the weights differ by far more.

- **shard: fsdp.** FSDP2's ``fully_shard`` works on CPUs with gloo in torch 2.13 (a ``cpu`` device mesh): a
  2-process sharded run of ce and kd ends at the 1-process weights (tolerance FSDP_ATOL), and a rank killed
  mid-run resumes from the full-tensor checkpoint into the uninterrupted sharded run's weights.

All 2-process jobs run in one torchrun launch (tests/invariants/distributed_worker.py), the killed one last.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alambic.recipe import load_recipe
from alambic.run import run
from tests.conftest import tiny_recipe
from tests.invariants.test_distributed import (
    max_difference,
    run_jobs,
    torchrun,
    weights,
)

BN_ATOL = 1e-5  # measured 6e-7 (rounding of the statistics' summation order); unsynchronised: 5e-2
FSDP_ATOL = 1e-5  # as the unsharded 2-process runs (tests/invariants/test_distributed.py): summation order


def recipes(teacher_run: Path) -> dict[str, dict]:
    bn = {"arch": "mlp", "hidden": [32], "batchnorm": True}
    sgd = {"epochs": 2, "batch_size": 64, "lr": 0.05, "optimizer": "sgd", "log_every": 5}
    return {
        "bn_sync": tiny_recipe(student=bn, train={**sgd, "sync_batchnorm": True}),
        "bn_local": tiny_recipe(student=bn, train=sgd),
        "fsdp_ce": tiny_recipe(student={"arch": "mlp", "hidden": [32, 16]}, train={**sgd, "shard": "fsdp"}),
        "fsdp_kd": tiny_recipe(teacher={"run": str(teacher_run)}, method={"name": "kd", "temperature": 4.0, "alpha": 0.5},
                               train={**sgd, "batch_size": 45, "optimizer": "adam", "lr": 0.01, "shard": "fsdp"}),
        "fsdp_straight": tiny_recipe(student={"arch": "mlp", "hidden": [16]}, train={
            "epochs": 2, "batch_size": 64, "lr": 0.01, "log_every": 5, "checkpoint_every": 4, "shard": "fsdp"}),
    }


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, teacher_run) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sync_fsdp")
    outs = {name: tmp / name for name in recipes(teacher_run)}
    jobs = [{"recipe": r, "out": str(outs[name])} for name, r in recipes(teacher_run).items()]
    outs["fsdp_killed"] = tmp / "fsdp_killed"
    jobs.append({"recipe": recipes(teacher_run)["fsdp_straight"], "out": str(outs["fsdp_killed"]), "kill_at": 30})
    failed = run_jobs(tmp, jobs, check=False)
    assert failed.returncode != 0 and (outs["fsdp_straight"] / "student.safetensors").exists(), failed.stderr[-3000:]
    return outs


@pytest.fixture(scope="module")
def one_process_bn(tmp_path_factory, teacher_run) -> Path:
    out = tmp_path_factory.mktemp("bn1") / "one"
    run(load_recipe(recipes(teacher_run)["bn_local"]), out, progress=False)
    return out


def test_sync_batchnorm_two_processes_end_at_the_one_process_weights(one_process_bn, two_process_runs):
    a, b = weights(one_process_bn), weights(two_process_runs["bn_sync"])
    assert any("running_var" in k for k in a)
    diff = max_difference(a, b)  # parameters and running statistics alike
    print(f"sync_batchnorm: 2-process vs 1-process max |dw| = {diff:.2e}")
    assert diff <= BN_ATOL
    assert max_difference(a, {k: torch.zeros_like(v) for k, v in a.items()}) > 100 * BN_ATOL


def test_without_sync_batchnorm_the_ranks_batch_statistics_differ(one_process_bn, two_process_runs):
    a, b = weights(one_process_bn), weights(two_process_runs["bn_local"])
    diff = max_difference(a, b)
    print(f"no sync_batchnorm: 2-process vs 1-process max |dw| = {diff:.2e}")
    assert diff > 100 * BN_ATOL


def test_sync_batchnorm_has_no_effect_on_one_process(tmp_path, teacher_run, one_process_bn):
    run(load_recipe(recipes(teacher_run)["bn_sync"]), tmp_path / "one", progress=False)
    a, b = weights(one_process_bn), weights(tmp_path / "one")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["fsdp_ce", "fsdp_kd"])
def test_fsdp_two_processes_end_at_the_one_process_weights(tmp_path, teacher_run, two_process_runs, name):
    one_recipe = dict(recipes(teacher_run)[name], train={**recipes(teacher_run)[name]["train"], "shard": "none"})
    run(load_recipe(one_recipe), tmp_path / "one", progress=False)
    a, b = weights(tmp_path / "one"), weights(two_process_runs[name])
    diff = max_difference(a, b)
    print(f"{name}: 2-process sharded vs 1-process max |dw| = {diff:.2e}")
    assert diff <= FSDP_ATOL
    assert max_difference(a, {k: torch.zeros_like(v) for k, v in a.items()}) > 100 * FSDP_ATOL
    # the checkpoint holds full tensors (the shapes of an unsharded run), optimizer state included
    ckpt = load_file(str(two_process_runs[name] / "checkpoint.safetensors"))
    for k, v in a.items():
        assert ckpt[f"student.{k}"].shape == v.shape
    one_ckpt = load_file(str(tmp_path / "one" / "checkpoint.safetensors"))
    assert {k: v.shape for k, v in one_ckpt.items() if k.startswith("optim.")} == \
        {k: v.shape for k, v in ckpt.items() if k.startswith("optim.")}


def test_fsdp_killed_rank_resumes_into_the_uninterrupted_sharded_weights(tmp_path, two_process_runs):
    killed = two_process_runs["fsdp_killed"]
    assert not (killed / "student.safetensors").exists()
    recipe = recipes(Path("unused"))["fsdp_straight"]
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))  # JSON is YAML
    torchrun(["-m", "alambic", "run", str(tmp_path / "recipe.yaml"), "--out", str(killed), "--resume", "--quiet"])
    assert json.loads((killed / "summary.json").read_text())["train"]["resumed_from_step"] == 28
    a, b = weights(two_process_runs["fsdp_straight"]), weights(killed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
