"""The ``alambic`` command.

Every failure the user can act on is one line on stderr (``error: ...``) and a non-zero exit status:
2 for a bad recipe or command line, 1 for a failed run, 130 for an interrupt. Never a traceback, unless
``ALAMBIC_DEBUG=1`` is set.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Sequence

from alambic.errors import AlambicError


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`run R --out D a.b=1`): argparse leaves those to us
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return int(args.func(args) or 0)
    except AlambicError as exc:
        if os.environ.get("ALAMBIC_DEBUG"):
            raise
        for line in str(exc).splitlines() or [type(exc).__name__]:
            print(f"error: {line}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a full disk while training (metrics, checkpoint): one line, not a traceback
        if os.environ.get("ALAMBIC_DEBUG") or exc.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", None)):
            raise
        where = getattr(args, "out", None)
        kept = f": make room, then continue with --resume (the last checkpoint in {where} is kept)" \
            if args.func is _run else ""
        print(f"error: {exc.filename or 'a file'}: {exc.strerror}{kept}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted{_interrupted_hint(args)}", file=sys.stderr)
        return 130


def _interrupted_hint(args) -> str:
    """What is left to do after a Ctrl-C: only what the directory really holds (no checkpoint claimed that
    was never written)."""
    out = getattr(args, "out", None)
    if out is None:
        return ""
    if args.func is not _run:  # born-again, quickstart: they reuse what is finished on their own
        return f"; run the same command again to continue (finished runs in {out} are kept)"
    try:
        from alambic.run import interrupted_hint

        return f"; {interrupted_hint(Path(out))}"
    except Exception:  # interrupted while importing, or the directory is unreadable: say nothing false
        return ""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="alambic", description="Knowledge distillation for PyTorch.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="train and evaluate what a recipe describes")
    r.add_argument("recipe", type=Path)
    r.add_argument("overrides", nargs="*", metavar="key.path=value", help="override recipe values")
    r.add_argument("--out", type=Path, required=True, help="run directory")
    r.add_argument("--resume", action="store_true", help="continue (or re-use) the run in --out")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_run)

    g = sub.add_parser("born-again", help="born-again generations: ce, then kd from the previous generation")
    g.add_argument("recipe", type=Path)
    g.add_argument("overrides", nargs="*", metavar="key.path=value")
    g.add_argument("--out", type=Path, required=True, help="directory of the generations (gen0, gen1, ...)")
    g.add_argument("--generations", type=int, default=3)
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=_born_again)

    v = sub.add_parser("validate", help="check a recipe without running it")
    v.add_argument("recipe", type=Path)
    v.add_argument("overrides", nargs="*", metavar="key.path=value")
    v.add_argument("--print", action="store_true", help="print the resolved recipe")
    v.set_defaults(func=_validate)

    for kind in ("methods", "models", "datasets"):
        s = sub.add_parser(kind, help=f"list the registered {kind}")
        s.set_defaults(func=_listing, kind=kind)

    rep = sub.add_parser("report", help="render report.md and plots of a finished run again")
    rep.add_argument("run_dir", type=Path)
    rep.set_defaults(func=_report)

    pr = sub.add_parser("probe", help="kNN and linear probes of a finished run's representation (and baselines)")
    pr.add_argument("run_dir", type=Path)
    pr.add_argument("--k", type=int, default=20, help="kNN neighbours (default 20)")
    pr.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature (default 0.07)")
    pr.add_argument("--feature", default=None, help="tap path of the representation (default: the run's)")
    pr.add_argument("--baselines", action="store_true", help="also probe raw pixels and the untrained network")
    pr.add_argument("--trust-code", action="store_true",
                    help="let a run whose student.json names a user factory (arch: module) import and run it")
    pr.set_defaults(func=_probe)

    e = sub.add_parser("export", help="export a run's student (ONNX is checked against PyTorch)")
    e.add_argument("run_dir", type=Path)
    e.add_argument("--format", choices=["onnx", "safetensors"], default="onnx")
    e.add_argument("--out", type=Path, default=None, help="output file (default: in the run directory)")
    e.add_argument("--trust-code", action="store_true",
                   help="let a run whose student.json names a user factory (arch: module) import and run it")
    e.set_defaults(func=_export)

    q = sub.add_parser("quickstart", help="teacher, student-ce and student-distilled on digits, 3 seeds")
    q.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=_quickstart)

    b = sub.add_parser("bench", help="methods x settings x seeds from a suite file: mean ± std, tests vs ce, plot")
    b.add_argument("suite", type=Path, help="suite YAML, or a bench directory (re-reads its suite.yaml)")
    b.add_argument("--out", dest="bench_out", type=Path, default=None,
                   help="bench directory (default: SUITE when SUITE is a bench directory)")
    b.add_argument("--workers", type=int, default=None, help="worker processes (default: the suite's workers)")
    b.add_argument("--nproc", type=int, default=None,
                   help="processes per cell, under torchrun (default: the suite's nproc, else 1)")
    b.add_argument("--report-only", action="store_true", help="rebuild the tables and plot; train nothing")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_bench)

    gen = sub.add_parser("generate", help="a teacher's completions of a prompts file as a JSONL dataset with "
                                          "provenance (sequence-level KD, Self-Data Distillation rewrites)")
    _generate_arguments(gen)
    gen.set_defaults(func=_generate)

    c = sub.add_parser("cache", help="what alambic keeps under $ALAMBIC_CACHE (rendered glyphs, probes, teacher "
                                     "outputs), and clearing it")
    c.add_argument("--clear", nargs="*", metavar="KIND", default=None,
                   help="delete these kinds (glyphs, probes, teachers; none named: all): they are rebuilt on use")
    c.set_defaults(func=_cache)

    dd = sub.add_parser("distill-data", help="distil a small training set (KRR-ST, DM, herding, random) into a "
                                              "folder: set.safetensors + manifest.json (resumable)")
    dd.add_argument("recipe", type=Path)
    dd.add_argument("overrides", nargs="*", metavar="key.path=value")
    dd.add_argument("--out", type=Path, required=True, help="the set's folder")
    dd.add_argument("--resume", action="store_true", help="continue (or re-use) the distillation in --out")
    dd.add_argument("--quiet", action="store_true", help="no progress lines")
    dd.set_defaults(func=_distill_data)

    tk = sub.add_parser("cache-logits", help="a language recipe's teacher top-k log-probs over its training split, "
                                             "once (resumable), for teacher.cache: topk")
    tk.add_argument("recipe", type=Path)
    tk.add_argument("overrides", nargs="*", metavar="key.path=value")
    tk.add_argument("--out", type=Path, default=None, help="cache folder (default: the recipe's teacher.topk.dir)")
    tk.add_argument("--k", type=int, default=None, help="log-probs per token (default: teacher.topk.k, else 64)")
    tk.add_argument("--tail", choices=["bucket", "renormalize", "sample"], default=None,
                    help="tail policy (default: teacher.topk.tail, else bucket); sample: --k tokens drawn from the "
                         "teacher per position (unbiased forward KL)")
    tk.add_argument("--seed", type=int, default=None, help="--tail sample: the draws' seed (default: "
                    "teacher.topk.seed, else 0)")
    tk.add_argument("--temperature", type=float, default=None, help="--tail sample: the teacher temperature of "
                    "the draws (default: teacher.topk.temperature, else 1)")
    tk.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                    help="log-prob storage (default: teacher.topk.value_dtype, else float16)")
    tk.add_argument("--batch-size", type=int, default=8, help="samples per teacher forward")
    tk.add_argument("--shard-samples", type=int, default=512, help="samples per shard file")
    tk.add_argument("--rebuild", action="store_true", help="replace a cache in --out made for something else")
    tk.add_argument("--quiet", action="store_true", help="no progress lines")
    tk.set_defaults(func=_cache_logits)
    return p


def _distill_data(args) -> int:
    from alambic.distill_data import distill_data, load_distill_recipe

    try:
        manifest = distill_data(load_distill_recipe(args.recipe, args.overrides), args.out, resume=args.resume,
                                progress=not args.quiet)
    except KeyboardInterrupt:
        print(f"interrupted; continue with: alambic distill-data {args.recipe} --out {args.out} --resume (its last "
              "checkpoint is kept)", file=sys.stderr)
        return 130
    labels = "labelled" if manifest["shapes"].get("labels") else "unlabelled"
    print(f"wrote {args.out}: {manifest['size']} {labels} images by {manifest['method']} "
          f"({manifest['images_per_class']} per class), digest in {args.out / 'manifest.json'}")
    return 0


def _cache_logits(args) -> int:
    from alambic.recipe import load_recipe
    from alambic.teachers.topk import cache_logits_for_recipe

    report = cache_logits_for_recipe(load_recipe(args.recipe, args.overrides), args.out, k=args.k, tail=args.tail,
                                     value_dtype=args.dtype, batch_size=args.batch_size,
                                     shard_samples=args.shard_samples, rebuild=args.rebuild, quiet=args.quiet,
                                     seed=args.seed, temperature=args.temperature)
    print(f"top-k cache {report.folder}: {report.tokens:,} tokens, {report.bytes:,} bytes, "
          f"{report.bytes_per_token:.1f} B/token ({report.shards_written} shards written, "
          f"{report.shards_reused} reused)")
    return 0


def _generate_arguments(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--teacher", required=True, help="the teacher: a local directory or hub name (hf: allowed)")
    gen.add_argument("--gguf-file", default=None, help="a GGUF file inside --teacher")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--prompts", type=Path, required=True, help="prompt/completion JSONL, chat JSONL or plain text")
    gen.add_argument("--format", default="prompt_completion", choices=["prompt_completion", "chat", "plain"])
    gen.add_argument("--out", type=Path, required=True, help="the dataset (JSONL); OUT.manifest.json beside it")
    gen.add_argument("--mode", default="generate", choices=["generate", "rewrite"],
                     help="rewrite: the teacher restates each original response (Self-Data Distillation)")
    gen.add_argument("--template", default=None, help="rewrite prompt with {prompt} and {response}, or @FILE")
    gen.add_argument("--chat-template", action="store_true", help="send prompts as a user turn of the chat template")
    gen.add_argument("--prompt-words", type=int, default=None,
                     help="with --format plain: each line's first N words are the prompt (a corpus as prompts)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0: greedy)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--batch-size", type=int, default=8)
    gen.add_argument("--max-prompt-tokens", type=int, default=1024)
    gen.add_argument("--min-tokens", type=int, default=1, help="drop completions shorter than this")
    gen.add_argument("--max-tokens", type=int, default=None, help="drop completions longer than this")
    gen.add_argument("--keep-unfinished", action="store_true", help="keep completions cut at --max-new-tokens")
    gen.add_argument("--no-dedupe", dest="dedupe", action="store_false", help="keep exact duplicates")
    gen.add_argument("--check", default=None,
                     help="answer check: exact:FIELD, contains:FIELD, integer:FIELD or pkg.mod:fn")
    gen.add_argument("--no-fallback", dest="fallback", action="store_false",
                     help="drop a rejected generation instead of keeping the original response")
    gen.add_argument("--label", action="store_true", help="keep rejected generations too, every row with "
                     "\"correct\": true/false, the check's verdict (REDI's positive and negative traces)")
    gen.add_argument("--limit", type=int, default=None, help="the first N prompts only")
    gen.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    gen.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own count)")
    gen.add_argument("--overwrite", action="store_true", help="start over instead of continuing OUT")
    gen.add_argument("--quiet", action="store_true", help="no progress lines")


def _generate(args) -> int:
    from alambic.generation.dataset import GenerateError, generate_dataset

    template = args.template
    if template is not None and template.startswith("@"):
        try:
            template = Path(template[1:]).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise GenerateError(f"--template {args.template}: cannot read it ({exc})") from None
    keys = ("teacher", "gguf_file", "dtype", "prompts", "format", "mode", "chat_template", "prompt_words",
            "max_new_tokens",
            "temperature", "top_p", "seed", "batch_size", "max_prompt_tokens", "min_tokens", "max_tokens",
            "keep_unfinished", "dedupe", "check", "fallback", "label", "limit", "device", "threads")
    cfg = {k: getattr(args, k) for k in keys}
    cfg["template"] = template
    say = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    generate_dataset(cfg, args.out, overwrite=args.overwrite, say=say)
    print(f"wrote {args.out}")
    return 0


def _cache(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from alambic.cache_dir import KINDS, cache_dir, cache_usage, clear_cache

    console = Console()
    if args.clear is not None:
        try:
            freed = clear_cache(args.clear or KINDS)
        except ValueError as exc:
            console.print(f"[red]error:[/] {exc}")
            return 2
        for kind, (files, size) in freed.items():
            console.print(f"cleared {kind}: {files} files, {size / 2**20:.1f} MiB ({cache_dir(kind)})")
        return 0
    table = Table(title=f"alambic cache: {cache_dir('').resolve()}")
    for col in ("kind", "files", "MiB", "folder"):
        table.add_column(col, justify="right" if col in ("files", "MiB") else "left")
    for kind, (files, size) in cache_usage().items():
        table.add_row(kind, str(files), f"{size / 2**20:.1f}", str(cache_dir(kind)))
    console.print(table)
    return 0


def _run(args) -> int:
    from alambic.recipe import load_recipe
    from alambic.report.console import print_summary
    from alambic.run import run

    recipe = load_recipe(args.recipe, args.overrides)
    summary = run(recipe, args.out, resume=args.resume, progress=not args.quiet)
    from alambic.train import distributed as dist

    dist.shutdown()  # under torchrun: every rank leaves the group together, not in its interpreter's teardown
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank returns the summary; rank 0 prints it
        print_summary(summary, args.out)
    return 0


def _born_again(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from alambic.born_again import born_again

    rows = born_again(args.recipe, args.out, args.generations, progress=not args.quiet, overrides=args.overrides)
    table = Table(title=f"born-again generations in {args.out}")
    for col in ("generation", "method", "teacher", "test accuracy"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["generation"]), r["method"], r["teacher_fingerprint"] or "-", f"{r['test_accuracy']:.4f}")
    Console().print(table)
    return 0


def _validate(args) -> int:
    import yaml

    from alambic.errors import RecipeError
    from alambic.recipe import load_recipe, missing_teacher

    recipe = load_recipe(args.recipe, args.overrides)
    if problem := missing_teacher(recipe, python=False):  # valid for alambic.run(teacher=...), not here
        raise RecipeError(problem)
    if args.print:
        print(yaml.safe_dump(recipe.resolved(), sort_keys=False), end="")
    else:
        teacher = "no teacher" if recipe.teacher is None else "a teacher"
        print(f"ok: {args.recipe} (method {recipe.method.name}, student {recipe.student.arch}, "
              f"data {recipe.data.name}, {teacher})")
    return 0


def _listing(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    import alambic  # noqa: F401  (registers everything)
    from alambic.registry import DATASETS, METHODS, MODELS

    registry = {"methods": METHODS, "models": MODELS, "datasets": DATASETS}[args.kind]
    table = Table(title=f"alambic {args.kind}", expand=args.kind == "methods")
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("description", ratio=3)  # whole sentences: wrapped, never cut
    if args.kind == "methods":
        table.add_column("teacher", no_wrap=True)
        table.add_column("paper", ratio=2)
    for entry in registry:
        row = [entry.name, entry.description]
        if args.kind == "methods":
            row += ["yes" if entry.obj.needs_teacher else "no", entry.paper]
        table.add_row(*(escape(cell) for cell in row))  # descriptions are text, not rich markup
    Console().print(table)
    return 0


def _report(args) -> int:
    from alambic.report import render_report

    path = render_report(args.run_dir)
    print(f"wrote {path}")
    return 0


def _probe(args) -> int:
    from alambic.errors import RecipeError
    from alambic.probe import format_probe, probe_run

    if args.k < 1 or args.temperature <= 0:
        raise RecipeError(f"probe: --k must be >= 1 and --temperature > 0, got {args.k} and {args.temperature}")
    result = probe_run(args.run_dir, k=args.k, temperature=args.temperature, feature=args.feature,
                       baselines=args.baselines, trust_code=args.trust_code)
    print(format_probe(result))
    print(f"wrote {args.run_dir / 'probe.json'}")
    if result.get("report"):
        print(f"wrote {result['report']} (with these probes)")
    return 0


def _export(args) -> int:
    from alambic.export.run import export_run

    path = export_run(args.run_dir, args.format, args.out, say=print, trust_code=args.trust_code)
    print(f"wrote {path}")
    return 0


def _quickstart(args) -> int:
    from alambic.quickstart import quickstart

    quickstart(args.out, seeds=args.seeds, progress=not args.quiet)
    return 0


def _bench(args) -> int:
    from alambic.bench import bench
    from alambic.errors import RecipeError

    out = args.bench_out or (args.suite if args.suite.is_dir() else None)
    if out is None:
        raise RecipeError(f"bench: --out is required when {args.suite} is a suite file")
    try:
        bench(args.suite, out, workers=args.workers, nproc=args.nproc, report_only=args.report_only,
              progress=not args.quiet)
    except KeyboardInterrupt:  # not main's hint: a bench continues by running the same command again
        print(f"interrupted; run the same command again to continue (finished cells in {out} are kept)",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
