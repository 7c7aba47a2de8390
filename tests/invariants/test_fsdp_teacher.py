"""``teacher.shard: fsdp``: a frozen teacher sharded over ranks (FSDP2 ``fully_shard``, gloo on the CPU).

Each rank holds half of the teacher's parameters (2 processes), all-gathers one unit for its forward and frees
it after. The all-gather copies the shards' bits, so the sharded teacher computes what the whole one computes:
a 2-process run with a sharded teacher ends at the 2-process unsharded run's student weights, measured equal
bit for bit (kd on digits, token_kd and gkd on a tiny llama); the tolerance is atol TEACHER_ATOL all the same,
in case a backend gathers into buffers whose strides change a kernel's summation order.

The kd runs take batches of 27 rows with ``grad_accum: 3``: the last batch of an epoch (1168 = 43 · 27 + 7
rows) splits 4 + 3 over the ranks, which the old ceil-sized chunks cut into 2 and 3 chunks, so the ranks
would run different numbers of sharded forwards; the loop now gives every rank the same number of chunks.

All 2-process jobs run in one torchrun launch (tests/invariants/distributed_worker.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alambic.errors import RecipeError
from alambic.models.causal_lm import write_tiny_lm
from alambic.recipe import load_recipe
from alambic.run import run
from tests.conftest import tiny_recipe
from tests.invariants.test_distributed import max_difference, run_jobs, weights

TEACHER_ATOL = 1e-6  # measured 0 (kd, token_kd, gkd): the gathered teacher is the whole one, bit for bit
TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny"


def kd(teacher_run: Path, shard: str) -> dict:
    return tiny_recipe(teacher={"run": str(teacher_run), "shard": shard},
                       method={"name": "kd", "temperature": 4.0, "alpha": 0.5},
                       train={"epochs": 1, "batch_size": 27, "grad_accum": 3, "lr": 0.01, "log_every": 5})


def lm(tiny_lm: Path, name: str, shard: str) -> dict:
    data = yaml.safe_load((TINY / f"{name}.yaml").read_text())
    data["teacher"].update(hf=str(tiny_lm), shard=shard)
    data["data"]["path"] = str(tiny_lm / "corpus.txt")
    data["train"].update(steps=4, epochs=1, log_every=2)
    data["eval"] = {"num_prompts": 0}
    if name == "gkd":
        data["method"].update(max_new_tokens=4, lmbda=0.5)
    return data


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return write_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-lm", steps=20)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, teacher_run, tiny_lm) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fsdp_teacher")
    recipes = {f"{name}_{shard}": r for shard in ("fsdp", "none") for name, r in (
        ("kd", kd(teacher_run, shard)), ("token_kd", lm(tiny_lm, "token_kd", shard)), ("gkd", lm(tiny_lm, "gkd", shard)))}
    jobs = [{"recipe": r, "out": str(tmp / name), "probe": str(tmp / f"{name}.probe") if "fsdp" in name else None}
            for name, r in recipes.items()]
    run_jobs(tmp, jobs)
    return {name: tmp / name for name in recipes} | {"tmp": tmp}


def probes(runs: dict[str, Path], name: str) -> list[dict]:
    return [json.loads((runs["tmp"] / f"{name}_fsdp.probe.{rank}.json").read_text()) for rank in (0, 1)]


def student_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    if (run_dir / "student.safetensors").exists():
        return weights(run_dir)
    return load_file(str(run_dir / "student" / "model.safetensors"))  # a language run's: transformers directory


@pytest.mark.parametrize("name", ["kd", "token_kd", "gkd"])
def test_a_sharded_teacher_trains_the_unsharded_teachers_student(runs, name):
    a, b = student_weights(runs[f"{name}_none"]), student_weights(runs[f"{name}_fsdp"])
    diff = max_difference(a, b)
    print(f"{name}: sharded vs unsharded teacher, 2 processes: max |dw| = {diff:.2e}")
    assert diff <= TEACHER_ATOL
    s1 = json.loads((runs[f"{name}_none"] / "summary.json").read_text())
    s2 = json.loads((runs[f"{name}_fsdp"] / "summary.json").read_text())
    assert s1["train"]["steps"] == s2["train"]["steps"] > 0 and s2["train"]["processes"] == 2
    # rank 0 evaluated the teacher after training: gathered back whole, it is the same teacher
    assert s1["teacher"]["test"] == s2["teacher"]["test"] and s1["teacher"]["test"]


@pytest.mark.parametrize("name", ["kd", "token_kd", "gkd"])
def test_each_rank_holds_half_the_frozen_teacher_and_runs_it_as_often(runs, name):
    p0, p1 = probes(runs, name)
    assert p0["full"] == p1["full"] and p0["local"] + p1["local"] == p0["full"]
    for p in (p0, p1):
        assert p["all_sharded"] and abs(p["local"] - p["full"] / 2) <= 0.02 * p["full"]
        assert p["resharded"]  # after each step's forwards every unit (the root too) holds only its shards
        assert not p["requires_grad"] and p["grads"] == 0  # no gradient ever reached a teacher parameter
        assert p["moved"] == 0.0 and not p["training"]  # frozen: the shard never changed; eval mode
    # every rank ran the sharded forward equally often, step by step (each is a collective), validation included
    assert p0["forwards"] == p1["forwards"] and p0["forwards_end"] == p1["forwards_end"]
    assert p0["forwards"][-1] > 0


def test_a_sharded_teacher_has_no_effect_on_one_process(tmp_path, teacher_run):
    recipe = dict(kd(teacher_run, "fsdp"), train={"epochs": 1, "batch_size": 64, "lr": 0.01, "log_every": 5})
    run(load_recipe(recipe), tmp_path / "fsdp", progress=False)
    run(load_recipe(dict(recipe, teacher={"run": str(teacher_run)})), tmp_path / "none", progress=False)
    a, b = weights(tmp_path / "fsdp"), weights(tmp_path / "none")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("teacher, culprit", [
    ({"estimator": "sklearn.linear_model:LogisticRegression"}, "not estimator: a scikit-learn estimator"),
    ({"ema": {"momentum": 0.99}}, "not ema"),
    ({"run": "r", "cache": "memory"}, "cache: memory: a cache runs the teacher only on the rows it has not seen"),
    ({"run": "r", "cache": "disk"}, "cache: disk"),
    ({"hf": "m", "cache": "topk"}, "cache: topk: the cached top-k is read back"),
    ({"run": "r", "device": "cpu"}, "device: cpu: each rank's shard sits on that rank's training device"),
])
def test_a_teacher_that_cannot_be_sharded_is_refused_in_one_line(teacher, culprit):
    with pytest.raises(RecipeError) as err:
        load_recipe(tiny_recipe(teacher={**teacher, "shard": "fsdp"}))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("teacher: shard: fsdp") and culprit in msg, msg


def test_a_sharded_teacher_behind_a_cache_is_refused_by_the_python_api():
    from alambic.errors import AlambicError
    from alambic.teachers.cached import CachedTeacher
    from alambic.teachers.frozen import FrozenTeacher
    from alambic.train import fsdp

    inner = FrozenTeacher(torch.nn.Linear(4, 2), shard="fsdp")
    assert fsdp.teacher_models(inner) == [inner.model]
    with pytest.raises(AlambicError, match="behind CachedTeacher.*use cache: off"):
        fsdp.teacher_models(CachedTeacher(inner, num_samples=8))
