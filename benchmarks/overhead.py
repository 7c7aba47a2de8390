"""How much slower is alambic's training loop than the PyTorch loop a careful user would write?

Both loops do the same work: the same frozen teacher and the same student (same initial weights), the
same digits training split in the same per-epoch order, the same batch size, Hinton KD
(``(1 - a)·CE + a·T²·KL``, T=4, a=0.9, every sample labelled), Adam at a constant learning rate, one
torch thread, and the same number of optimizer steps. Per step the hand-written loop runs the teacher
under ``no_grad`` in eval mode, the student, the loss, ``backward``, ``optimizer.step``, ``zero_grad`` and
reads ``loss.item()``; alambic's loop is a :class:`~alambic.train.loop.Trainer` (no run directory, so no
metrics file and no checkpoint) driven by ``fit()``.

Timing: only the steps. Each loop's one-time setup (building the optimizer; for alambic also the
Trainer's probe batch and learning-rate table) happens before the clock starts and is reported apart;
the clock covers ``Trainer.fit()`` on one side and the epoch loop on the other (both draw each epoch's
permutation inside the clock). The two loops alternate (A-H, then H-A, ...) after one untimed warm-up
each, and the medians of the step rates are compared.

Equivalence: from the same initial weights, after the same steps, both loops must leave the same
student weights (they visit the batches in the same order, ``alambic.data.epoch_order``); the script
prints whether they are bit-identical or how far apart they are.

    python benchmarks/overhead.py                      # MLP teacher/student, batch 64
    python benchmarks/overhead.py --model cnn --rounds 3
    python benchmarks/overhead.py --progress           # include alambic's rich progress bar
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from alambic.data import build_data, epoch_order, make_loader
from alambic.losses import kd_loss
from alambic.methods.kd import KD, KDConfig
from alambic.models.zoo import MLP, SmallCNN
from alambic.recipe.schema import DataSpec, TrainSpec
from alambic.teachers.frozen import FrozenTeacher
from alambic.train.loop import Callback, Trainer

T, ALPHA, LR, SEED = 4.0, 0.9, 1e-3, 0

# (teacher, student) architectures per --model
ARCHS = {
    "mlp": (dict(hidden=[256, 256]), dict(hidden=[32])),
    "cnn": (dict(channels=[32, 64]), dict(channels=[8, 16])),
}
DEFAULT_STEPS = {"mlp": 760, "cnn": 190}  # 40 and 10 epochs: the defaults take about 20-40 s in all


def make_model(kind: str, cfg: dict, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if kind == "mlp":
        return MLP(math.prod(input_shape), cfg["hidden"], num_classes)
    return SmallCNN(input_shape[0], input_shape[1:], cfg["channels"], num_classes)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class Setup:
    """Data, a frozen teacher and the student's initial weights, shared by every run."""

    def __init__(self, args):
        self.args = args
        data = build_data(DataSpec(name="digits"))  # scikit-learn's bundled digits: no network
        self.train = data.train
        assert bool(self.train.labeled.all()), "the benchmark wants every training sample labelled"
        self.n = len(self.train)
        self.steps_per_epoch = math.ceil(self.n / args.batch_size)
        self.epochs = max(1, math.ceil(args.steps / self.steps_per_epoch))
        self.steps = self.epochs * self.steps_per_epoch
        torch.manual_seed(SEED)
        t_cfg, s_cfg = ARCHS[args.model]
        self.teacher_model = make_model(args.model, t_cfg, data.input_shape, data.num_classes)
        self.teacher = FrozenTeacher(self.teacher_model)  # eval mode, requires_grad=False
        student = make_model(args.model, s_cfg, data.input_shape, data.num_classes)
        self.student_init = {k: v.clone() for k, v in student.state_dict().items()}
        self.make = lambda: make_model(args.model, s_cfg, data.input_shape, data.num_classes)
        self.student_params = n_params(student)

    def student(self) -> nn.Module:
        s = self.make()
        s.load_state_dict(self.student_init)
        return s.train()


class Stamps(Callback):
    """Appends the clock after every step (one list append: well under 1 us)."""

    def __init__(self, stamps: list[float]):
        self.stamps = stamps

    def on_step_end(self, trainer, step, logs) -> None:
        self.stamps.append(time.perf_counter())


def run_alambic(su: Setup, progress: bool, stamps: list[float]) -> tuple[float, float, nn.Module]:
    """(seconds of fit(), seconds of the one-time setup before it, trained student); ``stamps`` gets the
    clock after each step."""
    student = su.student()
    t0 = time.perf_counter()
    spec = TrainSpec(epochs=su.epochs, batch_size=su.args.batch_size, optimizer="adam", lr=LR,
                     schedule="constant", threads=1)
    loader = make_loader(su.train, spec.batch_size, shuffle=True, seed=SEED)
    trainer = Trainer(student, KD(KDConfig(temperature=T, alpha=ALPHA)), loader, spec,
                      teacher=su.teacher, run_dir=None, progress=progress, callbacks=[Stamps(stamps)])
    t1 = time.perf_counter()
    result = trainer.fit()
    t2 = time.perf_counter()
    assert result.steps == su.steps, (result.steps, su.steps)
    return t2 - t1, t1 - t0, student


