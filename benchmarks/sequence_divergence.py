"""Peak memory and time of a token-level LM divergence: chunked (custom autograd) against naive.

One forward + backward of ``alambic.losses.forward_kl`` (or ``--divergence``) on ``--tokens`` valid
tokens of a ``--vocab``-sized vocabulary (defaults: 4,096 tokens, V = 49,152, SmolLM2's vocabulary),
student and teacher logits in ``--dtype`` (bf16 by default, as an LM emits them). Three variants:

- ``naive``: ``chunk_size=None``: plain autograd over all tokens at once, so every float32 [N, V]
  intermediate (casts, log-softmaxes, probabilities, log-ratios) is alive until backward;
- ``loop``: a Python loop over 1,024-token chunks calling the unchunked function and summing, the
  obvious "chunking" that does not help training: each chunk's graph is kept for backward;
- ``chunked``: ``chunk_size=256`` (``--chunk``; the losses' default): the custom autograd function that forms each chunk's
  gradient and frees its graph before the next chunk.

Each variant runs in its own subprocess with one torch thread. Peak memory is the process's peak
resident set size (VmHWM, reset once the inputs exist; ``resource.getrusage`` where that cannot be
reset) minus its resident size at that point, so it counts
what the divergence adds, including the [N, V] gradient of the student logits that every variant must
produce. Time: the best of ``--reps`` forward + backward runs. Ratios are naive / variant from one
invocation; on a shared machine the times are noisy, the memory figures much less so.

    python benchmarks/sequence_divergence.py                       # ~1.5 CPU-minutes (3 variants)
    python benchmarks/sequence_divergence.py --chunk 256 --variants naive,chunked
    python benchmarks/sequence_divergence.py --divergence generalized_jsd --dtype float32
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VARIANTS = ("naive", "loop", "chunked")


def rss_mib() -> float:
    """Current resident set size of this process in MiB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process, so setup transients are not counted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak may include setup; the inputs are made without transients anyway


def peak_rss_mib() -> float:
    """Peak resident set size since :func:`reset_peak` (VmHWM), else since the start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    import torch

    import alambic.losses as losses

    torch.set_num_threads(1)
    fn = getattr(losses, args.divergence)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    batch = args.tokens // 1024 if args.tokens % 1024 == 0 else 1
    shape = (batch, args.tokens // batch, args.vocab)
    student = torch.empty(shape, dtype=dtype).normal_(0.0, 2.0, generator=g).requires_grad_(True)
    teacher = torch.empty(shape, dtype=dtype).normal_(0.0, 2.0, generator=g)
    mask = torch.ones(shape[:2], dtype=torch.bool)
    # load the kernels and start autograd on a tiny problem first, so their memory is not counted
    tiny = torch.randn(2, 3, 8, dtype=dtype, requires_grad=True)
    for chunk_size in (None, 2):
        fn(tiny, tiny.detach() + 1, tiny[..., 0] > -9, chunk_size=chunk_size).backward()
    base = rss_mib()
    reset_peak()

    def step() -> float:
        student.grad = None
        t0 = time.perf_counter()
        if args.variant == "naive":
            loss = fn(student, teacher, mask, chunk_size=None)
        elif args.variant == "chunked":
            loss = fn(student, teacher, mask, chunk_size=args.chunk)
        else:  # loop: chunk the tokens by hand, keep autograd's graph per chunk
            flat_s, flat_t = student.view(-1, args.vocab), teacher.view(-1, args.vocab)
            n = flat_s.shape[0]
            loss = sum(fn(flat_s[i:i + args.chunk], flat_t[i:i + args.chunk], chunk_size=None, num_tokens=n)
                       for i in range(0, n, args.chunk))
        loss.backward()
        return time.perf_counter() - t0

    times = [step() for _ in range(args.reps)]
    peak = peak_rss_mib()
    with torch.no_grad():
        loss = float(fn(student, teacher, mask))
    print(json.dumps({"variant": args.variant, "peak_mib": peak - base, "inputs_mib": base,
                      "time_s": min(times), "loss": loss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--divergence", default="forward_kl",
                    choices=["forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
                             "total_variation"])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # set in the child processes
    args = ap.parse_args()
    if args.variant:
        child(args)
        return

    print(f"{args.divergence}, {args.tokens:,} tokens x V={args.vocab:,}, {args.dtype} logits, chunk "
          f"{args.chunk}, 1 thread, forward+backward, best of {args.reps}")
    results = {}
    for variant in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("divergence", "tokens", "vocab", "chunk", "dtype", "reps")]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    ref = results.get("naive")
    print(f"{'variant':<9}{'extra peak MiB':>16}{'time s':>9}{'mem naive/x':>13}{'time naive/x':>14}{'loss':>12}")
    for variant, r in results.items():
        mem_ratio = ref["peak_mib"] / r["peak_mib"] if ref else float("nan")
        time_ratio = ref["time_s"] / r["time_s"] if ref else float("nan")
        print(f"{variant:<9}{r['peak_mib']:>16,.0f}{r['time_s']:>9.2f}{mem_ratio:>13.2f}{time_ratio:>14.2f}"
              f"{r['loss']:>12.6f}")
    first = next(iter(results.values()))
    print(f"(process resident before the loss, torch and the inputs: {first['inputs_mib']:,.0f} MiB; the "
          "student's gradient alone is "
          f"{args.tokens * args.vocab * (4 if args.dtype == 'float32' else 2) / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
