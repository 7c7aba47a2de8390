"""One distillation run, from a validated recipe to a finished run directory.

    recipe -> data -> student (+ teacher) -> method -> Trainer.fit -> evaluation -> run directory

A run directory holds ``recipe.yaml`` (resolved, every default filled in), ``metrics.jsonl``,
``checkpoint.safetensors`` (while and after training), and once finished ``student.safetensors`` +
``student.json`` (what rebuilds the network), ``predictions.safetensors``, ``summary.json``,
``report.md`` and ``plots/``.

Its lifecycle:

- one process at a time: :func:`run` holds an exclusive ``flock`` on ``.lock`` (which records the holder's
  pid) for the whole run; the OS lets go of it when the process ends, however it ends;
- every file is written atomically (a temporary file, then ``os.replace``): a kill or a full disk leaves the
  old file or the new one, never half of one;
- finished means ``finished.json`` exists, written last, listing the files the run promises (all present):
  a run stopped anywhere before it is unfinished, and ``--resume`` finishes it (training complete: the
  evaluation and the report are done again from the checkpoint);
- a directory that holds only the recipe of a run that failed before training (bad data, a missing
  teacher) is reused by the next run, whatever its recipe;
- ``attempts.jsonl`` gets a line per attempt that reaches training (the first one starts it over), so the
  summary can say how many attempts its wall time covers.
"""

from __future__ import annotations

import copy
import datetime
import errno
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml
from torch import nn

from alambic import methods as _methods  # noqa: F401  (registers methods)
from alambic.data import sources as _sources  # noqa: F401  (registers datasets)
from alambic.cache_dir import cache_dir
from alambic.data.batch import INPUT
from alambic.data.loader import WithoutLabels, make_loader
from alambic.data.paired import PairedLoader, paired_data
from alambic.data.views import AugmentedLoader, ViewMaker
from alambic.data.splits import DataBundle, Split, build_data
from alambic.errors import AlambicError, OutDirError, RecipeError, RunDirError, ShapeMismatchError, WriteError
from alambic.eval.classification import accuracy, agreement, expected_calibration_error, nll, predict
from alambic.eval.efficiency import cpu_latency_ms, parameter_count, size_on_disk
from alambic.export.weights import export_safetensors, load_weights
from alambic.methods.base import Method
from alambic.models.heads import DEFAULT_FEATURES, EmbeddingNet
from alambic.models.zoo import build_model, import_object, is_out_of_memory
from alambic.probe import CollapseWatch, ProbeCallback, probe_model
from alambic.recipe.load import missing_teacher
from alambic.recipe.schema import Recipe, TeacherSpec
from alambic.registry import METHODS
from alambic.student import STUDENT_META, STUDENT_WEIGHTS, load_student  # noqa: F401  (load_student: also from here)
from alambic.teachers.analytic import AnalyticTeacher
from alambic.teachers.base import Teacher
from alambic.teachers.cached import CachedTeacher
from alambic.teachers.ema import EmaTeacher
from alambic.teachers.ensemble import TeacherEnsemble
from alambic.teachers.frozen import FrozenTeacher
from alambic.teachers.transfer import TransferTeacher
from alambic.train import distributed as dist
from alambic.train.devices import place_teacher, resolve_device
from alambic.train.loop import CHECKPOINT, Callback, Trainer
from alambic.train.seeding import seed_everything
from alambic.train.state import atomic_save, atomic_write_text

try:
    import fcntl
except ImportError:  # not on Windows: run directories go unlocked there
    fcntl = None

SUMMARY, PREDICTIONS, REPORT, RECIPE, METRICS = (
    "summary.json", "predictions.safetensors", "report.md", "recipe.yaml", "metrics.jsonl")
FINISHED = "finished.json"  # written last: everything it lists is on disk
LOCK = ".lock"  # flock'ed by the process working in the directory
ATTEMPTS = "attempts.jsonl"  # one line per attempt that reached training


