"""The training split of a language recipe as prompt/completion JSONL: prompts for ``alambic generate``.

Sequence-level KD (``seqkd``) trains on the teacher's generations of the *training* prompts only; this writes
them from the recipe's own seeded split, so that no validation or test text reaches the teacher's outputs.
Each row holds the example's prompt plus the first ``--prompt-words`` words of its completion as ``prompt``
(plain text has an empty prompt: the opening words become the prompt), the rest as ``completion`` (the
fallback ``alambic generate`` keeps when a generation is rejected) and the sample ``id``.

    python benchmarks/lm_train_prompts.py recipes/language/smollm2_prune_token_kd.yaml --prompt-words 4 \
        --out runs/lang/train_prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from alambic.data.text_build import build_text_data
from alambic.models.causal_lm import load_tokenizer, resolve_hf
from alambic.recipe.load import load_recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("--prompt-words", type=int, default=4, help="words of each completion moved into the prompt")
    ap.add_argument("--split", default="train", choices=["train", "val", "test"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    recipe = load_recipe(args.recipe)
    source, gguf = resolve_hf(recipe.teacher.hf, recipe.teacher.gguf_file)
    data = build_text_data(recipe.data, load_tokenizer(source, gguf))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w") as f:
        for i in data.splits[args.split]:
            ex = data.texts[i]
            words = ex.completion.split(" ")
            head, rest = " ".join(words[: args.prompt_words]), " ".join(words[args.prompt_words:])
            prompt = ex.prompt + head
            row = {"id": i, "prompt": prompt, "completion": (" " + rest) if rest else ""}
            f.write(json.dumps(row) + "\n")
    print(f"{args.out}: {len(data.splits[args.split])} {args.split} prompts of {args.recipe}")


if __name__ == "__main__":
    main()
