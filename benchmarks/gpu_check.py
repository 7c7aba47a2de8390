"""GPU check for issue 11: the tiny recipes of every family on CUDA in bf16, finite losses, step rates.

NOT YET RUN ON A GPU: written and dry-run on a CPU-only machine (``--device cpu --dry-run``). When a GPU is
lent, run it there and put its figures in benchmarks/README.md with the GPU named:

    python benchmarks/gpu_check.py                       # cuda, bf16, every family, ~2-4 min on one GPU
    python benchmarks/gpu_check.py --device cpu --dry-run  # what CI here can do: 3 steps per recipe

For each recipe (output KD, feature KD, self-supervised, semi-supervised; teachers trained first, seconds)
it runs ``alambic run`` in-process with ``train.device`` and ``train.precision`` set, checks every logged
loss is finite, and prints steps/s on the device and on the CPU (fp32), then a hand-written CUDA KD loop
doing the same work as the kd recipe (same MLP, batch, KD loss, Adam) for the loop's overhead. It also
resumes a checkpoint written on the device on the CPU (device-independent checkpoints) — what only a GPU
can confirm. Exits non-zero on a non-finite loss or a failed resume.

With ``--nproc N`` (N GPUs: NCCL takes one GPU per rank, so not on a one-GPU machine) it also trains the kd
recipe under ``torchrun --nproc-per-node N`` with the teacher sharded (``teacher.shard: fsdp``) and unsharded,
and checks the two students are equal (bit for bit on gloo/CPU: tests/invariants/test_fsdp_teacher.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FAMILIES = {"ce": "ce", "kd": "kd (output)", "fitnet_mlp": "fitnet (feature)", "rkd": "rkd (relation)",
            "dino": "dino (self-supervised)", "seed": "seed (SEED, queue)", "mean_teacher": "mean teacher (semi)"}


def steps_per_s(run_dir: Path) -> tuple[float, list[float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    summary = json.loads((run_dir / "summary.json").read_text())
    return summary["train"]["steps"] / max(summary["train"]["wall_time_s"], 1e-9), [r["loss"] for r in train]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--dry-run", action="store_true", help="3 steps per recipe, no CPU comparison")
    p.add_argument("--nproc", type=int, default=0, help="also kd with a sharded teacher on N processes (N GPUs)")
    args = p.parse_args()
    from alambic.recipe import load_recipe
    from alambic.run import run

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps = 3 if args.dry_run else 200
    teachers = {"runs/tiny-teacher": ({"arch": "mlp", "hidden": [64]}, tmp / "t-mlp"),
                "runs/tiny-cnn-teacher": ({"arch": "cnn", "channels": [8, 16]}, tmp / "t-cnn")}
    for student, out in teachers.values():
        run(load_recipe({"student": student, "train": {"epochs": 1 if args.dry_run else 3, "lr": 0.01}}), out,
            progress=False)
    bad = 0
    print(f"{'recipe':<26} {'device':>8} {'steps/s':>9} {'cpu fp32':>9}  final loss")
    for name, label in FAMILIES.items():
        spec = yaml.safe_load((ROOT / "recipes" / "tiny" / f"{name}.yaml").read_text())
        if "teacher" in spec and "run" in spec["teacher"]:
            spec["teacher"]["run"] = str(teachers[spec["teacher"]["run"]][1])
        over = [f"train.steps={steps}", "train.log_every=1", "eval.probe_every=0", "eval.linear_probe=false",
                "eval.latency_repeats=1"]
        run(load_recipe(spec, over + [f"train.device={args.device}", f"train.precision={args.precision}"]),
            tmp / f"{name}-dev", progress=False)
        rate, losses = steps_per_s(tmp / f"{name}-dev")
        cpu_rate = float("nan")
        if not args.dry_run:
            run(load_recipe(spec, over + ["train.device=cpu"]), tmp / f"{name}-cpu", progress=False)
            cpu_rate = steps_per_s(tmp / f"{name}-cpu")[0]
        finite = all(map(math.isfinite, losses))
        bad += not finite
        print(f"{label:<26} {args.device:>8} {rate:9.1f} {cpu_rate:9.1f}  {losses[-1]:.4f}{'' if finite else '  NON-FINITE'}")

    # a checkpoint written on the device resumes on the CPU
    from alambic.train import Callback

    class Stop(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == 2:
                raise KeyboardInterrupt

    spec = yaml.safe_load((ROOT / "recipes" / "tiny" / "ce.yaml").read_text())
    over = ["train.steps=6", "train.checkpoint_every=2"]
    try:
        run(load_recipe(spec, over + [f"train.device={args.device}"]), tmp / "moved", progress=False, callbacks=[Stop()])
    except KeyboardInterrupt:
        pass
    resumed = run(load_recipe(spec, over + ["train.device=cpu"]), tmp / "moved", resume=True, progress=False)
    ok = resumed["train"]["resumed_from_step"] == 2
    bad += not ok
    print(f"checkpoint written on {args.device}, resumed on cpu: {'ok' if ok else 'FAILED'}")

    if args.nproc > 1:
        bad += not sharded_teacher_check(args, teachers["runs/tiny-teacher"][1], steps, tmp)

    if not args.dry_run and args.device.startswith("cuda"):  # the same KD work, hand-written on the device
        from alambic.data import build_data
        from alambic.losses import kd_loss
        from alambic.models import MLP

        dev = torch.device(args.device)
        data = build_data(load_recipe({"data": {"name": "digits"}}).data)
        x, y = data.train.x.to(dev), data.train.y.to(dev)
        teacher = MLP(64, [64], 10).to(dev).eval()
        student = MLP(64, [16], 10).to(dev)
        opt = torch.optim.Adam(student.parameters(), lr=0.01)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            rows = torch.randint(0, len(x), (64,), device=dev)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                with torch.no_grad():
                    t = teacher(x[rows])
                s = student(x[rows])
            loss = 0.7 * kd_loss(s.float(), t.float(), 2.0) + 0.3 * torch.nn.functional.cross_entropy(s.float(), y[rows])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        print(f"hand-written CUDA KD loop: {steps / (time.perf_counter() - t0):.1f} steps/s (compare: kd above)")
    return 1 if bad else 0


def sharded_teacher_check(args, teacher: Path, steps: int, tmp: Path) -> bool:
    """kd on ``args.nproc`` processes with the teacher sharded and not: the same student (max |dw| printed)."""
    from safetensors.torch import load_file

    from alambic.train import distributed as dist

    got = {}
    for shard in ("fsdp", "none"):
        out = tmp / f"kd-teacher-{shard}"
        done = dist.launch(args.nproc, ["-m", "alambic", "run", str(ROOT / "recipes" / "tiny" / "kd.yaml"), "--out",
                                        str(out), "--quiet", f"teacher.run={teacher}", f"teacher.shard={shard}",
                                        f"train.steps={steps}", f"train.device={args.device}",
                                        f"train.precision={args.precision}"], timeout=600, cwd=ROOT)
        if done.returncode != 0:
            print(f"kd, teacher.shard={shard}, {args.nproc} processes: FAILED\n{done.stderr[-2000:]}")
            return False
        got[shard] = load_file(str(out / "student.safetensors"))
    diff = max(float((got["fsdp"][k] - got["none"][k]).abs().max()) for k in got["none"])
    print(f"kd, teacher sharded vs not, {args.nproc} processes on {args.device}: max |dw| = {diff:.2e}")
    return diff <= 1e-6


if __name__ == "__main__":
    raise SystemExit(main())
