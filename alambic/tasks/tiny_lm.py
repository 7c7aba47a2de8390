"""A tiny character-level llama that has seen some arithmetic: the policy and teacher of ``recipes/tiny/grpo.yaml``,
``trrd.yaml`` and ``redi.yaml``, written in seconds on a CPU without a download.

The word-level tiny model of :func:`alambic.models.causal_lm.write_tiny_lm` has no digit in its vocabulary, so
it can never earn a reward on arithmetic. This one reads characters (every printable ASCII character and the
newline is a token; decoding concatenates them) and is trained a few Adam steps on one- and two-digit addition
with their worked solutions, so that sampled completions are right often enough, and wrong often enough,
for group advantages to be non-zero.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

from alambic.tasks.arithmetic import generate_arithmetic

__all__ = ["char_tokenizer", "write_arithmetic_prompts", "write_tiny_arithmetic_lm"]

TINY_ARITH_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
                    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 96,
                    "tie_word_embeddings": False}


def char_tokenizer() -> Any:
    """A transformers tokenizer with one token per printable ASCII character (and ``\\n``), plus <pad>, <s>,
    </s>, <unk>; decoding joins the characters as they are."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    t.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def write_tiny_arithmetic_lm(out: str | Path, steps: int = 20, seed: int = 0, n: int = 512) -> Path:
    """Write the tiny char llama (``save_pretrained``: config, weights, tokenizer) into ``out``, trained ``steps``
    Adam steps on ``n`` addition problems of 1 and 2 digits without instruction (``prompt + solution``)."""
    from alambic.models.causal_lm import _fit_tiny, causal_lm_from_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer()
    model = causal_lm_from_config(dict(TINY_ARITH_LLAMA), tok, seed=seed)
    problems = generate_arithmetic(n, seed=seed + 1, kinds={"add": 1}, digits={1: 1, 2: 1}, instruction="")
    if steps:
        _fit_tiny(model, tok, [p.prompt + p.solution for p in problems], steps, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_arithmetic_prompts(out: str | Path, n: int = 96, seed: int = 7, digits: tuple[int, ...] = (1,)) -> Path:
    """``n`` addition problems (no instruction) as ``alambic generate`` prompts: JSONL rows ``{prompt, answer,
    completion}`` (the worked solution), for ``--check integer:answer``. Problem ``i`` depends only on
    ``(seed, i)``; the default seed differs from the tiny model's training problems'. ``recipes/tiny/redi.yaml``
    labels the char llama's answers to these (one-digit by default: trained 300 steps it gets about a quarter
    of them right at temperature 0.5, so there are correct and incorrect traces to learn from)."""
    import json

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    problems = generate_arithmetic(n, seed=seed, kinds={"add": 1}, digits={d: 1 for d in digits}, instruction="")
    out.write_text("".join(json.dumps({"prompt": p.prompt, "answer": p.answer, "completion": p.solution}) + "\n"
                           for p in problems))
    return out
