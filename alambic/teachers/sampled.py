"""Sampled teacher targets for offline distillation: N i.i.d. draws from the teacher per token (RS-KD).

Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", ACL 2025,
arXiv:2503.16870, "Random Sampling KD": instead of the teacher's top-k (a biased picture of it, whose tail
is lost), draw N tokens with replacement from the teacher's next-token distribution p and keep each distinct
token with its frequency ``count / N`` as the soft target. The frequencies p̂ are an unbiased estimate of p
(E[count_v / N] = p_v), so the forward-KL gradient against them, ``q − p̂``, is unbiased for the dense
``q − p`` (the paper's "preserves the gradient in expectation"). The paper's proposal distribution is the
teacher itself (importance weights p/q = 1, so the weights are the plain frequencies); that is the one used
here. The cache also keeps the teacher's log-probability of each drawn token, so that the *value* of the
forward KL is estimated without bias too (:func:`alambic.losses.sparse_forward_kl` with ``tail="sample"``).
With N = 50 draws the paper reports about 12 distinct tokens per position on its teachers.

**The draw is a pure function of (seed, sample id, position).** Each covered position draws its N uniforms
from its own ``torch.Generator`` seeded with a blake2b digest of ``(seed, sample id, position)`` (position:
the token's index in the sample's sequence, i.e. its column in a right-padded batch), and token n is the
inverse CDF of the teacher's distribution (vocabulary order, float64) at uniform n, as
:mod:`alambic.generation.sampling` draws completions. Batch size, batch order, shard boundaries and a killed
and resumed writer change nothing; only the teacher's logits do (and batched logits equal per-row ones up to
float rounding).
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["draw_seed", "draw_uniforms", "pad_rows", "sample_targets"]


def draw_seed(seed: int, sample_id: int, position: int) -> int:
    """A 63-bit generator seed that is a pure function of (seed, sample id, position): a blake2b digest."""
    h = hashlib.blake2b(f"alambic.topk-sample/{int(seed)}/{int(sample_id)}/{int(position)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def draw_uniforms(seed: int, sample_ids: Sequence[int], positions: Sequence[int], n: int) -> Tensor:
    """[P, n] float64 uniforms in [0, 1): row j from the generator of (seed, sample_ids[j], positions[j])."""
    if not len(sample_ids):
        return torch.zeros(0, n, dtype=torch.float64)
    return torch.stack([torch.rand(n, generator=torch.Generator().manual_seed(draw_seed(seed, s, t)),
                                   dtype=torch.float64) for s, t in zip(sample_ids, positions)])


def sample_targets(logprobs_PV: Tensor, uniforms_PN: Tensor, chunk: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """Draw N tokens per row by inverse CDF and count them: the sampled targets of ``P`` positions.

    Args:
        logprobs_PV: [P, V] the teacher's log-probabilities (already at the loss temperature); ``-inf``
            entries are never drawn.
        uniforms_PN: [P, N] uniforms in [0, 1) (:func:`draw_uniforms`).
        chunk: rows per float64 cumulative sum (peak memory ``chunk × V × 8`` bytes).
    Returns:
        ``(row [E], ids [E], counts [E])`` int64, one entry per distinct drawn token, sorted by row then id:
        row ``j`` drew token ``ids[e]`` ``counts[e]`` times (its counts sum to N).
    """
    P, V = logprobs_PV.shape
    n = uniforms_PN.shape[1]
    picks = []
    for a in range(0, P, chunk):
        p = logprobs_PV[a:a + chunk].double().exp()
        cum = p.cumsum(-1)
        u = uniforms_PN[a:a + chunk].to(device=cum.device, dtype=cum.dtype)
        pick = torch.searchsorted(cum, u * cum[:, -1:], right=True)
        # rounding can put u * total at the very end: fall back to the last token with probability > 0
        last = V - 1 - (p > 0).flip(-1).long().argmax(-1, keepdim=True)
        picks.append(torch.minimum(pick, last))
    drawn = torch.cat(picks) if picks else torch.zeros(0, n, dtype=torch.long, device=logprobs_PV.device)
    rows = torch.arange(P, device=drawn.device)[:, None].expand(P, n)
    keys, counts = torch.unique(rows * V + drawn, return_counts=True)  # sorted: by row, then by id
    return keys // V, keys % V, counts


def pad_rows(sizes_P: Tensor, *columns: Tensor, width: int | None = None) -> tuple[Tensor, ...]:
    """Ragged entries (row j owns the next ``sizes_P[j]`` entries of each column) as [P, width] tensors,
    zero-padded on the right (a padding entry has count 0, so it weighs nothing in the loss)."""
    P = sizes_P.numel()
    sizes = sizes_P.long()
    w = int(sizes.max()) if width is None and P else (width or 0)
    w = max(w, 1)
    slot = torch.arange(w)[None, :] < sizes[:, None]  # [P, w]: True at the filled slots, row-major
    out = []
    for col in columns:
        full = torch.zeros(P, w, dtype=col.dtype)
        full[slot] = col
        out.append(full)
    return tuple(out)
