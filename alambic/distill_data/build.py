"""``alambic distill-data``: a recipe in, a distilled set folder out, resumable.

    recipe -> real training split + frozen teacher + network builder -> method (select or optimise)
           -> images, labels, targets -> DIR/set.safetensors + manifest.json

The folder is locked while a process works in it (as a run directory is). An optimised set (DM, KRR-ST)
writes ``checkpoint.safetensors`` every ``checkpoint_every`` outer steps (atomically, with a digest): the
set, its optimiser, the model pool with its optimisers, ages and reset counts. ``--resume`` after a kill
continues from it and ends with the same set as an uninterrupted run (every random draw is seeded by the
step, so no RNG state is needed). A selection (random, herding, k-center) takes well under a second and
is simply made again. When the set is written the checkpoint is deleted: the set is the product.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from alambic.distill_data.context import Context, Distiller
from alambic.distill_data.recipe import DATA_DISTILLERS, DistillRecipe
from alambic.distill_data.synthetic_set import (
    MANIFEST,
    SET_FILE,
    SyntheticSet,
    load_set,
    save_set,
)
from alambic.errors import AlambicError, RunDirError

CHECKPOINT, RECIPE = "checkpoint.safetensors", "recipe.yaml"
Teacher = Callable[[torch.Tensor], torch.Tensor]
StepHook = Callable[[int, dict[str, float]], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def frozen_teacher(recipe: DistillRecipe, device: torch.device) -> tuple[Teacher | None, dict[str, Any] | None]:
    """``teacher(x) -> [B, k]``: the representation of the finished run ``teacher.run`` at ``teacher_feature``
    (default: the run's recorded representation, else its architecture's), in eval mode, without gradient,
    its parameters frozen; and its provenance. (None, None) without a teacher section."""
    from alambic.eval.probes import extract_features
    from alambic.models.heads import DEFAULT_FEATURES
    from alambic.student import load_student
    from alambic.teachers.frozen import state_fingerprint

    spec = recipe.teacher
    if spec is None:
        return None, None
    model, meta = load_student(spec.run, trust_code=spec.trust_code)
    feature = recipe.teacher_feature or meta.get("features") or DEFAULT_FEATURES.get(meta["arch"].get("arch"))
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)

    def teacher(x: torch.Tensor) -> torch.Tensor:
        return extract_features(model, x.detach(), feature, batch_size=1024).to(device)

    teacher.model = model  # type: ignore[attr-defined]
    provenance = {"run": str(spec.run), "feature": feature, "fingerprint": state_fingerprint(model),
                  "input_shape": list(meta["input_shape"])}
    return teacher, provenance


def make_context(recipe: DistillRecipe, say: Callable[[str], None] = lambda _m: None):
    """(Context, the real DataBundle, the teacher's provenance) for ``recipe``."""
    from alambic.data.splits import build_data
    from alambic.models.heads import DEFAULT_FEATURES
    from alambic.models.zoo import build_model
    from alambic.train.devices import resolve_device

    device = resolve_device(recipe.device, "device")
    data = build_data(recipe.data)
    train = data.train.labeled_only()
    if len(train) == 0:
        raise AlambicError("data: the training split has no labelled sample to distil from")
    teacher, provenance = frozen_teacher(recipe, device)
    if provenance is not None and tuple(provenance["input_shape"]) != tuple(data.input_shape):
        raise AlambicError(f"teacher.run {recipe.teacher.run}: takes inputs {provenance['input_shape']}, but the "
                           f"data's are {list(data.input_shape)}")

    def network(out_dim: int) -> torch.nn.Module:
        return build_model(recipe.network, data.input_shape, out_dim, what="network")

    ctx = Context(x=train.x.to(device), y=train.y.clone(), ids=train.index.clone(), num_classes=data.num_classes,
                  per_class=recipe.distill.images_per_class, seed=recipe.seed, teacher=teacher, network=network,
                  device=device, feature=DEFAULT_FEATURES.get(recipe.network.arch), say=say)
    return ctx, data, provenance


def distill_data(recipe: DistillRecipe, out: str | Path, *, resume: bool = False, progress: bool = True,
                 on_step: StepHook | None = None) -> dict[str, Any]:
    """Distil the set ``recipe`` describes into folder ``out``; returns its manifest.

    ``out`` must be new or empty, or (with ``resume``) hold this recipe's unfinished or finished
    distillation: a finished one is returned as it is, an unfinished one continues from its checkpoint.
    ``on_step(step, logs)`` is called after every outer step (tests interrupt a run from it)."""
    from alambic.run import first_difference, lock_run_dir
    from alambic.train.state import atomic_write_text

    out = Path(out)
    say = _stderr if progress else (lambda _m: None)
    lock = lock_run_dir(out)
    try:
        resolved = recipe.resolved()
        if _prepare(out, resolved, resume, first_difference):
            return json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        atomic_write_text(out / RECIPE, yaml.safe_dump(resolved, sort_keys=False))
        return _distill(recipe, resolved, out, resume, say, on_step)
    finally:
        os.close(lock)


def _prepare(out: Path, resolved: dict[str, Any], resume: bool, first_difference) -> bool:
    """True when ``out`` already holds this finished set (and ``resume``); refuses what cannot continue."""
    held = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    if held <= {RECIPE}:  # empty, or a distillation that failed before its first checkpoint: start afresh
        return False
    finished = (out / MANIFEST).is_file() and (out / SET_FILE).is_file()
    if not resume:
        state = "a finished distilled set" if finished else "an unfinished distillation"
        raise RunDirError(f"{out} already holds {state}: pass --resume to "
                          f"{'reuse' if finished else 'continue'} it, or choose another --out")
    try:
        saved = yaml.safe_load((out / RECIPE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RunDirError(f"--resume: {out / RECIPE} is unreadable ({type(exc).__name__}): choose another --out") \
            from None
    saved = {k: v for k, v in (saved or {}).items() if k not in ("threads", "device", "log_every")}
    now = {k: v for k, v in resolved.items() if k not in ("threads", "device", "log_every")}
    if (diff := first_difference(saved, now)) is not None:
        raise RunDirError(f"--resume: the recipe differs from {out / RECIPE} at {diff}: pass the same recipe and "
                          "overrides, or choose another --out")
    if finished:
        load_set(out)  # verified: a damaged set is not handed back as finished
        return True
    return False


def _distill(recipe: DistillRecipe, resolved: dict[str, Any], out: Path, resume: bool, say,
             on_step: StepHook | None) -> dict[str, Any]:
    from alambic.run import cpu_threads
    from alambic.train.state import atomic_save, load, prefixed, unprefixed

    torch.set_num_threads(cpu_threads(recipe.threads))
    method = recipe.distill.method
    ctx, data, teacher_info = make_context(recipe, say)
    entry = DATA_DISTILLERS.get(method)
    start_time = time.perf_counter()
    distiller: Distiller = entry.obj(ctx, recipe.distill.options)
    total, start, earlier_wall, last, history = distiller.total_steps, 0, 0.0, {}, []
    ckpt = out / CHECKPOINT
    if resume and ckpt.is_file():
        tensors, meta = load(ckpt, what="distillation checkpoint", require_digest=True)
        if meta.get("recipe") != _identity(resolved) or not 0 < int(meta.get("step", -1)) <= total:
            raise RunDirError(f"--resume: {ckpt} was written by another distillation: choose another --out")
        distiller.load_state(unprefixed("state", tensors), meta["state"])
        start, earlier_wall, last = int(meta["step"]), float(meta["wall_time_s"]), meta.get("logs", {})
        history = list(meta.get("history", []))
        say(f"distill-data {method}: resuming at step {start}/{total} from {ckpt}")
    elif total:
        say(f"distill-data {method}: {total} steps, {ctx.size} images ({ctx.per_class} per class) from "
            f"{len(ctx.x)} real training images")
    resumed_from = start
    began = time.perf_counter()
    for step in range(start, total):
        logs = distiller.step(step)
        bad = [k for k, v in logs.items() if not math.isfinite(v)]
        if bad:
            kept = f"the last checkpoint is kept in {ckpt}" if ckpt.is_file() else "no checkpoint was written yet"
            raise AlambicError(f"distill-data {method}: non-finite {bad[0]} = {logs[bad[0]]} at step {step + 1} "
                               f"(lower the method's lr); {kept}")
        last = logs
        done = step + 1
        if done % recipe.log_every == 0 or done == total or step == 0:
            history.append({"step": done, **logs})
        if done % recipe.log_every == 0 or done == total:
            rate = (done - resumed_from) / max(time.perf_counter() - began, 1e-9)
            eta = (total - done) / rate if rate > 0 else 0.0
            terms = " ".join(f"{k} {v:.4g}" for k, v in logs.items())
            say(f"distill-data {method}: step {done}/{total} {terms} ({rate:.1f} steps/s, eta {eta:.0f} s)")
        if done % recipe.checkpoint_every == 0 and done < total:
            state_t, state_m = distiller.state()
            wall = earlier_wall + time.perf_counter() - start_time
            atomic_save(prefixed("state", state_t), {"step": done, "recipe": _identity(resolved), "state": state_m,
                                                     "wall_time_s": wall, "logs": logs, "history": history},
                        ckpt, what="distillation checkpoint")
        if on_step is not None:
            on_step(step, logs)
    images, labels, targets, extra = distiller.result()
    if targets is None and ctx.teacher is not None:  # every set carries the teacher's view of its images
        targets = ctx.teacher(images.to(ctx.device)).cpu()
    wall = earlier_wall + time.perf_counter() - start_time
    meta = {
        "name": recipe.name, "method": method, "options": recipe.distill.options.model_dump(mode="json"),
        "images_per_class": ctx.per_class, "num_classes": ctx.num_classes, "class_names": data.class_names,
        "seed": recipe.seed, "data": resolved["data"], "data_fingerprint": data.fingerprint,
        "real_train_images": len(ctx.x), "teacher": teacher_info, "network": resolved["network"],
        "network_feature": ctx.feature, "steps": total, "resumed_from_step": resumed_from or None,
        "wall_time_s": round(wall, 3), "final": last, "history": history, "targets": _targets_kind(method, targets), **extra,
    }
    save_set(SyntheticSet(images, labels, targets, meta), out, yaml.safe_dump(resolved, sort_keys=False))
    ckpt.unlink(missing_ok=True)
    say(f"distill-data {method}: wrote {out / SET_FILE} ({len(images)} images{'' if labels is None else ', labelled'}"
        f"{'' if targets is None else f', targets {targets.shape[1]}-d'}) in {wall:.1f} s")
    return json.loads((out / MANIFEST).read_text(encoding="utf-8"))


def _identity(resolved: dict[str, Any]) -> dict[str, Any]:
    """What decides the set (not where or how fast it is computed, nor how chatty)."""
    return {k: v for k, v in resolved.items() if k not in ("threads", "device", "log_every")}


def _targets_kind(method: str, targets: torch.Tensor | None) -> str | None:
    if targets is None:
        return None
    return "learned (KRR-ST's Y_s)" if method == "krr_st" else "the teacher's representations of the set's images"
