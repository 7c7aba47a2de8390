"""Cost of alambic's distributed loop: 2 processes vs 1, and vs a hand-written DDP loop doing the same work.

    python benchmarks/ddp_overhead.py [--steps 300] [--batch 256] [--hidden 256] [--rounds 7]

Both loops train the same MLP (64-H-H-10) on digits with cross-entropy and SGD (lr 0.01, the Trainer's
momentum 0.9: the hand loop builds its optimizer with alambic's own ``make_optimizer``), global batch
--batch, gloo, one thread per process:

- ``alambic``: :class:`alambic.train.Trainer` (the loop ``alambic run`` uses: shards of the global batch, one
  flat all-reduce of the gradients with the step's loss riding along, the non-finite check);
- ``ddp``: a hand-written loop, the student inside torch's DistributedDataParallel, each rank slicing the same
  global batch, forward, cross-entropy, backward, ``optimizer.step()``, ``zero_grad()``.

**Same work, checked:** one untimed warm-up run of each loop from the same initial weights; the script prints
whether the two trained students are bit-identical (they are: both scale the gradients by 1/2, then sum
them over the ranks).

**How it is timed:** one ``torchrun --standalone`` launch of 2 processes runs ``--rounds`` rounds, each
running both loops back to back (alternating which goes first), so both see the same load from whatever
else the machine runs; the clock covers the steps after a 20-step warm-up. Per loop it prints the median
over rounds of the samples/s, of rank 0's CPU time per step and of its main thread's (the Python loop,
forward, backward and optimizer; not gloo's threads), and the medians of the per-round ratios alambic / ddp
(the headline: goal at least 0.95). On a shared machine wall throughput swings by tens of percent between
rounds; CPU time, and the main thread's above all, much less. A second launch of 1 process gives alambic's 1-process
rate for the 2-process / 1-process line; on 2 shared cores that speed-up is small.

``--profile`` instead runs alambic's loop once under cProfile on rank 0 and prints where its time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARM = 20


def _setup(hidden: int):
    import torch

    import alambic  # noqa: F401
    from alambic.data import build_data
    from alambic.models import MLP
    from alambic.recipe import load_recipe

    torch.set_num_threads(1)
    data = build_data(load_recipe({"data": {"name": "digits"}}).data)
    torch.manual_seed(0)
    init = MLP(64, [hidden, hidden], 10).state_dict()

    def model():
        m = MLP(64, [hidden, hidden], 10)
        m.load_state_dict(init)
        return m

    return data, model


def _spec(steps: int, batch: int):
    from alambic.recipe.schema import TrainSpec

    return TrainSpec(steps=steps + WARM, batch_size=batch, lr=0.01, optimizer="sgd", schedule="constant",
                     log_every=50, device="cpu")


def run_alambic(data, model, steps: int, batch: int, profile=None):
    """(seconds, CPU seconds of the process, of its main thread) of the steps after the warm-up, and the trained
    model."""
    import time

    from alambic.data.loader import make_loader
    from alambic.methods.ce import CrossEntropy
    from alambic.train import Callback, Trainer

    stamps: dict[str, float] = {}

    class Clock(Callback):
        def on_step_end(self, trainer, step, logs):
            if step == WARM:
                stamps["t0"], stamps["c0"], stamps["m0"] = time.perf_counter(), time.process_time(), time.thread_time()
                if profile is not None:
                    profile.enable()

    net = model()
    Trainer(net, CrossEntropy(), make_loader(data.train, batch, seed=0), _spec(steps, batch), callbacks=[Clock()],
            progress=False).fit()
    if profile is not None:
        profile.disable()
    return (time.perf_counter() - stamps["t0"], time.process_time() - stamps["c0"], time.thread_time() - stamps["m0"],
            net)


def run_ddp(data, model, steps: int, batch: int):
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from alambic.data.loader import make_loader
    from alambic.train import distributed as dist
    from alambic.train import make_optimizer

    world = dist.current()
    inner = model()
    net = DDP(inner)
    opt = make_optimizer(net.parameters(), _spec(steps, batch))
    loader = make_loader(data.train, batch, seed=0)
    step, epoch, t0, c0, m0 = 0, 0, 0.0, 0.0, 0.0
    while step < steps + WARM:
        for b in loader.epoch(epoch):
            if step == WARM:
                t0, c0, m0 = time.perf_counter(), time.process_time(), time.thread_time()
            if step >= steps + WARM:
                break
            rows = dist.shard(len(b), world)
            x, y = b.input[rows], b.target[rows]
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
        epoch += 1
    return time.perf_counter() - t0, time.process_time() - c0, time.thread_time() - m0, inner


def worker(args) -> None:
    import faulthandler

    import torch

    # a rank stuck in a collective (seen once on a machine loaded 4x over) prints every thread's stack and exits
    faulthandler.dump_traceback_later(args.hang_s, exit=True)
    import torch.distributed as tdist

    from alambic.train import distributed as dist

    world = dist.init(torch.device("cpu"))
    data, model = _setup(args.hidden)
    out: dict[str, object] = {}
    if args.profile:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        run_alambic(data, model, args.steps, args.batch, prof if world.is_main else None)
        if world.is_main:
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(40)
            print(text.getvalue())
        tdist.destroy_process_group() if tdist.is_initialized() else None
        return
    if world.size > 1:  # same work: the warm-up runs end at the same weights
        a, b = run_alambic(data, model, args.steps, args.batch)[-1], run_ddp(data, model, args.steps, args.batch)[-1]
        sa, sb = a.state_dict(), b.state_dict()
        out["max_weight_difference"] = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
    rounds: dict[str, list[tuple[float, float, float]]] = {"alambic": [], "ddp": []}
    for r in range(args.rounds):
        order = ("alambic", "ddp") if r % 2 == 0 else ("ddp", "alambic")
        for name in order:
            if name == "ddp" and world.size == 1:
                continue
            fn = run_alambic if name == "alambic" else run_ddp
            wall, cpu, main_cpu, _ = fn(data, model, args.steps, args.batch)
            rounds[name].append((args.steps * args.batch / wall, 1000 * cpu / args.steps, 1000 * main_cpu / args.steps))
    out["rounds"] = rounds
    if world.is_main:
        print(json.dumps(out))
    if tdist.is_initialized():
        tdist.destroy_process_group()


def launch(n: int, args) -> dict:
    sys.path.insert(0, str(ROOT))
    from alambic.train.distributed import launch as torchrun

    flags = ["--worker", "--steps", str(args.steps), "--batch", str(args.batch), "--hidden", str(args.hidden),
             "--rounds", str(args.rounds), "--hang-s", str(args.hang_s)] + (["--profile"] if args.profile else [])
    done = torchrun(n, [__file__, *flags], env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"torchrun failed ({done.returncode}):\n{done.stderr[-3000:]}")
    if args.profile:
        print(done.stdout)
        return {}
    return json.loads([ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--profile", action="store_true", help="cProfile of alambic's loop on rank 0 (2 processes)")
    p.add_argument("--hang-s", type=float, default=1800, help="a launch still running after this many seconds "
                   "prints its stacks and stops")
    p.add_argument("--worker", action="store_true")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.profile:
        launch(2, args)
        return
    two = launch(2, args)
    one = launch(1, args)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    rows = {"alambic 1p": one["rounds"]["alambic"], "alambic 2p": two["rounds"]["alambic"],
            "ddp 2p": two["rounds"]["ddp"]}
    for name, got in rows.items():
        print(f"{name:<11} {med([r[0] for r in got]):9.0f} samples/s   rank 0 CPU {med([r[1] for r in got]):.3f} "
              f"ms/step, its main thread {med([r[2] for r in got]):.3f}   (median of {len(got)} rounds)")
    pairs = list(zip(two["rounds"]["alambic"], two["rounds"]["ddp"]))
    print(f"same work: alambic 2p and ddp 2p weights after the warm-up run differ by at most "
          f"{two['max_weight_difference']:.3g}" + (" (bit-identical)" if two["max_weight_difference"] == 0 else ""))
    print(f"2-process / 1-process (alambic): "
          f"{med([r[0] for r in rows['alambic 2p']]) / med([r[0] for r in rows['alambic 1p']]):.2f}")
    print(f"overhead ratio alambic 2p / hand-written DDP 2p, median of per-round ratios: "
          f"{med([a[0] / d[0] for a, d in pairs]):.3f} (throughput), "
          f"{med([d[1] / a[1] for a, d in pairs]):.3f} (rank 0 CPU time per step), "
          f"{med([d[2] / a[2] for a, d in pairs]):.3f} (its main thread's)")
    print("rounds (alambic/ddp throughput): " + " ".join(f"{a[0] / d[0]:.2f}" for a, d in pairs))


if __name__ == "__main__":
    main()
