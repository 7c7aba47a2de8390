"""Before recovery: SmolLM2-135M-Instruct pruned to 15 layers, at step 0, on a language recipe's test split.

For ``docs/results/language.md``. Loads the recipe's teacher once (``teacher: {hf: smollm2}``) and prints,
as one JSON object (also written to ``--out``):

- ``prune``: held-out test perplexity, top-1 agreement with the teacher and forward KL of the pruned model
  before any training, for the recipe's ``student.keep`` and for the other layer choices in ``--keep``
  (``spaced``: the first, the last and every other one between; ``first_last_block``: layers 0-13 and 29,
  the deep block dropped; ``first15``: layers 0-14), plus the teacher's own perplexity;
- ``generations``: the greedy continuations of ``eval.prompts`` by the step-0 student and the teacher;
- ``cache``: with ``--cache``, the recipe's top-k teacher cache written (as a run would write it, into
  ``teacher.topk.dir``) and the cached forward KL of the step-0 (or ``--student``) student against the
  dense one on the first
  ``--check-batches`` training batches (the relative difference is the tail-bucket approximation plus float16);
- ``step_s``: seconds per training step (forward, backward, AdamW) at ``train.batch_size`` on
  ``train.threads`` threads, the best of ``--steps`` steps on training batches.

    python benchmarks/smollm2_step0.py recipes/language/smollm2_prune_token_kd.yaml --cache --out step0.json
    python benchmarks/smollm2_step0.py recipes/language/smollm2_prune_token_kd.yaml --keep --cache \
        --student runs/smollm2-fkl/student --steps 0

With ``--student`` the trained student's held-out metrics on the recipe's test split are printed too
(``student_test``): how SeqKD's student, trained on the teacher's generations, is measured on the mix.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from alambic.data.batch import IGNORE_INDEX
from alambic.data.text import TOKENS
from alambic.data.text_build import build_text_data
from alambic.eval.language import language_metrics
from alambic.language_run import generations
from alambic.methods.token_kd import TokenKD, TokenKDConfig, token_nll
from alambic.models.causal_lm import (
    CausalLMLogits, build_student_lm, load_causal_lm, load_tokenizer, output_rows, resolve_hf, shared_vocab_size,
    tokenizer_fingerprint,
)
from alambic.recipe.load import load_recipe
from alambic.teachers.causal_lm import CausalLMTeacher

KEEPS = {
    "spaced": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 29],
    "first_last_block": list(range(14)) + [29],
    "first15": list(range(15)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--keep", nargs="*", default=list(KEEPS), choices=list(KEEPS))
    ap.add_argument("--cache", action="store_true", help="write the top-k cache and check it against dense")
    ap.add_argument("--check-batches", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--student", help="a trained student directory (a run's student/) instead of the step-0 "
                    "pruned model, for --cache and the generations (e.g. with --keep and no names)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    raw = yaml.safe_load(Path(args.recipe).read_text())
    recipe = load_recipe(raw)
    torch.set_num_threads(recipe.train.threads or 1)
    t0 = time.perf_counter()
    source, gguf = resolve_hf(recipe.teacher.hf, recipe.teacher.gguf_file)
    tok = load_tokenizer(source, gguf)
    data = build_text_data(recipe.data, tok)
    teacher_lm = load_causal_lm(source, gguf, recipe.teacher.dtype or "float32")
    out: dict = {"load_s": round(time.perf_counter() - t0, 1),
                 "examples": {k: len(v) for k, v in data.splits.items()}}
    vocab = shared_vocab_size(output_rows(teacher_lm), output_rows(teacher_lm), tok)
    teacher = CausalLMLogits(teacher_lm)
    test = lambda: data.loader("test", recipe.train.batch_size, shuffle=False).epoch(0)  # noqa: E731

    out["prune"] = {}
    for name in args.keep:
        r = dict(raw, student={"arch": "prune", "keep": KEEPS[name]})
        student_lm = build_student_lm(load_recipe(r).student, teacher_lm, tok, recipe.seed)
        t = time.perf_counter()
        m = language_metrics(CausalLMLogits(student_lm), teacher, test(), TOKENS, vocab)
        out.setdefault("teacher_test", m.pop("teacher"))
        out["prune"][name] = {"keep": KEEPS[name], **m, "eval_s": round(time.perf_counter() - t, 1)}
        print(name, json.dumps(out["prune"][name]), flush=True)

    student_lm = (load_causal_lm(args.student) if args.student
                  else build_student_lm(recipe.student, teacher_lm, tok, recipe.seed))
    student_lm.eval()
    out["generations"] = generations(recipe, data, tok, student_lm, teacher_lm)
    net = CausalLMLogits(student_lm)
    if args.student:  # a trained student (e.g. SeqKD's, which trained on other text) on this recipe's test split
        m = language_metrics(net, teacher, test(), TOKENS, vocab)
        out.setdefault("teacher_test", m.pop("teacher"))
        out["student_test"] = m
        print("student", json.dumps(m), flush=True)

    if args.cache:
        from alambic.teachers.topk import run_topk_teacher

        t = time.perf_counter()
        ids = data.splits["train"]
        cached = run_topk_teacher(recipe.teacher.topk, teacher_lm,
                                  CausalLMTeacher(teacher_lm, tok, recipe.teacher.hf).fingerprint(),
                                  tokenizer_fingerprint(tok), [data.examples[i] for i in ids], ids, vocab, data.pad)
        write_s = time.perf_counter() - t
        method = TokenKD(TokenKDConfig(divergence="forward_kl"))
        dense = sparse = 0.0
        tokens = 0
        loader = data.loader("train", recipe.train.batch_size, shuffle=False).epoch(0)
        with torch.no_grad():
            for i, batch in zip(range(args.check_batches), loader):
                mask = batch.target != IGNORE_INDEX
                n = int(mask.sum())
                s = net(batch.views[TOKENS])[..., :vocab]
                tl = teacher(batch.views[TOKENS])[..., :vocab]
                sp = cached.outputs(batch, [TOKENS])[TOKENS].sparse
                dense += float(method.divergence(s, tl, mask)) * n
                sparse += float(method.sparse_divergence(s[..., :sp.vocab_size], sp, mask)) * n
                tokens += n
        out["cache"] = {"write_s": round(write_s, 1), "folder": str(recipe.teacher.topk.dir),
                        "tokens": tokens, "dense_forward_kl": dense / tokens, "cached_forward_kl": sparse / tokens,
                        "relative_difference": (sparse - dense) / dense}
        print("cache", json.dumps(out["cache"]), flush=True)

    student_lm.train()
    opt = torch.optim.AdamW(student_lm.parameters(), lr=1e-6)
    times = []
    for _, batch in zip(range(args.steps), data.loader("train", recipe.train.batch_size, shuffle=True).epoch(0)):
        t = time.perf_counter()
        loss = token_nll(net(batch.views[TOKENS])[..., :vocab], batch.target)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    out["step_s"] = round(min(times), 2) if times else None
    out["step_s_all"] = [round(x, 2) for x in times]
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