def run(
    recipe: Recipe,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    data: DataBundle | None = None,
    teacher: Teacher | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train and evaluate what ``recipe`` describes into run directory ``out``; returns the summary.

    ``data`` and ``teacher`` let Python callers bring their own (a :class:`DataBundle` from
    :func:`alambic.data.bundle_from_arrays`, any object following the Teacher protocol); they replace the
    recipe's ``data``/``teacher`` sections.

    ``out`` is locked for the whole call: a second process that asks for it meanwhile gets a RunDirError.

    Under ``torchrun --nproc-per-node N`` every process calls this; they join one process group
    (:mod:`alambic.train.distributed`), rank 0 alone locks and writes ``out``, and every rank returns the
    summary rank 0 wrote.
    """
    if teacher is None and (problem := missing_teacher(recipe)):
        raise RecipeError(problem)  # before the run directory exists: a fixed recipe may use the same --out
    out = Path(out)
    world = dist.init(resolve_device(recipe.train.device))  # one process: World(), nothing joined
    if world.size > 1 and not METHODS.get(recipe.method.name).obj.distributed_safe:
        raise AlambicError(f"method {recipe.method.name} keeps state across batches that is not reduced across "
                           "processes yet: run it in one process (without torchrun)")
    lock = lock_run_dir(out) if world.is_main else None
    try:
        summary = _run(recipe, out, resume, progress, data, teacher, callbacks)
        return dist.broadcast_object(summary if world.is_main else None)
    finally:
        if lock is not None:
            os.close(lock)


def _run(recipe: Recipe, out: Path, resume: bool, progress: bool, data: DataBundle | None,
         teacher: Teacher | None, callbacks: Sequence[Callback]) -> dict[str, Any]:
    world = dist.current()
    if dist.broadcast_object(_prepare_run_dir(out, recipe, resume) if world.is_main else None):
        return finished_summary(out)
    if METHODS.get(recipe.method.name).obj.modality == "text":  # a language run: assembled apart
        from alambic.language_run import run_language
        return run_language(recipe, out, resume, progress, callbacks)
    torch.set_num_threads(cpu_threads(recipe.train.threads))
    data = data if data is not None else build_data(recipe.data)
    real = data  # probes fit on the real labelled training split, whatever the student trains on
    if recipe.data.distilled is not None:  # a set from `alambic distill-data` replaces the training split
        from alambic.distill_data import train_on_set
        data = train_on_set(data, recipe.data.distilled)
    seed_everything(recipe.seed)
    student = build_model(recipe.student, data.input_shape, data.num_classes, what="student")
    method_cls: type[Method] = METHODS.get(recipe.method.name).obj
    method = method_cls(recipe.method.options)
    ssl = method_cls.self_supervised
    train = data.train if method_cls.uses_unlabeled else data.train.labeled_only()
    if len(train) == 0:
        raise AlambicError("the training split has no sample this method can use (no labelled sample?)")
    composed = None  # labelled rows per batch: only for a method that reads labels and unlabelled samples
    if method_cls.uses_unlabeled and not ssl:
        composed = recipe.train.labeled_per_batch
        if composed is None:
            _hint_composed_batches(train, recipe.train.batch_size)
    loader = make_loader(train, recipe.train.batch_size, shuffle=True, seed=recipe.seed, labeled_per_batch=composed)
    paired = paired_data(recipe.data) if method_cls.paired else None
    if paired is not None:  # the dataset's other modalities and pairings, looked up by sample index
        loader = PairedLoader(loader, paired)
    if ssl:  # labels never reach a self-supervised method; the probes read them from `data`
        loader = WithoutLabels(loader)
    views = [INPUT, *(paired.views if paired is not None else [])]
    if recipe.views is not None:
        maker = ViewMaker(recipe.views, data.input_shape)
        loader = AugmentedLoader(loader, maker, seed=recipe.seed)
        views += maker.names
    method.use_views(views)
    net = method.wrap_student(student, data.train.x[:2], recipe.student.arch)
    net.to(dist.rank_device(resolve_device(recipe.train.device)))  # before an EMA teacher copies it
    total_steps = recipe.train.plan(len(loader))[1]
    if teacher is None and recipe.teacher_specs():
        specs = recipe.teacher_specs()
        seen = paired.shape(method.teacher_views[0]) if paired is not None else None  # a cross-modal teacher
        built = [build_teacher(t, data, net, total_steps, len(loader), input_shape=seen) for t in specs]
        teacher = built[0] if recipe.teacher is not None else TeacherEnsemble(built)
    ev = recipe.eval

    def validate(model: nn.Module) -> dict[str, float]:
        logits = predict(model, _inputs(data.val, ev.batch_size))
        return {"accuracy": accuracy(logits, data.val.y), "loss": nll(logits, data.val.y)}

    callbacks = list(callbacks)
    feature = representation_path(net, method, recipe)
    probe_every = ev.probe_every if ev.probe_every is not None else (max(1, total_steps // 10) if ssl else 0)
    if probe_every and feature is not None and world.is_main:
        callbacks.append(ProbeCallback(real, feature, probe_every, k=ev.knn_k, temperature=ev.knn_temperature,
                                       max_train=ev.probe_train_samples, batch_size=ev.batch_size))
    watch = CollapseWatch() if ssl and world.is_main else None
    if watch is not None:
        callbacks.append(watch)
    trainer = Trainer(net, method, loader, recipe.train, teacher=teacher, run_dir=out,
                      val_fn=None if ssl else validate, callbacks=callbacks, progress=progress,
                      teacher_device=recipe.teacher.device if recipe.teacher is not None else None)
    attempts = _record_attempt(out, resumed=resume and (out / CHECKPOINT).exists()) if world.is_main else 0
    fit = fit_within_memory(trainer, resume, recipe.train.batch_size)
    if not world.is_main:  # rank 0 evaluates and writes; run() hands its summary to every rank
        return {}
    net.cpu(), method.cpu()  # evaluation, latency and export run on the CPU, whatever trained
    place_teacher(teacher, torch.device("cpu"))
    if hasattr(teacher, "close"):
        teacher.close()
    fit_info = {
        "steps": fit.steps, "epochs": fit.epochs, "wall_time_s": round(fit.wall_time_s, 3),
        # the training time of every attempt (each one's up to its last checkpoint), not only of the last one
        "wall_time_covers": f"whole run ({attempts} attempt{'s' if attempts > 1 else ''})",
        "resumed_from_step": fit.resumed_from, "processes": world.size, "train_samples": len(train),
        "labeled_train_samples": 0 if ssl else int(train.labeled.sum()),
        "labeled_per_batch": getattr(loader, "labeled_per_batch", None),
    }
    if (cache_stats := teacher_cache_stats(teacher)) is not None:
        fit_info["teacher_cache"] = cache_stats
    if recipe.views is not None:  # the view plan: which views each side saw
        fit_info["views"] = {"student": list(method.student_views), "teacher": list(method.teacher_views)}
    if ssl:
        return evaluate_within_memory(lambda: finish_representation(
            out, recipe, real, student, feature, teacher, fit_info, warnings=watch.warnings if watch is not None else [],
            teacher_feature=getattr(method.config, "teacher_feature", None)), f"eval.batch_size={recipe.eval.batch_size}")

    def evaluate_and_write() -> dict[str, Any]:
        method.tune_on_validation(student, data.val.x, data.val.y)
        return finish(out, recipe, data, method.deploy(student), teacher, method, fit_info=fit_info)

    return evaluate_within_memory(evaluate_and_write, f"eval.batch_size={recipe.eval.batch_size}")


def representation_path(net: nn.Module, method: Method, recipe: Recipe) -> str | None:
    """Tap path of the student's representation, for probes: the wrapper's, the method's, or the zoo default."""
    if isinstance(net, EmbeddingNet):
        return net.feature
    path = getattr(method, "feature", None)
    if isinstance(path, str):
        return path
    return DEFAULT_FEATURES.get(recipe.student.arch)


def finish_representation(out: Path, recipe: Recipe, data: DataBundle, student: nn.Module, feature: str,
                          teacher: Teacher | None, fit_info: dict[str, Any],
                          warnings: Sequence[str] = (), teacher_feature: str | None = None) -> dict[str, Any]:
    """Probe a self-supervised student's representation on val and test; write it, the summary and the report.

    ``summary.test.accuracy`` is the linear probe's test accuracy (the usual headline of self-supervised
    evaluation; the kNN's with ``eval.linear_probe: false``), beside ``knn_accuracy``; the deployed student is the backbone without its projection
    head, with ``features`` (the tap path of its representation) in ``student.json``.
    """
    ev = recipe.eval
    threads = recipe.train.threads or 1
    def probed(model: nn.Module, path: str) -> tuple[dict[str, Any], str]:
        """The probe of ``model`` at ``path`` and its headline split key (linear, or kNN without it)."""
        p = probe_model(model, path, data, k=ev.knn_k, temperature=ev.knn_temperature, batch_size=ev.batch_size,
                        linear=ev.linear_probe)
        return p, "linear" if ev.linear_probe else "knn"

    probe, head = probed(student, feature)
    summary: dict[str, Any] = {
        "name": recipe.name, "method": recipe.method.name, "seed": recipe.seed, "data": recipe.data.name,
        "data_fingerprint": data.fingerprint, "kind": "representation", "feature": feature,
        "test": {"accuracy": probe[f"{head}_test"], "knn_accuracy": probe["knn_test"],
                 "linear_accuracy": probe["linear_test"]},
        "val": {"accuracy": probe[f"{head}_val"], "knn_accuracy": probe["knn_val"]},
        "probe": probe,
        "student": {"params": parameter_count(student), "size_bytes": size_on_disk(student),
                    "latency_ms": cpu_latency_ms(student, data.test.x[:1], batch_size=ev.latency_batch_size,
                                                 repeats=ev.latency_repeats, threads=threads)},
        "teacher": None, "train": fit_info, "warnings": list(warnings),
    }
    if isinstance(teacher, EmaTeacher):  # the EMA of the backbone, read where the student is
        t, head = probed(teacher.model.backbone, feature)
        summary["teacher"] = {"kind": "ema", "test": {"accuracy": t[f"{head}_test"], "knn_accuracy": t["knn_test"]},
                              "probe": t}
    elif isinstance(teacher, FrozenTeacher) and teacher_feature is not None:  # SEED's frozen encoder
        t, head = probed(teacher.model, teacher_feature)
        summary["teacher"] = {"kind": "frozen", "feature": teacher_feature, "params": parameter_count(teacher.model),
                              "test": {"accuracy": t[f"{head}_test"], "knn_accuracy": t["knn_test"]}, "probe": t}
    meta = {"arch": recipe.student.resolved(), "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "class_names": data.class_names, "features": feature}
    return _write_finished(out, student, meta, summary)


def finish(out: Path, recipe: Recipe, data: DataBundle, student: nn.Module, teacher: Teacher | None,
           method: Method, fit_info: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the deployed student on val and test; write it, its predictions, the summary and the report."""
    ev = recipe.eval
    threads = recipe.train.threads or 1
    example = data.test.x[:1]
    test_logits = predict(student, _inputs(data.test, ev.batch_size))
    val_logits = predict(student, _inputs(data.val, ev.batch_size))
    summary: dict[str, Any] = {
        "name": recipe.name, "method": recipe.method.name, "seed": recipe.seed, "data": recipe.data.name,
        "data_fingerprint": data.fingerprint,
        "test": classification_metrics(test_logits, data.test.y, ev.ece_bins),
        "val": classification_metrics(val_logits, data.val.y, ev.ece_bins),
        "student": {"params": parameter_count(student), "size_bytes": size_on_disk(student),
                    "latency_ms": cpu_latency_ms(student, example, batch_size=ev.latency_batch_size,
                                                 repeats=ev.latency_repeats, threads=threads)},
        "teacher": None,
        "train": fit_info,
    }
    preds = {"test_logits": test_logits.float(), "test_target": data.test.y}
    if teacher is not None:
        t_logits = teacher_logits(teacher, data.test, ev.batch_size)
        preds["teacher_test_logits"] = t_logits
        summary["test"]["agreement"] = agreement(test_logits, t_logits)
        summary["teacher"] = {"test": classification_metrics(t_logits, data.test.y, ev.ece_bins),
                              "fingerprint": teacher.fingerprint()}
        if isinstance(teacher, FrozenTeacher):
            summary["teacher"].update(
                params=parameter_count(teacher.model), size_bytes=size_on_disk(teacher.model),
                latency_ms=cpu_latency_ms(teacher.model, example, batch_size=ev.latency_batch_size,
                                          repeats=ev.latency_repeats, threads=threads))
    atomic_save(dict(preds), {"kind": "predictions"}, out / PREDICTIONS, what="predictions")
    meta = {"arch": recipe.student.resolved(), "input_shape": list(data.input_shape),
            "num_classes": data.num_classes, "class_names": data.class_names}
    deploy = method.deploy_meta()
    if deploy is not None:
        meta["deploy"] = {"method": recipe.method.name, **deploy}
    return _write_finished(out, student, meta, summary)


def _write_finished(out: Path, student: nn.Module, meta: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The last writes of a run, each atomic: the student and its metadata, the summary, the report, and
    the marker that says the run is finished (written last)."""
    from alambic.report import render_report

    _write(out / STUDENT_WEIGHTS, lambda: export_safetensors(student, out / STUDENT_WEIGHTS,
                                                             metadata={"alambic": json.dumps(meta)}))
    _write_text(out / STUDENT_META, json.dumps(meta, indent=2))
    _write_text(out / SUMMARY, json.dumps(summary, indent=2))
    _write(out / REPORT, lambda: render_report(out))
    mark_finished(out)
    return summary


def classification_metrics(logits: torch.Tensor, target: torch.Tensor, bins: int) -> dict[str, float]:
    return {"accuracy": accuracy(logits, target), "ece": expected_calibration_error(logits, target, bins),
            "nll": nll(logits, target)}


def teacher_logits(teacher: Teacher, split: Split, batch_size: int) -> torch.Tensor:
    loader = make_loader(split, batch_size, shuffle=False)
    return torch.cat([teacher.outputs(b, [INPUT])[INPUT].logits for b in loader.epoch(0)]).float()


def _inputs(split: Split, batch_size: int):
    return (split.x[i : i + batch_size] for i in range(0, len(split), batch_size))


# -- run directories ---------------------------------------------------------------------------------------


def is_finished(run_dir: str | Path) -> bool:
    """True when ``run_dir`` holds a finished run: its marker (written last) and every file the marker lists."""
    run_dir = Path(run_dir)
    if not (run_dir / FINISHED).exists() and not (run_dir / ATTEMPTS).exists():
        return _finished_before_markers(run_dir)
    try:
        files = json.loads((run_dir / FINISHED).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(files, list) and all((run_dir / f).is_file() for f in files)


def _finished_before_markers(run_dir: Path) -> bool:
    """A run directory made by an alambic that wrote no marker (nor ``attempts.jsonl``): finished when its
    summary reads and its report (rendered after the plots, written last) is not empty."""
    try:
        summary_ok = isinstance(json.loads((run_dir / SUMMARY).read_text()), dict)
        return summary_ok and (run_dir / STUDENT_WEIGHTS).is_file() and (run_dir / STUDENT_META).is_file() \
            and (run_dir / REPORT).stat().st_size > 0
    except (OSError, ValueError):
        return False


def finished_summary(run_dir: Path) -> dict[str, Any]:
    """The summary of a finished run; one line naming the file when it cannot be read."""
    path = run_dir / SUMMARY
    try:
        summary = json.loads(path.read_text())
        if not isinstance(summary, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{path} is unreadable ({type(exc).__name__}: {exc}) although the run is marked finished: "
                          f"delete {run_dir / FINISHED} and run again with --resume to rebuild it") from None
    return summary


def mark_finished(out: Path, folders: tuple[str, ...] = ("plots",)) -> None:
    """Write the marker, last: the files this run promises, every one of them on disk by now (those of
    ``folders`` too: a language run adds its ``student/``)."""
    files = [n for n in (RECIPE, METRICS, STUDENT_WEIGHTS, STUDENT_META, PREDICTIONS, SUMMARY, REPORT)
             if (out / n).is_file()]
    files += sorted(p.relative_to(out).as_posix() for d in folders for p in (out / d).glob("*") if p.is_file())
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    _write_text(out / FINISHED, json.dumps({"finished_at": stamp, "files": files}, indent=2))


def lock_run_dir(out: Path) -> int:
    """Create ``out`` if needed and lock it for this process (an open descriptor: close it to let go).

    One-line errors for an ``--out`` that is a file, lies under one, cannot be written (usage: exit 2), or
    is in use by another process."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file, not a directory: choose another --out")
    for parent in out.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise OutDirError(f"--out {out} lies under {parent}, which is a file: choose another --out")
            break
    if out.is_dir() and _held(out) and not (out / RECIPE).exists():
        raise RunDirError(f"{out} is not empty and holds no alambic run: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not os.access(out, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied")
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise OutDirError(f"--out {out} cannot be written ({exc.strerror or exc}): choose another --out") from None
    if fcntl is None:
        return fd
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise RunDirError(f"{out} is in use by another alambic process{pid}: wait for it to end, "
                          "or choose another --out") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _held(out: Path) -> set[str]:
    """Names in ``out`` besides the lock and temporary files (a write cut short by a kill)."""
    return {p.name for p in out.iterdir() if p.name != LOCK and not (p.name.startswith(".") and ".tmp" in p.name)}


def _prepare_run_dir(out: Path, recipe: Recipe, resume: bool) -> bool:
    """Check ``out`` (locked) can take this run and record the recipe; True if it already holds the finished run.

    A directory with nothing but a recorded recipe (a run that failed before training) is reused as if empty."""
    saved_path = out / RECIPE
    held = _held(out)
    if held and RECIPE not in held:
        raise RunDirError(f"{out} is not empty and holds no alambic run: choose another --out")
    if held - {RECIPE}:
        finished = is_finished(out)
        if not resume:
            raise RunDirError(f"{out} already holds {'a finished' if finished else 'an unfinished'} run: "
                              "pass --resume to continue it, or choose another --out")
        try:
            saved = yaml.safe_load(saved_path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RunDirError(f"--resume: {saved_path} is unreadable ({type(exc).__name__}), so this run cannot be "
                              "checked against the recipe: choose another --out") from None
        _check_same_recipe(_without_devices(resolved_again(saved)), _without_devices(recipe.resolved()), saved_path)
        if finished:
            return True
        (out / FINISHED).unlink(missing_ok=True)  # a stale marker (a listed file gone): finishing writes it again
        return False
    _write_text(saved_path, yaml.safe_dump(recipe.resolved(), sort_keys=False))
    return False


def _without_devices(resolved: Any) -> Any:
    """A resolved recipe without ``train.device`` and the teachers' ``device``: where a run computes is not
    part of what it is, so a checkpoint written on a GPU resumes on a CPU (and the reverse). Nor are
    ``train.gradient_checkpointing`` and ``train.pin_memory`` (same arithmetic): a run that ran out of memory
    resumes with checkpointing switched on."""
    if not isinstance(resolved, dict):
        return resolved
    out = copy.deepcopy(resolved)
    for section in [out.get("train"), out.get("teacher"), *(out.get("teachers") or [])]:
        if isinstance(section, dict):
            section.pop("device", None)
    if isinstance(out.get("train"), dict):
        for key in ("gradient_checkpointing", "pin_memory"):
            out["train"].pop(key, None)
    return out


def _check_same_recipe(saved: Any, now: Any, saved_path: Path) -> None:
    """A RunDirError when a resumed run's recipe differs from the saved one, naming the overrides that match."""
    diff = first_difference(saved, now)
    if diff is None:
        return
    fix = [shlex.quote(o) for o in matching_overrides(saved, now)]
    shown = " ".join(fix[:8]) + (f" and {len(fix) - 8} more: compare with {saved_path}" if len(fix) > 8 else "")
    advice = (f"to resume this run, pass the same overrides again ({shown}); or choose another --out to start "
              "a new run, without this run's checkpoint") if fix else "choose another --out to start a new run"
    raise RunDirError(f"--resume: the recipe differs from {saved_path} at {diff}; {advice}")


def matching_overrides(saved: Any, now: Any, path: str = "") -> list[str]:
    """Overrides (``key.path=value``) that turn the resolved recipe ``now`` back into ``saved``: key by key in
    sections with the same keys, the whole value elsewhere (a section of another kind: another method, model)."""
    if isinstance(saved, dict) and isinstance(now, dict) and (not path or saved.keys() == now.keys()):
        found = []
        for key in dict.fromkeys([*saved, *now]):
            found += matching_overrides(saved.get(key), now.get(key), f"{path}.{key}" if path else str(key))
        return found
    if saved == now:
        return []
    text = yaml.safe_dump(saved, default_flow_style=True, width=1 << 30).strip()
    if text.endswith("\n..."):  # a plain scalar's end-of-document line
        text = text[: -len("\n...")].strip()
    return [f"{path}={text}"]


def _record_attempt(out: Path, resumed: bool) -> int:
    """Add this attempt to ``attempts.jsonl`` (a fresh start begins it again); the number of attempts."""
    path = out / ATTEMPTS
    earlier = []
    if resumed and path.exists():
        for line in path.read_text().splitlines():
            try:
                earlier.append(json.loads(line))
            except ValueError:
                break  # a line cut by a kill
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lines = [*earlier, {"attempt": len(earlier) + 1, "started": stamp, "pid": os.getpid(), "resumed": resumed}]
    _write_text(path, "".join(json.dumps(r) + "\n" for r in lines))
    return len(lines)


def interrupted_hint(out: Path) -> str:
    """What a Ctrl-C of ``alambic run --out OUT`` leaves to do, for the CLI's ``interrupted`` line."""
    if is_finished(out):
        return f"the run in {out} is finished"
    if (out / CHECKPOINT).is_file():
        return f"continue with --resume (the last checkpoint in {out} is intact)"
    if out.is_dir() and _held(out) - {RECIPE}:
        return f"{out} has no checkpoint yet: --resume starts its training over"
    return "nothing was trained yet: run the same command again"


_WRITE_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EROFS, errno.EACCES, errno.EPERM,
                 errno.EFBIG}  # a full disk or quota, a refused write


def _write(path: Path, write: Any) -> Any:
    """``write()``, which writes ``path`` atomically; a full disk or a refused write is one line naming it."""
    try:
        return write()
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}; nothing half-written is left: make room, "
                         f"then continue with --resume") from None


def _write_text(path: Path, text: str) -> None:
    _write(path, lambda: atomic_write_text(path, text))


def resolved_again(saved: Any) -> Any:
    """A run directory's saved recipe resolved by *this* version's schema, so that an option added since
    (with its default) does not make an old run look different; as saved if it no longer validates."""
    from alambic.recipe.load import validate

    if not isinstance(saved, dict):
        return saved
    try:
        return validate(copy.deepcopy(saved), files=False).resolved()
    except AlambicError:
        return saved


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first key path where two nested structures differ, or None when they are equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(dict.fromkeys([*a, *b])):
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return sub
            found = first_difference(a[key], b[key], sub)
            if found:
                return found
        return None
    return None if a == b else f"{path or 'recipe'} ({a!r} -> {b!r})"


def cpu_threads(requested: int | None) -> int:
    """The torch thread count for ``train.threads``: at most ``os.cpu_count()``, with a one-line note on
    stderr when the recipe asks for more (thousands of threads crashed the process, exit 139, while scipy
    loaded); None keeps torch's own count."""
    if requested is None:
        return torch.get_num_threads()
    cores = os.cpu_count() or 1
    if requested > cores:
        print(f"note: train.threads={requested} is more than the {cores} CPU cores here: using {cores}",
              file=sys.stderr)
        return cores
    return requested


def fit_within_memory(trainer: Trainer, resume: bool, batch_size: int):
    """``trainer.fit(resume=resume)``, with an allocation failure during training turned into one line that
    names the step and the batch size and says what to lower (not the allocator's traceback)."""
    try:
        return trainer.fit(resume=resume)
    except Exception as exc:  # MemoryError is not a RuntimeError
        if not is_out_of_memory(exc):
            raise
    params = sum(p.numel() for p in trainer.student.parameters())
    raise AlambicError(
        f"out of memory at training step {trainer.step + 1} (a batch of train.batch_size={batch_size}, a student "
        f"of {params:,} parameters): lower train.batch_size (eval.batch_size for the validation passes) or the "
        "model's sizes"
    ) from None


def evaluate_within_memory(work: Callable[[], Any], batch: str) -> Any:
    """``work()``, the evaluation after training, with an allocation failure turned into one line: training
    is over and its last checkpoint is on disk, so the line says so and how to finish without retraining."""
    try:
        return work()
    except Exception as exc:  # MemoryError is not a RuntimeError
        if not is_out_of_memory(exc):
            raise
    raise AlambicError(
        f"out of memory evaluating the trained student ({batch}): training is finished and its checkpoint kept; "
        "free memory (or lower that batch) and run again with --resume to evaluate without retraining"
    ) from None


# -- teachers and students from disk -------------------------------------------------------------------------


def build_teacher(spec: TeacherSpec, data: DataBundle, student: nn.Module | None = None,
                  total_steps: int = 0, steps_per_epoch: int = 1, input_shape: tuple[int, ...] | None = None) -> Teacher:
    """The teacher a recipe's teacher section describes (an EMA teacher copies ``student``).

    A run directory (``run``, ``transfer.run``) whose student is a user factory (``arch: module``) is loaded
    only with ``trust_code: true`` (see :func:`alambic.student.load_student`). An estimator teacher is fit
    here, once, on the labelled training samples; it never changes afterwards, so ``cache`` applies to it as
    to a frozen network. ``input_shape``: what a cross-modal teacher sees (a paired view, not the student's
    input); its classes are then not compared with the data's.
    """
    trust = getattr(spec, "trust_code", False)
    if spec.distilled is not None:
        from alambic.distill_data import SetTargetsTeacher
        return SetTargetsTeacher.from_folder(spec.distilled)
    if spec.ema is not None:
        if student is None:
            raise AlambicError("an EMA teacher needs the student it averages")
        every = steps_per_epoch if spec.ema.update == "epoch" else 1
        return EmaTeacher(student, spec.ema.momentum, spec.ema.end_momentum, total_steps, every=every)
    if spec.transfer is not None:
        t = spec.transfer
        source, meta = _classifier_run(t.run, "teacher.transfer.run", trust)
        _check_compatible(meta["num_classes"], tuple(meta["input_shape"]), data, f"teacher.transfer.run {t.run}",
                          input_shape)
        return TransferTeacher(source, t.momentum, t.end_momentum, total_steps,
                               every=steps_per_epoch if t.update == "epoch" else 1, name_map=t.name_map, skip=t.skip)
    if spec.run is not None:
        model, meta = _classifier_run(spec.run, "teacher.run", trust)
        _check_compatible(meta["num_classes"], tuple(meta["input_shape"]), data, f"teacher.run {spec.run}", input_shape)
        return _maybe_cached(FrozenTeacher(model, shard=spec.shard), spec, data)
    if spec.model is not None:
        model = build_model(spec.model, input_shape or data.input_shape, data.num_classes, what="teacher.model")
        if spec.weights is not None:
            load_weights(model, spec.weights)
        return _maybe_cached(FrozenTeacher(model, shard=spec.shard), spec, data)
    factory = import_object(spec.estimator)
    try:
        estimator = factory(**spec.estimator_kwargs)
    except TypeError as exc:
        raise RecipeError(f"teacher.estimator_kwargs: {spec.estimator} does not take them ({exc})") from None
    labelled = data.train.labeled_only()
    estimator.fit(labelled.x.reshape(len(labelled), -1).double().numpy(), labelled.y.numpy())
    return _maybe_cached(AnalyticTeacher(estimator), spec, data)


_HINTED = False  # the composed-batch hint was printed by this process (a bench or the quickstart runs many)


def mute_composed_batch_hint() -> None:
    """Do not print the composed-batch hint in this process (a caller that has measured composed batches on
    its own setting, as the quickstart has: they did not help there)."""
    global _HINTED
    _HINTED = True


def _hint_composed_batches(train: Split, batch_size: int) -> None:
    """One line on stderr, once per process, when uniform batches leave a label-reading method few labelled
    rows per batch."""
    global _HINTED
    share = float(train.labeled.float().mean()) if len(train) else 1.0
    if 0 < share < 0.25 and share * batch_size < 8 and not _HINTED:
        _HINTED = True
        print(f"note: {share:.0%} of the training samples are labelled, so a uniform batch of {batch_size} holds "
              f"about {share * batch_size:.1f}; try train.labeled_per_batch (at the same train.steps it gained "
              "8-24 points for label-reading methods on glyphs with 5% labels: docs/results/glyphs.md)",
              file=sys.stderr)


def _maybe_cached(teacher: FrozenTeacher | AnalyticTeacher, spec: TeacherSpec, data: DataBundle) -> Teacher:
    """``teacher`` behind a :class:`CachedTeacher` when the recipe asks for one (``teacher.cache``).

    An estimator teacher is cached on disk only when its fingerprint covers its fitted state (it pickles;
    see :meth:`AnalyticTeacher.fingerprint`): the disk cache is shared by every run whose teacher has the
    same fingerprint, so a fingerprint of parameters alone could serve another fit's outputs."""
    if spec.cache == "off":
        return teacher
    if spec.cache == "disk" and isinstance(teacher, AnalyticTeacher):
        teacher.fingerprint()
        if not teacher.fingerprint_complete:
            raise RecipeError(f"teacher.cache: disk needs an estimator whose fitted state can be fingerprinted "
                              f"(pickled), and {spec.estimator} cannot be: use cache: memory")
    rows = 1 + max(int(s.index.max()) for s in (data.train, data.val, data.test) if len(s))
    folder = cache_dir("teachers") if spec.cache == "disk" else None
    return CachedTeacher(teacher, rows, folder, data.fingerprint)


def teacher_cache_stats(teacher: Teacher | None) -> dict[str, Any] | list[dict[str, Any]] | None:
    """Hits and misses of a cached teacher (per member of an ensemble), or None when nothing is cached."""
    if isinstance(teacher, CachedTeacher):
        return teacher.stats()
    if isinstance(teacher, TeacherEnsemble) and any(isinstance(t, CachedTeacher) for t in teacher.teachers):
        return [t.stats() if isinstance(t, CachedTeacher) else None for t in teacher.teachers]
    return None


def _classifier_run(run_dir: Path, what: str, trust: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The finished student of ``run_dir`` for a classification run's teacher; a language-model run is refused
    in one line (its student maps token ids to next-token logits, not inputs to classes)."""
    from alambic.student import STUDENT_META, student_kind

    if student_kind(Path(run_dir) / STUDENT_META) == "causal_lm":
        raise RunDirError(f"{what}: {run_dir} is a language-model run, which cannot teach a classifier; in a "
                          f"language recipe use teacher: {{hf: {Path(run_dir) / 'student'}}}")
    return load_student(run_dir, trust_code=trust)


def _check_compatible(num_classes: int, input_shape: tuple[int, ...], data: DataBundle, what: str,
                      seen: tuple[int, ...] | None = None) -> None:
    """The teacher's inputs must be the data's (``seen``: the paired view a cross-modal teacher sees instead,
    whatever its classes) and, unless cross-modal, its classes the data's."""
    if seen is not None:
        if tuple(input_shape) != tuple(seen):
            raise ShapeMismatchError(f"{what}: the teacher takes inputs {list(input_shape)}, but the paired view it "
                                     f"sees has samples of shape {list(seen)}")
        return
    if num_classes != data.num_classes or tuple(input_shape) != tuple(data.input_shape):
        raise ShapeMismatchError(
            f"{what}: the teacher takes inputs {list(input_shape)} and predicts {num_classes} classes, "
            f"but the data has inputs {list(data.input_shape)} and {data.num_classes} classes"
        )