def run_hand(su: Setup, stamps: list[float]) -> tuple[float, float, nn.Module]:
    """The loop a careful PyTorch user writes: (seconds of the loop, seconds of its setup, trained student);
    ``stamps`` gets the clock after each step."""
    student = su.student()
    teacher = su.teacher_model.eval()
    x, y = su.train.x, su.train.y
    n, bs = su.n, su.args.batch_size
    t0 = time.perf_counter()
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    t1 = time.perf_counter()
    steps = 0
    for epoch in range(su.epochs):
        perm = epoch_order(n, SEED, epoch)  # a seeded torch.randperm per epoch
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            xb, yb = x[idx], y[idx]
            with torch.no_grad():
                t_logits = teacher(xb)
            s_logits = student(xb)
            kd = ALPHA * kd_loss(s_logits, t_logits, T)  # same order of terms as alambic's KD: kd, ce, sum
            ce = (1 - ALPHA) * F.cross_entropy(s_logits, yb)
            loss = ce + kd
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            last = loss.item()  # a user logs / checks the loss every step
            steps += 1
            stamps.append(time.perf_counter())
    t2 = time.perf_counter()
    assert steps == su.steps and math.isfinite(last)
    return t2 - t1, t1 - t0, student


def compare(a: nn.Module, b: nn.Module) -> tuple[bool, float]:
    sa, sb = a.state_dict(), b.state_dict()
    exact = all(torch.equal(sa[k], sb[k]) for k in sa)
    diff = max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa if sa[k].numel())
    return exact, diff


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(ARCHS), default="mlp", help="teacher/student family (default mlp)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per timed run, rounded up to whole epochs (default 760 mlp, 190 cnn)")
    p.add_argument("--rounds", type=int, default=10, help="timed runs of each loop, interleaved (default 10)")
    p.add_argument("--progress", action="store_true", help="show alambic's rich progress bar (off by default)")
    args = p.parse_args(argv)
    if args.steps is None:
        args.steps = DEFAULT_STEPS[args.model]
    if args.batch_size < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--batch-size, --steps and --rounds must be >= 1")

    torch.set_num_threads(1)
    su = Setup(args)
    t_cfg, s_cfg = ARCHS[args.model]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread; digits train split: {su.n} samples, all labelled")
    print(f"teacher {args.model} {t_cfg}: {n_params(su.teacher_model):,} params (frozen)   "
          f"student {args.model} {s_cfg}: {su.student_params:,} params")
    print(f"kd T={T} alpha={ALPHA}, adam lr={LR} constant, batch {args.batch_size}, "
          f"{su.steps} steps/run ({su.epochs} epochs x {su.steps_per_epoch}), {args.rounds} rounds, "
          f"alambic progress bar {'on' if args.progress else 'off'}")
    print("timed: Trainer.fit() vs the hand-written epoch loop, steps only; one-time setup (optimizer; for "
          "alambic also the loader, the Trainer's probe batch and lr table) is outside the clock, shown below\n")

    # untimed warm-up of both (allocator, lazy init), which also gives the equivalence check
    _, _, s_al = run_alambic(su, args.progress, [])
    _, _, s_hw = run_hand(su, [])
    exact, diff = compare(s_al, s_hw)

    rates = {"alambic": [], "hand": []}
    setup = {"alambic": [], "hand": []}
    ratios = []
    step_times = {"alambic": [], "hand": []}  # seconds between consecutive steps, pooled over rounds
    print(f"{'round':>6}  {'alambic steps/s':>15}  {'hand-written steps/s':>20}  {'ratio':>6}")
    for r in range(args.rounds):
        for name in ("alambic", "hand") if r % 2 == 0 else ("hand", "alambic"):
            stamps: list[float] = []
            sec, setup_s, _ = run_alambic(su, args.progress, stamps) if name == "alambic" else run_hand(su, stamps)
            step_times[name] += [b - a for a, b in zip(stamps, stamps[1:])]
            rates[name].append(su.steps / sec)
            setup[name].append(setup_s)
        ratios.append(rates["alambic"][-1] / rates["hand"][-1])
        print(f"{r + 1:>6}  {rates['alambic'][-1]:>15,.0f}  {rates['hand'][-1]:>20,.0f}  {ratios[-1]:>6.3f}")
    med_a, med_h = statistics.median(rates["alambic"]), statistics.median(rates["hand"])
    ratio = med_a / med_h
    print(f"{'median':>6}  {med_a:>15,.0f}  {med_h:>20,.0f}  {ratio:>6.3f}")
    print(f"\nper step (median): alambic {1e6 / med_a:.1f} us, hand-written {1e6 / med_h:.1f} us "
          f"-> alambic overhead {1e6 / med_a - 1e6 / med_h:+.1f} us/step")
    print(f"median of the per-round ratios (each round runs both loops back to back): "
          f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f}")
    p25 = {k: sorted(v)[len(v) // 4] for k, v in step_times.items()}
    print(f"typical step (25th percentile of single-step times, robust to bursts of machine noise): alambic "
          f"{1e6 * p25['alambic']:.1f} us, hand-written {1e6 * p25['hand']:.1f} us, "
          f"ratio {p25['hand'] / p25['alambic']:.3f}")
    print(f"setup outside the clock (median): alambic {1e3 * statistics.median(setup['alambic']):.2f} ms "
          f"(loader + Trainer), hand-written {1e3 * statistics.median(setup['hand']):.2f} ms (optimizer)")
    print(f"same student weights after {su.steps} steps from the same init and data order: "
          + ("yes, bit-identical" if exact else f"{'allclose' if diff < 1e-5 else 'NO'} (max |diff| {diff:.2e})"))
    print(f"ratio alambic/hand-written: {ratio:.2f} (goal >= 0.97)")
    return ratio


if __name__ == "__main__":
    main()
