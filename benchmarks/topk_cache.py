"""Offline top-k teacher logits: bytes per token of the cache and how far the cached loss is from the dense one.

A tiny llama teacher is trained here for a few hundred steps on Debian's fortunes (with a byte-level BPE
tokenizer trained in-process, so its next-token distributions are peaked as a language model's are, not
the near-uniform ones of random weights); the student is that teacher with half its layers dropped (the
issue's pruned-student setting, before recovery). On held-out fortunes the script writes the teacher's
top-k cache (float16 values, uint16 ids) for both tail policies and prints:

- bytes per token of the cache files (headers and offsets included) and of the payload alone
  (goal for k = 64 with the tail bucket: at most 300 B);
- the teacher's mean top-k probability mass;
- the forward KL (and reverse KL, JSD(0.5)) of student from teacher, dense (live teacher, full vocabulary)
  against cached (from the files: float16 values) for ``bucket`` and ``renormalize``, with the relative
  difference (goal: under 1% for the bucket), and the part of it that float16 rounding alone causes
  (a float32 cache of the same top-k).

    python benchmarks/topk_cache.py                    # k = 64, vocab 8192, ~2 minutes on one thread
    python benchmarks/topk_cache.py --k 16 --steps 100
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from alambic.data.text import TextExample, collate, tokenize_example
from alambic.losses import (
    forward_kl, generalized_jsd, reverse_kl, sparse_forward_kl, sparse_generalized_jsd, sparse_reverse_kl,
)
from alambic.models.causal_lm import causal_lm_from_config, prune_layers, tokenizer_fingerprint
from alambic.teachers.frozen import state_fingerprint
from alambic.teachers.topk import TopKCache, write_topk_cache

FORTUNES = Path("/usr/share/games/fortunes")


def fortunes() -> list[str]:
    texts = []
    for f in sorted(FORTUNES.iterdir()):
        if f.suffix or not f.is_file():
            continue
        for unit in f.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            unit = " ".join(unit.split())
            if 20 <= len(unit) <= 600:
                texts.append(unit)
    if not texts:
        raise SystemExit(f"no fortunes under {FORTUNES}: apt-get install fortune-mod fortunes")
    return texts


def bpe_tokenizer(texts: list[str], vocab: int):
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def train_teacher(model, examples, pad: int, steps: int, batch_size: int, lr: float, seed: int) -> None:
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        rows = rng.sample(range(len(examples)), batch_size)
        batch = collate([examples[r] for r in rows], rows, pad)
        logits = model(input_ids=batch.views["tokens"], attention_mask=batch.extras["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.target.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  teacher step {step + 1}/{steps}: nll {loss.item():.3f}", flush=True)
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=400, help="teacher training steps")
    ap.add_argument("--held-out", type=int, default=256, help="held-out fortunes to cache and score")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    texts = fortunes()
    random.Random(args.seed).shuffle(texts)
    held_texts, train_texts = texts[: args.held_out], texts[args.held_out:]
    t0 = time.time()
    tok = bpe_tokenizer(train_texts, args.vocab)
    V = len(tok)
    train = [tokenize_example(tok, TextExample("", t), args.max_length) for t in train_texts]
    held = [tokenize_example(tok, TextExample("", t), args.max_length) for t in held_texts]
    pad = tok.pad_token_id
    cfg = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}
    print(f"{len(train_texts):,} training and {len(held):,} held-out fortunes, BPE vocabulary {V:,} "
          f"({time.time() - t0:.0f} s)")
    teacher = causal_lm_from_config(cfg, tok, seed=args.seed)
    train_teacher(teacher, train, pad, args.steps, 32, 3e-3, args.seed)
    student = prune_layers(teacher, [0, 3]).eval()
    ids = list(range(len(held)))

    with tempfile.TemporaryDirectory() as tmp:
        common = dict(teacher_fingerprint=state_fingerprint(teacher), tokenizer_fingerprint=tokenizer_fingerprint(tok),
                      vocab_size=V, pad=pad, batch_size=16, shard_samples=64, progress=lambda line: None)
        reports = {}
        for tail in ("bucket", "renormalize"):
            for dtype in ("float16", "float32"):
                t1 = time.time()
                reports[tail, dtype] = write_topk_cache(teacher, held, ids, Path(tmp) / f"{tail}-{dtype}", k=args.k,
                                                        tail=tail, value_dtype=dtype, **common)
                if dtype == "float16":
                    r = reports[tail, dtype]
                    payload = args.k * 2 + args.k * 2 + (2 if tail == "bucket" else 0)
                    print(f"cache k={args.k} tail={tail:<11} float16: {r.tokens:,} tokens, {r.bytes:,} bytes, "
                          f"{r.bytes_per_token:.1f} B/token on disk (payload {payload} B/token), "
                          f"written in {time.time() - t1:.1f} s")

        caches = {key: TopKCache(Path(tmp) / f"{key[0]}-{key[1]}") for key in reports}
        sums: dict[str, float] = {}
        mass, n_tok = 0.0, 0
        pairs = {"forward_kl": (forward_kl, sparse_forward_kl, {}), "reverse_kl": (reverse_kl, sparse_reverse_kl, {}),
                 "jsd(0.5)": (generalized_jsd, sparse_generalized_jsd, {"beta": 0.5})}
        with torch.no_grad():
            for b in range(0, len(held), 16):
                batch = collate(held[b:b + 16], ids[b:b + 16], pad)
                mask = batch.target != -100
                inputs = dict(input_ids=batch.views["tokens"], attention_mask=batch.extras["attention_mask"])
                t_logits, s_logits = teacher(**inputs).logits, student(**inputs).logits
                n = int(mask.sum())
                n_tok += n
                mass += float(t_logits[mask].float().softmax(-1).topk(args.k, -1).values.sum())
                sparse = {key: c.lookup(batch) for key, c in caches.items()}
                for name, (dense_fn, sparse_fn, kw) in pairs.items():
                    sums[f"{name} dense"] = sums.get(f"{name} dense", 0.0) + n * float(
                        dense_fn(s_logits, t_logits, mask, **kw))
                    for (tail, dtype), sp in sparse.items():
                        value = sparse_fn(s_logits, sp.ids, sp.logprobs, sp.mask, tail=tail,
                                          tail_logprob=sp.tail_logprob, **kw)
                        sums[f"{name} {tail} {dtype}"] = sums.get(f"{name} {tail} {dtype}", 0.0) + n * float(value)
    print(f"teacher's mean top-{args.k} probability mass on held-out tokens: {mass / n_tok:.4f}")
    print(f"held-out divergence of the pruned student (layers 0 and 3 of 4) from the teacher, {n_tok:,} tokens:")
    for name in pairs:
        dense = sums[f"{name} dense"] / n_tok
        print(f"  {name:<10} dense {dense:.5f}")
        for tail in ("bucket", "renormalize"):
            c16, c32 = sums[f"{name} {tail} float16"] / n_tok, sums[f"{name} {tail} float32"] / n_tok
            print(f"  {'':<10} {tail:<11} {c16:.5f}  rel. diff {abs(c16 - dense) / dense:7.3%}"
                  f"  (float16 rounding alone: {abs(c16 - c32) / dense:.4%})")
    print(f"total {time.time() - t0:.0f} s on {args.threads} thread(s)")


if __name__ == "__main__":
    main()
