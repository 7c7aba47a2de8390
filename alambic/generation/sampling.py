"""Sampling completions from a causal LM as a pure function of (seed, step, sample id).

Sequence-level KD (Kim & Rush, "Sequence-Level Knowledge Distillation", 2016, arXiv 1606.07947, §3.1)
trains on the teacher's generations; on-policy distillation (Agarwal et al., "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes", 2024, arXiv 2306.13649, Algorithm 1) trains on the
student's own samples. Both need draws that do not depend on anything but what names them: a resumed run,
a run split over several processes, or the same prompts batched differently must draw the same tokens.

So every row draws from its own ``torch.Generator`` seeded with a digest of ``(seed, step, sample id)``,
never from the global RNG: before the first forward pass each row takes ``max_new_tokens`` uniforms
``u[b, n]`` from its generator, and token ``n`` of row ``b`` is the inverse CDF of its (temperature-scaled,
nucleus-truncated) next-token distribution at ``u[b, n]``. Batch composition, batch order and padding
decide nothing; only the logits do (and batched logits equal per-row ones up to float rounding).

- ``temperature == 0``: greedy (the first arg-max); no uniform is used.
- ``top_p < 1``: nucleus sampling (Holtzman et al., "The Curious Case of Neural Text Degeneration", 2020,
  arXiv 1904.09751, §3.1): the smallest set of most probable tokens whose probability reaches ``top_p``,
  renormalised. Ties are ordered by token id, so the set is deterministic.
- After a row's first EOS it emits ``pad_id`` and its mask is False (the EOS itself is True: the student
  learns to stop); the loop ends when every row has stopped or after ``max_new_tokens``.

Prompts are left-padded into one batch with an attention mask and explicit position ids, and decoding
reuses the model's key/value cache (``use_cache=False`` re-runs the whole sequence each token, for models
without one). The model is run in eval mode (no dropout: no hidden global-RNG draw) under ``no_grad``, and
its train/eval mode is restored afterwards.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from alambic.errors import AlambicError

__all__ = ["Completions", "left_pad", "row_generator", "sample", "sample_tokens"]


class SamplingError(AlambicError):
    """Sampling parameters or prompts that cannot be used; the message names the parameter."""

    exit_code = 2


@dataclass(frozen=True)
class Completions:
    """Sampled completions of a batch of prompts.

    ``ids``: [B, N] int64 token ids (``pad_id`` after a row's first EOS); ``mask``: [B, N] bool, True up to
    and including the first EOS (the tokens any loss may cover); ``finished``: [B] bool, whether the row
    emitted EOS within ``max_new_tokens``; ``tokens``: generated tokens counted by the mask.
    """

    ids: Tensor
    mask: Tensor
    finished: Tensor

    @property
    def lengths(self) -> Tensor:
        """[B] tokens per row under the mask (the EOS included)."""
        return self.mask.sum(1)

    @property
    def tokens(self) -> int:
        return int(self.mask.sum())

    def row(self, b: int, with_eos: bool = False) -> list[int]:
        """Row ``b``'s tokens under the mask, without the final EOS unless ``with_eos``."""
        n = int(self.mask[b].sum())
        if self.finished[b] and not with_eos:
            n -= 1
        return self.ids[b, :n].tolist()


def row_seed(seed: int, step: int, sample_id: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, sample id) (a blake2b digest of the three)."""
    h = hashlib.blake2b(f"alambic.sample/{int(seed)}/{int(step)}/{int(sample_id)}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def row_generator(seed: int, step: int, sample_id: int) -> torch.Generator:
    """The CPU generator row ``sample_id`` draws from at ``step`` of a run seeded ``seed``."""
    return torch.Generator().manual_seed(row_seed(seed, step, sample_id))


def uniforms(seed: int, step: int, sample_ids: Sequence[int], n: int) -> Tensor:
    """[B, n] float64 uniforms in [0, 1): row ``b`` from :func:`row_generator` (seed, step, sample_ids[b])."""
    return torch.stack([torch.rand(n, generator=row_generator(seed, step, i), dtype=torch.float64)
                        for i in sample_ids]) if len(sample_ids) else torch.zeros(0, n, dtype=torch.float64)


def sample_tokens(logits_BV: Tensor, u_B: Tensor, temperature: float, top_p: float = 1.0) -> Tensor:
    """[B] token ids drawn from ``logits_BV`` by inverse CDF at the uniforms ``u_B`` (a pure function).

    ``temperature == 0`` is greedy (the lowest id among the maxima). Otherwise the distribution is
    ``softmax(logits / temperature)`` in float64, restricted to the nucleus of mass ``top_p`` (tokens sorted by
    probability, ties by id), and the token is the first whose cumulative probability exceeds ``u * mass``.
    ``-inf`` logits are never drawn.
    """
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs = torch.softmax(logits_BV.double() / temperature, dim=-1)
    order = torch.sort(probs, dim=-1, descending=True, stable=True)
    sorted_p, sorted_ids = order.values, order.indices
    cum = sorted_p.cumsum(-1)
    if top_p < 1.0:
        # keep token k while the mass before it is below top_p: the smallest prefix reaching top_p
        keep = (cum - sorted_p) < top_p
        sorted_p = torch.where(keep, sorted_p, 0.0)
        cum = sorted_p.cumsum(-1)
    total = cum[:, -1:]
    pick = torch.searchsorted(cum, u_B[:, None].to(cum.dtype) * total, right=True)
    # rounding can put u * total at the very end; fall back to the last token with probability > 0
    last = (sorted_p > 0).sum(-1, keepdim=True) - 1
    pick = torch.minimum(pick, last)
    return sorted_ids.gather(-1, pick).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Prompts as a left-padded [B, T] id batch and its [B, T] attention mask (1 on real tokens)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SamplingError("sampling needs at least one prompt and no empty prompt (give it at least a BOS "
                            "token)")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[b, T - len(p):] = 1
    return ids, mask


def prompts_from_batch(ids_BT: Tensor, lengths_B: Tensor | None = None,
                       attention_mask_BT: Tensor | None = None) -> list[list[int]]:
    """The prompts of a right-padded batch: row ``b`` is ``ids[b, :lengths[b]]`` (lengths from the mask)."""
    if lengths_B is None:
        lengths_B = (attention_mask_BT.sum(1) if attention_mask_BT is not None
                     else torch.full((ids_BT.shape[0],), ids_BT.shape[1]))
    return [ids_BT[b, : int(n)].tolist() for b, n in enumerate(lengths_B)]


def _check(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise SamplingError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not temperature >= 0:
        raise SamplingError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise SamplingError(f"top_p must be in (0, 1], got {top_p}")


@torch.no_grad()
def sample(model: nn.Module, prompts: Sequence[Sequence[int]] | Tensor, prompt_lengths: Tensor | None = None, *,
           attention_mask: Tensor | None = None, max_new_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, seed: int = 0, step: int = 0, sample_ids: Sequence[int] | Tensor | None = None,
           eos_id: int | Sequence[int] | None = None, pad_id: int = 0, vocab_size: int | None = None,
           use_cache: bool = True) -> Completions:
    """Completions of ``prompts`` drawn from ``model``: a pure function of the model, the prompts and
    (seed, step, sample id) per row.

    ``prompts``: a list of id lists, or a right-padded [B, T] tensor with ``prompt_lengths`` [B] or its
    ``attention_mask`` [B, T] (as a text batch carries it). ``sample_ids``: [B] stable ids keying each row's
    generator (default ``0..B-1``; pass the dataset's sample ids so that a row draws the same tokens in
    any batch). ``eos_id``: one id or several (any of them stops a row). ``vocab_size``: draw only among the
    first ``vocab_size`` logits (rows past the tokenizer's vocabulary are padding). Returns
    :class:`Completions` on the prompts' device.
    """
    _check(max_new_tokens, temperature, top_p)
    if isinstance(prompts, Tensor):
        prompts = prompts_from_batch(prompts, prompt_lengths, attention_mask)
    B = len(prompts)
    ids = torch.as_tensor(sample_ids if sample_ids is not None else range(B), dtype=torch.long).tolist()
    if len(ids) != B:
        raise SamplingError(f"sample_ids has {len(ids)} entries for {B} prompts")
    eos = torch.as_tensor([] if eos_id is None else ([eos_id] if isinstance(eos_id, int) else list(eos_id)),
                          dtype=torch.long)
    device = _device(model)
    u = uniforms(seed, step, ids, max_new_tokens)  # drawn up front: independent of what the loop does
    input_ids, attn = left_pad(prompts, pad_id)
    input_ids, attn, eos = input_ids.to(device), attn.to(device), eos.to(device)
    positions = (attn.cumsum(1) - 1).clamp(min=0)

    was_training = model.training
    model.eval()
    try:
        out_ids = torch.full((B, max_new_tokens), int(pad_id), dtype=torch.long, device=device)
        out_mask = torch.zeros((B, max_new_tokens), dtype=torch.bool, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        cache = None  # once the model returns a key/value cache, only the newest token is fed
        for n in range(max_new_tokens):
            if cache is None:
                logits, cache = _forward(model, input_ids, attn, positions, None, use_cache)
            else:
                logits, cache = _forward(model, input_ids[:, -1:], attn, positions[:, -1:], cache, True)
            logits = logits[:, -1]
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            token = sample_tokens(logits, u[:, n].to(device), temperature, top_p)
            token = torch.where(done, torch.full_like(token, int(pad_id)), token)
            out_ids[:, n] = token
            out_mask[:, n] = ~done
            done = done | torch.isin(token, eos)
            if bool(done.all()):
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], dim=1)
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    finally:
        model.train(was_training)
    finished = (out_mask & torch.isin(out_ids, eos)).any(1)
    return Completions(out_ids, out_mask, finished)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _forward(model: nn.Module, ids: Tensor, attn: Tensor, positions: Tensor, cache, use_cache: bool
             ) -> tuple[Tensor, object]:
    """One forward pass of a transformers causal LM (``cache=`` in transformers >= 5.2x, ``past_key_values=``
    before), computing logits at the last position only where the model allows it. Returns the logits and
    the model's key/value cache (None when ``use_cache`` is off or the model keeps none)."""
    kw = {"input_ids": ids, "attention_mask": attn, "position_ids": positions}
    params = _forward_params(type(model))
    if "use_cache" in params or "kwargs" in params:
        kw["use_cache"] = use_cache
    if "logits_to_keep" in params:
        kw["logits_to_keep"] = 1
    if cache is not None:
        kw["cache" if "cache" in params else "past_key_values"] = cache
    out = model(**kw)
    logits = out.logits if hasattr(out, "logits") else out
    if not use_cache:
        return logits, None
    cache = getattr(out, "cache", None)
    return logits, cache if cache is not None else getattr(out, "past_key_values", None)


_PARAMS: dict[type, frozenset[str]] = {}


def _forward_params(cls: type) -> frozenset[str]:
    if cls not in _PARAMS:
        try:
            _PARAMS[cls] = frozenset(inspect.signature(cls.forward).parameters)
        except (TypeError, ValueError):
            _PARAMS[cls] = frozenset()
    return _PARAMS[cls]
