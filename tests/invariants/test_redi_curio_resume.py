"""Resume == uninterrupted for REDI and CurioSFT language runs on a tiny random char llama: a run killed after a
checkpoint and resumed ends with the same weights and the same losses and monitors, bit for bit. For CurioSFT the
self-copy is training state (re-synced by mixing, so it depends on its own past): it must come back from the
checkpoint, not be copied afresh from the student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from alambic.recipe import load_recipe
from alambic.run import run
from alambic.tasks.arithmetic import generate_arithmetic
from alambic.tasks.tiny_lm import write_tiny_arithmetic_lm
from alambic.train import state as st
from tests.conftest import KillAt


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    return write_tiny_arithmetic_lm(tmp_path_factory.mktemp("lm") / "arith-lm", steps=0)


@pytest.fixture(scope="module")
def traces(tmp_path_factory) -> Path:
    """Worked solutions (correct) and the same with a wrong final answer (incorrect), interleaved."""
    rows = []
    for i, p in enumerate(generate_arithmetic(24, seed=3, kinds={"add": 1}, digits={1: 1}, instruction="")):
        wrong = i % 3 == 0
        answer = int(p.answer) + (1 if wrong else 0)
        rows.append({"prompt": p.prompt, "completion": f"#### {answer}", "correct": not wrong})
    path = tmp_path_factory.mktemp("traces") / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recipe(lm: Path, data: dict, method: dict, **train) -> dict:
    return load_recipe({
        "name": "resume", "seed": 0, "data": {"val_fraction": 0.1, "test_fraction": 0.1, **data},
        "teacher": {"hf": str(lm)}, "student": {"arch": "prune", "keep": [0, 3]}, "method": method,
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "log_every": 1, "checkpoint_every": 2, **train},
        "eval": {"num_prompts": 1, "max_new_tokens": 4}})


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "student" / "model.safetensors"))


def _train_lines(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


def _straight_and_killed(recipe, tmp_path: Path, kill: int, resumed_from: int) -> tuple[Path, Path]:
    run(recipe, tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "killed", progress=False, callbacks=[KillAt(kill)])
    summary = run(recipe, tmp_path / "killed", resume=True, progress=False)
    assert summary["train"]["resumed_from_step"] == resumed_from
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    straight, killed = _train_lines(tmp_path / "straight"), _train_lines(tmp_path / "killed")
    assert [(x["step"], x["loss"], x["terms"], x["monitors"]) for x in straight] == \
        [(x["step"], x["loss"], x["terms"], x["monitors"]) for x in killed]
    return tmp_path / "straight", tmp_path / "killed"


def test_a_killed_redi_run_resumes_bit_identically(lm, traces, tmp_path):
    recipe = _recipe(lm, {"name": "text", "path": str(traces), "format": "prompt_completion",
                          "label_key": "correct", "max_length": 32}, {"name": "redi", "alpha": 0.8}, grad_accum=2)
    straight, _ = _straight_and_killed(recipe, tmp_path, kill=5, resumed_from=4)
    lines = _train_lines(straight)
    assert any(x["monitors"]["neg_rows"] > 0 for x in lines) and any(x["monitors"]["pos_rows"] > 0 for x in lines)


def test_a_killed_curio_sft_run_resumes_bit_identically_with_its_self_copy(lm, tmp_path):
    # re-syncs before steps 3 and 6; the kill after step 5 resumes from step 4, whose copy was mixed at step 3
    recipe = _recipe(lm, {"name": "arithmetic", "n": 24, "kinds": ["add"], "digits": [1], "instruction": "",
                          "max_length": 32}, {"name": "curio_sft", "sync_every": 3, "sync_mix": 0.9})
    straight, killed = _straight_and_killed(recipe, tmp_path, kill=5, resumed_from=4)
    tensors, _ = st.load(killed / "checkpoint.safetensors")
    ref = {k: v for k, v in tensors.items() if k.startswith("method.ref.")}
    student = {k.removeprefix("student."): v for k, v in tensors.items() if k.startswith("student.")}
    assert ref and len(ref) == len(student)
    # the copy trails the student (last mixed before step 6): a state of its own, which the resumed step 5 read
    key = next(k for k in ref if k.endswith("lm_head.weight"))
    assert not torch.equal(ref[key], student[key.removeprefix("method.ref.")])
    tau = [x["monitors"]["tau"] for x in _train_lines(straight)]
    assert all(1.1 <= t <= 1.5 for t in tau)
