"""What a student costs: parameters, bytes on disk, CPU latency.

These are the numbers a distillation run is for (a smaller, faster model at a given accuracy), so they are
measured the way a deployment would see them: the size is the byte length of the safetensors file that
:func:`alambic.export.export_safetensors` writes, and the latency is a median over repeated single-threaded
CPU forwards (the median, not the mean, because scheduler hiccups make the timing distribution
right-skewed). Latency is a measurement for reports and ``benchmarks/``; tests never assert on it.
"""

from __future__ import annotations

import copy
import os
import statistics
import time

import torch
from torch import Tensor, nn

from alambic.errors import AlambicError
from alambic.eval.classification import eval_mode
from alambic.export.weights import serialize

__all__ = ["cpu_latency_ms", "parameter_count", "size_on_disk"]


def parameter_count(model: nn.Module) -> int:
    """Number of parameters (trainable or frozen; shared parameters counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def size_on_disk(model: nn.Module) -> int:
    """Bytes of ``model``'s state_dict (buffers included) saved as safetensors with the default metadata:
    exactly the size of the file ``export_safetensors(model, path)`` writes."""
    return len(serialize(model))


def cpu_latency_ms(
    model: nn.Module,
    example_input: Tensor,
    *,
    batch_size: int = 1,
    repeats: int = 50,
    warmup: int = 5,
    threads: int = 1,
) -> float:
    """Median CPU milliseconds per sample of ``model`` on batches of ``batch_size``.

    ``example_input`` has a leading batch dimension; its first sample is repeated ``batch_size`` times.
    Runs ``warmup`` untimed forwards, then times ``repeats`` forwards under ``torch.no_grad()`` in eval mode
    with ``torch.set_num_threads(threads)``; returns median forward time / ``batch_size``. The thread count
    and the model's train/eval flags are restored afterwards. A model on another device is timed on a CPU
    copy (the original is left where it is).
    """
    if batch_size < 1 or repeats < 1 or warmup < 0 or threads < 1:
        raise AlambicError(
            f"cpu_latency_ms: need batch_size >= 1, repeats >= 1, warmup >= 0, threads >= 1; "
            f"got {batch_size}, {repeats}, {warmup}, {threads}"
        )
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise AlambicError("cpu_latency_ms: example_input needs a non-empty leading batch dimension")
    on_cpu = all(t.device.type == "cpu" for t in list(model.parameters()) + list(model.buffers()))
    if not on_cpu:
        model = copy.deepcopy(model).cpu()
    x = example_input[:1].detach().cpu().expand(batch_size, *example_input.shape[1:]).contiguous()
    previous_threads = torch.get_num_threads()
    times = []
    try:
        torch.set_num_threads(min(threads, os.cpu_count() or 1))  # more threads than cores: a crash, not speed
        with eval_mode(model), torch.no_grad():
            for _ in range(warmup):
                model(x)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous_threads)
    return statistics.median(times) * 1000.0 / batch_size
