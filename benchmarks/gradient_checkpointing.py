"""Peak memory and time of one training step with and without ``train.gradient_checkpointing``.

    python benchmarks/gradient_checkpointing.py [--device cpu|cuda] [--repeats 2]

Two transformer students, each step a forward, a cross-entropy and a backward (what the Trainer does
between two optimizer steps), with checkpointing switched on through the Trainer's own
:func:`alambic.train.checkpointing.enable_gradient_checkpointing`:

- ``llama``: a random llama from a config (hidden 256, 8 layers, 8 heads, MLP 1024, vocab 2048), batch 4 x 512
  tokens, through :class:`alambic.models.causal_lm.CausalLMLogits` (transformers' own checkpointing);
- ``vit``: alambic's ViT (dim 192, depth 8, 3 heads) on 128 images of 3 x 32 x 32 (65 tokens each).

Each model runs in a fresh process; each setting's memory is measured on its second step (the first
allocates what every step reuses). The peak is the most memory the step's tensors hold at once: on the CPU from the
allocation and free events ``torch.profiler`` records (``profile_memory=True``), on CUDA
``max_memory_allocated`` minus what was allocated before the step. The peak counts the parameters' gradients (the same with and without)
and the activations kept for backward (what checkpointing removes). The time is the best of ``--repeats``
steps of each setting, interleaved (off, on, off, on ...) so that both see the same load on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 512, "vocab_size": 2048,
         "tie_word_embeddings": False}


def _peak_allocated_mb(step) -> float:
    """The most bytes of tensors allocated by ``step()`` alive at once, in MB: the running sum of the CPU
    allocator's allocations and frees that ``torch.profiler`` records (``Total Allocated`` of its memory
    events, counted from the start of the profile), which is exact, unlike the process's resident size
    (glibc keeps freed blocks)."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.NamedTemporaryFile(suffix=".json") as fh:
        prof.export_chrome_trace(fh.name)
        events = json.load(open(fh.name))["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]") / 2**20


def measure(model_name: str, device: str, repeats: int) -> dict[str, dict[str, float]]:
    import torch

    from alambic.train.checkpointing import enable_gradient_checkpointing

    torch.set_num_threads(1)
    torch.manual_seed(0)
    if model_name == "llama":
        import transformers

        from alambic.models.causal_lm import CausalLMLogits

        config = transformers.AutoConfig.for_model(**LLAMA)
        net = CausalLMLogits(transformers.AutoModelForCausalLM.from_config(config))
        x = torch.randint(0, LLAMA["vocab_size"], (4, 512))
        y = torch.randint(0, LLAMA["vocab_size"], (4, 512))
        loss_fn = lambda out: torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())  # noqa: E731
    else:
        from alambic.models.vit import ViT

        net = ViT(3, (32, 32), 10, patch_size=4, dim=192, depth=8, heads=3)
        x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
        loss_fn = lambda out: torch.nn.functional.cross_entropy(out, y)  # noqa: E731
    net.to(device).train()
    x, y = x.to(device), y.to(device)

    def switch(on: bool) -> None:
        if on:
            enable_gradient_checkpointing(net)
        elif model_name == "llama":
            net.lm.activation_checkpointing_disable()
        else:
            net.checkpoint_blocks = False

    def step() -> None:
        loss_fn(net(x)).backward()
        net.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    out: dict[str, dict[str, float]] = {"off": {"step_s": float("inf")}, "on": {"step_s": float("inf")}}
    for on in (False, True):
        switch(on)
        step()  # a first step allocates what every step reuses (kernels' workspaces, the autograd engine)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated() / 2**20
            step()
            peak = torch.cuda.max_memory_allocated() / 2**20 - before
        else:
            peak = _peak_allocated_mb(step)
        out["on" if on else "off"]["peak_mb"] = peak
    for _ in range(repeats):  # interleaved: both see the same load on a shared machine
        for on in (False, True):
            switch(on)
            t0 = time.perf_counter()
            step()
            key = "on" if on else "off"
            out[key]["step_s"] = min(out[key]["step_s"], time.perf_counter() - t0)
    params = sum(p.numel() for p in net.parameters()) * 4 / 2**20
    for r in out.values():
        r["param_mb"] = params
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--models", default="llama,vit")
    p.add_argument("--worker", default=None, metavar="MODEL")
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args.device, args.repeats)))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    print(f"{'model':<6} {'checkpointing':<14} {'peak MB':>9} {'params MB':>10} {'step s':>8}")
    for model in args.models.split(","):
        cmd = [sys.executable, __file__, "--worker", model, "--device", args.device, "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        got = json.loads(out.strip().splitlines()[-1])
        for on in ("off", "on"):
            r = got[on]
            print(f"{model:<6} {on:<14} {r['peak_mb']:9.0f} {r['param_mb']:10.1f} {r['step_s']:8.2f}")
        off, on = got["off"], got["on"]
        print(f"{model:<6} peak memory on/off: {on['peak_mb'] / off['peak_mb']:.2f}, "
              f"step time on/off: {on['step_s'] / off['step_s']:.2f}")


if __name__ == "__main__":
    main()
