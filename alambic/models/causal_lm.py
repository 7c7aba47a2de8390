"""Causal language models as teachers and students, through ``transformers`` (the ``text``/``llm`` extras).

Three ways to get one (issue 10's model room):

- :func:`load_causal_lm`: a pretrained model from a local directory or a hub name (users with a network),
  or a GGUF file in a directory (``gguf_file=``: transformers dequantises it; needs ``gguf`` and
  ``accelerate``), in the dtype asked for;
- :func:`causal_lm_from_config`: a fresh, randomly initialised student from a config mapping
  (``model_type`` plus sizes), its vocabulary sized to the tokenizer it shares with the teacher;
- :func:`prune_layers`: a student made by keeping some decoder layers of the teacher, as Minitron
  (Sreenivas et al., "LLM Pruning and Distillation in Practice: The Minitron Approach", 2024,
  arXiv 2408.11796, depth pruning) and Self-Data Distillation (Thangarasa et al., 2024, arXiv 2410.09982)
  prune before they distil.

Teacher and student must share a tokenizer. Their output layers may still differ in rows: vocabularies are
often padded to a multiple of 64 or 128 (Qwen2.5-7B has 152,064 rows, Qwen2.5-0.5B 151,936, for the same
151,665 tokens), so logits are compared on the real vocabulary only (:func:`shared_vocab_size`).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from alambic.errors import AlambicError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LanguageModelError(AlambicError):
    """A language model or tokenizer cannot be loaded or does not fit its partner."""

    exit_code = 2


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LanguageModelError("language models need the 'text' extra: pip install 'alambic[text]' "
                                 "(and 'alambic[llm]' for GGUF files)") from None
    return transformers


def load_tokenizer(source: str | Path, gguf_file: str | None = None) -> Any:
    """The tokenizer of a local directory, a hub name, or a GGUF file inside ``source``."""
    tf = _transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(str(source), gguf_file=gguf_file)
    except (OSError, ValueError, ImportError) as exc:
        raise LanguageModelError(f"cannot load a tokenizer from {_where(source, gguf_file)}: "
                                 f"{_first_line(exc)}") from None


def load_causal_lm(source: str | Path, gguf_file: str | None = None, dtype: str = "float32") -> nn.Module:
    """A pretrained causal LM (eval mode) from a local directory, a hub name, or a GGUF file in ``source``."""
    tf = _transformers()
    if dtype not in DTYPES:
        raise LanguageModelError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(str(source), gguf_file=gguf_file, dtype=DTYPES[dtype])
    except (OSError, ValueError, ImportError) as exc:
        raise LanguageModelError(f"cannot load a causal LM from {_where(source, gguf_file)}: "
                                 f"{_first_line(exc)}") from None
    return model.eval()


def causal_lm_from_config(config: dict[str, Any], tokenizer: Any, seed: int = 0) -> nn.Module:
    """A fresh causal LM of ``config`` (``model_type`` plus that family's sizes), randomly initialised under
    ``seed``, whose vocabulary and special tokens are the tokenizer's (so it shares the teacher's)."""
    tf = _transformers()
    config = dict(config)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise LanguageModelError("hf_config needs a model_type (e.g. llama, gpt2, qwen2)")
    for key, token in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                       ("pad_token_id", "pad_token_id")):
        if getattr(tokenizer, token, None) is not None:
            config.setdefault(key, getattr(tokenizer, token))
    config.setdefault("vocab_size", len(tokenizer))
    if config["vocab_size"] < len(tokenizer):
        raise LanguageModelError(f"hf_config.vocab_size {config['vocab_size']} is smaller than the tokenizer's "
                                 f"{len(tokenizer)} tokens")
    try:
        cfg = tf.AutoConfig.for_model(model_type, **config)
    except (ValueError, TypeError) as exc:
        raise LanguageModelError(f"hf_config: {_first_line(exc)}") from None
    with _seeded(seed):
        return tf.AutoModelForCausalLM.from_config(cfg)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks of a transformers causal LM (llama/qwen/mistral ``model.layers``, GPT-2
    ``transformer.h``)."""
    parent, name = _layers_home(model)
    return getattr(parent, name)


def _layers_home(model: nn.Module) -> tuple[nn.Module, str]:
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        *parents, name = path.split(".")
        node: Any = model
        for part in parents:
            node = getattr(node, part, None)
        if isinstance(getattr(node, name, None), nn.ModuleList):
            return node, name
    raise LanguageModelError(f"cannot find the decoder layers of {type(model).__name__} "
                             "(looked for model.layers, transformer.h, gpt_neox.layers, model.decoder.layers)")


def prune_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """A copy of ``model`` with only the decoder layers ``keep`` (in that order; negative indices count from
    the end), everything else (embeddings, final norm, head) copied as is. The original is untouched.

    Each kept layer is renumbered (``layer_idx``) so that the key/value cache of generation addresses it
    correctly, and the config's ``num_hidden_layers`` (and per-layer lists such as ``layer_types``) follow.
    """
    n = len(decoder_layers(model))
    resolved = [k + n if k < 0 else k for k in keep]
    if not resolved or any(not 0 <= k < n for k in resolved) or len(set(resolved)) != len(resolved):
        raise LanguageModelError(f"prune: keep must name distinct layers in 0..{n - 1} (or negative from the end), "
                                 f"got {list(keep)}")
    pruned = copy.deepcopy(model)
    parent, name = _layers_home(pruned)
    kept = [getattr(parent, name)[k] for k in resolved]
    for new_idx, layer in enumerate(kept):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(parent, name, nn.ModuleList(kept))
    cfg = pruned.config
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        if hasattr(cfg, attr) and isinstance(getattr(cfg, attr), int):
            setattr(cfg, attr, len(kept))
    if isinstance(getattr(cfg, "layer_types", None), list) and len(cfg.layer_types) == n:
        cfg.layer_types = [cfg.layer_types[k] for k in resolved]
    return pruned


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of a tokenizer's vocabulary and special tokens: equal fingerprints, same token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: getattr(tokenizer, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return hashlib.sha256(json.dumps([vocab, special]).encode()).hexdigest()[:16]


def shared_vocab_size(teacher_rows: int, student_rows: int, teacher_tokenizer: Any,
                      student_tokenizer: Any | None = None) -> int:
    """How many logit columns teacher and student share: the real vocabulary of their common tokenizer.

    Rows beyond ``len(tokenizer)`` are padding (never a real token) and are dropped on both sides. Different
    tokenizers are an error: the same id would mean different text.
    """
    if student_tokenizer is not None and tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(
            student_tokenizer):
        raise LanguageModelError("teacher and student use different tokenizers (vocabularies differ); "
                                 "cross-tokenizer distillation is not supported yet")
    real = len(teacher_tokenizer)
    for who, rows in (("teacher", teacher_rows), ("student", student_rows)):
        if rows < real:
            raise LanguageModelError(f"the {who}'s output layer has {rows} rows, fewer than the tokenizer's {real} "
                                     "tokens: is it the same tokenizer?")
    return real


def _where(source: str | Path, gguf_file: str | None) -> str:
    return f"{source}/{gguf_file}" if gguf_file else str(source)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class _seeded:
    """Seed torch's global generator for a block and restore it after (model init draws from it)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.state = torch.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        torch.set_rng_state(self.state)
