"""train.precision: a bf16 autocast run trains like the fp32 run, and the losses never take a half softmax.

Tolerances (measured here, bf16 autocast on the CPU): KD's loss from bf16 logits is within 1 % of the fp32
loss of the same logits (bf16 keeps 8 bits of mantissa: the logits themselves move by up to 0.4 %); the
tiny recipes' mean training loss over their last 10 logged steps is within 5 % of fp32's and the test
accuracy (the linear probe's for dino and seed) within 0.05 (measured here: losses within 0.02 % for ce,
kd, fitnet_mlp, dino and seed; accuracies within 0.006). fp16 (CPU autocast works in torch >= 2.3) adds a
gradient scaler whose state the checkpoint keeps, so a killed fp16 run resumes bit-identically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from alambic.losses import dino_loss, kd_loss
from alambic.recipe import load_recipe
from alambic.run import run
from alambic.train import state as st
from tests.conftest import KillAt, tiny_recipe

TINY = Path(__file__).resolve().parents[2] / "recipes" / "tiny"


def test_kd_loss_of_bf16_logits_is_computed_in_fp32_within_one_percent():
    torch.manual_seed(0)
    s, t = torch.randn(64, 10) * 3, torch.randn(64, 10) * 3
    exact = kd_loss(s, t, 4.0)
    half = kd_loss(s.bfloat16(), t.bfloat16(), 4.0)
    assert half.dtype == torch.float32
    assert abs(float(half) - float(exact)) <= 0.01 * float(exact)
    # under autocast too (the loss a user calls from their own loop)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = torch.nn.Linear(10, 10)(s)
        assert logits.dtype == torch.bfloat16
        assert kd_loss(logits, t, 4.0).dtype == torch.float32
    d = dino_loss([s.bfloat16(), t.bfloat16()], [t.bfloat16()], torch.zeros(10), 0.1, 0.04)
    assert d.dtype == torch.float32
    assert abs(float(d) - float(dino_loss([s, t], [t], torch.zeros(10), 0.1, 0.04))) <= 0.01 * float(d)


def _tail_loss(run_dir: Path) -> float:
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert losses and all(map(math.isfinite, losses)), losses
    tail = losses[-10:]
    return sum(tail) / len(tail)


@pytest.mark.parametrize("name", ["ce", "kd", "fitnet_mlp", "dino", "seed"])
def test_tiny_recipes_train_in_bf16_like_fp32(tmp_path, teacher_run, name):
    spec = yaml.safe_load((TINY / f"{name}.yaml").read_text())
    if "teacher" in spec and "run" in spec["teacher"]:
        spec["teacher"]["run"] = str(teacher_run)  # an mlp: SEED reads its `body`
    over = ["train.log_every=2", "eval.latency_repeats=1"]
    if name in ("dino", "seed"):
        over += ["train.steps=30", "eval.probe_every=0", "eval.linear_probe=false"]
    if name == "seed":
        over += ["method.teacher_feature=body"]
    results = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        results[precision] = run(load_recipe(spec, over + [f"train.precision={precision}"]), out, progress=False)
        results[precision]["tail"] = _tail_loss(out)
    a, b = results["fp32"], results["bf16"]
    assert abs(a["tail"] - b["tail"]) <= 0.05 * abs(a["tail"]), (a["tail"], b["tail"])
    assert abs(a["test"]["accuracy"] - b["test"]["accuracy"]) <= 0.05
    wa, wb = load_file(str(tmp_path / "fp32" / "student.safetensors")), load_file(str(tmp_path / "bf16" / "student.safetensors"))
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)  # bf16 did run: the weights differ a little


def test_fp16_checkpoints_its_grad_scaler_and_resumes_bit_identically(tmp_path):
    over = ["train.precision=fp16", "train.checkpoint_every=5"]
    run(load_recipe(tiny_recipe(), over), tmp_path / "straight", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run(load_recipe(tiny_recipe(), over), tmp_path / "killed", progress=False, callbacks=[KillAt(12)])
    meta = st.load(tmp_path / "killed" / "checkpoint.safetensors")[1]
    assert meta["step"] == 10 and meta["grad_scaler"]["scale"] > 1
    run(load_recipe(tiny_recipe(), over), tmp_path / "killed", resume=True, progress=False)
    a = load_file(str(tmp_path / "straight" / "student.safetensors"))
    b = load_file(str(tmp_path / "killed" / "student.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_compile_gives_the_eager_loss(tmp_path):
    """torch.compile of the student: the same first-step losses as eager (to 1e-5; compiled kernels may fuse
    differently). Slow: the first compile takes tens of seconds on this CPU."""
    losses = {}
    for flag in ("false", "true"):
        run(load_recipe(tiny_recipe(), ["train.steps=3", "train.log_every=1", f"train.compile={flag}"]),
            tmp_path / flag, progress=False)
        losses[flag] = [r["loss"] for r in map(json.loads, (tmp_path / flag / "metrics.jsonl").read_text().splitlines())
                        if r["split"] == "train"]
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-5)
