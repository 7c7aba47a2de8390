"""Several processes (torchrun, gloo on the CPU): ``train.sync_batchnorm`` and ``train.shard: fsdp``.

- **sync_batchnorm.** torch's ``nn.SyncBatchNorm`` refuses CPU tensors (torch 2.13), so alambic converts the
  BatchNorm layers to :class:`alambic.train.sync_batchnorm.SyncBatchNorm` (global statistics through one
  all-gather, gradients through it). A 2-process run of a BatchNorm student then ends at the 1-process
  weights and running statistics (measured: see the tolerances below); without the option each rank
  normalises with its own half batch's statistics and the weights differ by far more.

All 2-process jobs run in one torchrun launch (tests/invariants/distributed_worker.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alambic.recipe import load_recipe
from alambic.run import run
from tests.conftest import tiny_recipe
from tests.invariants.test_distributed import max_difference, run_jobs, weights

BN_ATOL = 1e-5  # measured ~1e-7 (rounding of the statistics' summation order); unsynchronised: ~1e-2


def recipes(teacher_run: Path) -> dict[str, dict]:
    bn = {"arch": "mlp", "hidden": [32], "batchnorm": True}
    sgd = {"epochs": 2, "batch_size": 64, "lr": 0.05, "optimizer": "sgd", "log_every": 5}
    return {
        "bn_sync": tiny_recipe(student=bn, train={**sgd, "sync_batchnorm": True}),
        "bn_local": tiny_recipe(student=bn, train=sgd),
    }


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, teacher_run) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sync_fsdp")
    outs = {name: tmp / name for name in recipes(teacher_run)}
    run_jobs(tmp, [{"recipe": r, "out": str(outs[name])} for name, r in recipes(teacher_run).items()])
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
