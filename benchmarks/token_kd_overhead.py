"""How much slower is alambic's token_kd step than the transformers loop a careful user would write?

Both loops do the same work: a frozen causal-LM teacher (llama, random weights: speed does not depend on
them) and a student made of half its layers (same initial weights on both sides), the same right-padded
batches in the same order (``alambic.data.text.TextLoader``: a pure function of (seed, epoch)), forward KL
on completion tokens (``alambic.losses.forward_kl``), Adam at a constant learning rate, one torch thread,
the same number of optimizer steps. Per step the hand-written loop runs the teacher under ``no_grad`` in eval
mode, the student, the loss, ``backward``, ``optimizer.step``, ``zero_grad`` and reads ``loss.item()``;
alambic's loop is a :class:`~alambic.train.loop.Trainer` with the ``token_kd`` method and a frozen teacher
(no run directory: no metrics file, no checkpoint), driven by ``fit()``.

Only the steps are timed (building the optimizer and the Trainer's probe batch happen before the clock).
The loops alternate (A-H, H-A, ...) after one untimed warm-up each; the medians of the token rates are
compared, and the final student weights of both loops are compared (they should agree to float rounding).
The issue's goal: alambic / hand-written >= 0.97.

    python benchmarks/token_kd_overhead.py                  # ~1 CPU-minute
    python benchmarks/token_kd_overhead.py --hidden 256 --layers 8 --steps 40
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from alambic.data.text import TOKENS, TextLoader, TokenizedExample
from alambic.losses import forward_kl
from alambic.methods.token_kd import TokenKD, TokenKDConfig
from alambic.models.causal_lm import CausalLMLogits, prune_layers
from alambic.recipe.schema import TrainSpec
from alambic.teachers.frozen import FrozenTeacher
from alambic.train.loop import Trainer

LR, SEED = 1e-3, 0


def setup(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.length + 1)
    teacher = LlamaForCausalLM(cfg).eval()
    student = prune_layers(teacher, list(range(0, args.layers, 2)))
    g = torch.Generator().manual_seed(SEED)
    examples = []
    for i in range(args.examples):  # lengths vary, as real text does; the first 4 tokens are the prompt
        n = int(torch.randint(args.length // 2, args.length + 1, (1,), generator=g))
        examples.append(TokenizedExample(tuple(torch.randint(1, args.vocab, (n,), generator=g).tolist()), 4))
    loader = TextLoader(examples, list(range(len(examples))), args.batch, pad=0, seed=SEED)
    return teacher, student, loader


def run_alambic(teacher, student, loader, steps, vocab):
    student = copy.deepcopy(student)
    method = TokenKD(TokenKDConfig(divergence="forward_kl"))
    method.shared_vocab = vocab
    method.use_views([TOKENS])
    spec = TrainSpec(steps=steps, batch_size=loader.batch_size, lr=LR, optimizer="adam", schedule="constant",
                     log_every=10**9, threads=1)
    trainer = Trainer(CausalLMLogits(student), method, loader, spec, teacher=FrozenTeacher(CausalLMLogits(teacher)),
                      progress=False)
    start = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - start, student


def run_hand(teacher, student, loader, steps, vocab):
    student = copy.deepcopy(student).train()
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=LR)
    start = time.perf_counter()
    done, epoch = 0, 0
    while done < steps:
        for batch in loader.epoch(epoch):
            if done >= steps:
                break
            ids, target = batch.views[TOKENS], batch.target
            with torch.no_grad():
                t = teacher(input_ids=ids).logits
            s = student(input_ids=ids).logits
            loss = forward_kl(s[..., :vocab], t[..., :vocab], target != -100)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            done += 1
        epoch += 1
    return time.perf_counter() - start, student


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--examples", type=int, default=256)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    teacher, student, loader = setup(args)
    for p_ in teacher.parameters():
        p_.requires_grad_(False)
    tokens = sum(int((b.extras["attention_mask"]).sum()) for b in loader.epoch(0))
    per_step = tokens / len(loader)
    run_alambic(teacher, student, loader, 3, args.vocab)  # warm-up (allocator, kernels)
    run_hand(teacher, student, loader, 3, args.vocab)
    rates = {"alambic": [], "hand": []}
    for r in range(args.rounds):
        order = [("alambic", run_alambic), ("hand", run_hand)]
        for name, fn in order if r % 2 == 0 else order[::-1]:
            seconds, model = fn(teacher, student, loader, args.steps, args.vocab)
            rates[name].append(args.steps * per_step / seconds)
            if name == "alambic":
                a_model = model
            else:
                h_model = model
    diff = max(float((x - y).abs().max()) for x, y in zip(a_model.state_dict().values(), h_model.state_dict().values()))
    print(f"llama teacher {args.layers} layers, student {len(range(0, args.layers, 2))}, hidden {args.hidden}, "
          f"vocab {args.vocab}, batch {args.batch} x <= {args.length} tokens, {args.steps} steps, 1 thread")
    for name, values in rates.items():
        print(f"{name:8s} tokens/s per round: {', '.join(f'{v:,.0f}' for v in values)}; median {statistics.median(values):,.0f}")
    ratio = statistics.median(rates["alambic"]) / statistics.median(rates["hand"])
    print(f"ratio alambic / hand-written: {ratio:.3f} (goal >= 0.97)")
    print(f"final student weights, max |difference|: {diff:.3g}")
    return ratio


if __name__ == "__main__":
    main()
