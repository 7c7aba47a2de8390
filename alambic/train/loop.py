"""The one explicit training loop.

``Trainer.train_step`` reads like the data-flow diagram of DESIGN.md: teacher outputs -> student outputs
-> method loss -> backward -> (after ``grad_accum`` chunks) clip -> optimizer step -> teacher.after_step.
``fit`` adds epochs, validation, metrics, checkpoints and resume around it. Extend it through
:class:`Callback` events, not by overriding it.

Resume is exact on the CPU: the checkpoint holds the student, the method's state, the optimizer, every
RNG and the position in the epoch; the loader's order is a pure function of (seed, epoch) and the
learning rate a pure function of the step, so a resumed run replays the same arithmetic.

Host reads: on an accelerator each step's loss stays on the device and the host reads it (and checks it is
finite) only where it needs the value: a metric line, a checkpoint, an epoch's end, or every step when there are
callbacks; a non-finite loss found there names its own step and stops the run before anything is written
(:meth:`Trainer.check_finite`). A CPU reads every step (``SYNC_FREE``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from alambic.data.batch import Batch
from alambic.errors import NonFiniteLossError
from alambic.methods.base import Method, SetupInfo, StepContext
from alambic.models.taps import Taps
from alambic.recipe.schema import TrainSpec
from alambic.teachers.base import Teacher
from alambic.teachers.frozen import model_outputs
from alambic.train import distributed as dist
from alambic.train import fsdp
from alambic.train import state as st
from alambic.data.loader import request_pinned
from alambic.train.checkpointing import enable_gradient_checkpointing
from alambic.train.devices import (autocast, check_precision, float_outputs, grad_scaler, move_batch, move_outputs,
                                   pins, place_teacher, resolve_device)
from alambic.train.metrics import MetricsLog
from alambic.train.progress import training_progress
from alambic.train.schedules import lr_schedule
from alambic.train.sync_batchnorm import convert_sync_batchnorm

CHECKPOINT = "checkpoint.safetensors"
# devices where reading a step's loss on the host costs nothing, so it is read (and checked) every step; on
# the others (cuda, mps) that read waits for the device, and the loop does it only where it needs the value
SYNC_FREE = ("cpu",)


class Callback:
    """Typed events of the loop; override what you need (all are no-ops here)."""

    def on_fit_start(self, trainer: "Trainer", resumed: bool) -> None: ...

    def on_step_end(self, trainer: "Trainer", step: int, logs: dict[str, Any]) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", epoch: int, val: dict[str, float] | None) -> None: ...

    def on_checkpoint(self, trainer: "Trainer", path: Path) -> None: ...


@dataclass
class FitResult:
    steps: int
    epochs: int
    wall_time_s: float
    resumed_from: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        student: nn.Module,
        method: Method,
        train_loader,
        cfg: TrainSpec,
        *,
        teacher: Teacher | None = None,
        run_dir: Path | None = None,
        val_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        callbacks: Sequence[Callback] = (),
        progress: bool = True,
        teacher_device: str | torch.device | None = None,
    ):
        self.student, self.method, self.teacher = student, method, teacher
        self.loader, self.cfg = train_loader, cfg
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # several processes (torchrun): rank 0 alone writes metrics and checkpoints and runs validation
        self.world = dist.current()
        self.val_fn, self.callbacks = val_fn, list(callbacks)
        self.show_progress = progress and self.world.is_main
        main_dir = self.run_dir if self.world.is_main else None
        self.metrics = MetricsLog(main_dir / "metrics.jsonl" if main_dir else None)
        # the device (train.device) and precision (train.precision): see alambic.train.devices
        self.device = dist.rank_device(resolve_device(cfg.device))
        check_precision(self.device, cfg.precision)
        student.to(self.device)
        if teacher is not None:
            place_teacher(teacher, resolve_device(str(teacher_device), "teacher.device")
                          if teacher_device is not None else self.device)
        self.scaler = grad_scaler(self.device, cfg.precision)
        # train.pin_memory (CUDA only): the loader gathers batches into page-locked memory where it can
        self.pin = pins(self.device, cfg.pin_memory)
        if self.pin:
            request_pinned(train_loader)
        if cfg.gradient_checkpointing:  # train.gradient_checkpointing: alambic.train.checkpointing
            enable_gradient_checkpointing(student)
        if cfg.sync_batchnorm and self.world.size > 1:  # global batch statistics (before taps hook the layers)
            convert_sync_batchnorm(student)
        self.forward_student = torch.compile(student) if cfg.compile else student

        self.student_taps = Taps(student, method.student_taps()).attach() if method.student_taps() else None
        if teacher is not None and hasattr(teacher, "use_taps"):
            teacher.use_taps(method.teacher_taps())
        self.teacher_fingerprint = _resume_fingerprint(teacher)  # before anything can move a teacher
        self.steps_per_epoch = len(train_loader)
        self.epochs, self.total_steps = cfg.plan(self.steps_per_epoch)
        self.info = self._setup_method()
        method.to(self.device)  # state the method built in setup (centers, queues, heads) lives by the student
        if cfg.sync_batchnorm and self.world.size > 1:  # the heads' BatchNorm too (DINO's, SEED's projector)
            convert_sync_batchnorm(method)
        dist.broadcast_module(method)  # heads drawn after seeding: rank 0's everywhere
        dist.broadcast_module(student)
        self.sharded = cfg.shard == "fsdp" and self.world.size > 1  # train.shard: alambic.train.fsdp
        if self.sharded:
            fsdp.shard(student, self.device)
        # teacher.shard: fsdp (alambic.train.fsdp.shard_teacher): each rank keeps 1/N of a frozen teacher's weights
        self.sharded_teachers = fsdp.teacher_models(teacher) if self.world.size > 1 else []
        for model in self.sharded_teachers:
            fsdp.shard_teacher(model, self.device)
        # BatchNorm running statistics rank 0 broadcasts before each step (none synchronised or absent: no collective)
        self._bn_buffers = dist.batchnorm_buffers(student, method) if self.world.size > 1 else []
        self.method_schedules = method.schedules(self.info)
        for name, values in self.method_schedules.items():
            if len(values) != self.total_steps:
                raise ValueError(f"schedule '{name}' has {len(values)} values for {self.total_steps} steps")
        params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
        self.averaged = [p for p in params if not fsdp.is_sharded(p)]  # FSDP reduce-scatters its own
        self.optimizer = make_optimizer(params, cfg)
        warmup = int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.lrs = lr_schedule(cfg.lr, self.total_steps, self.steps_per_epoch, cfg.schedule, warmup,
                               cfg.step_epochs, cfg.step_gamma).tolist()
        self.step = 0
        self._clock: float | None = None  # perf_counter at the start of this fit()
        self._earlier_s = 0.0  # training seconds of earlier attempts, read from the checkpoint on resume
        self.checkpoint_step: int | None = None  # the step of the checkpoint on disk (written or resumed from)
        # (step, loss, terms) of the steps whose loss the host has not read yet (check_finite)
        self._unchecked: list[tuple[int, torch.Tensor, dict[str, Any]]] = []
        self._check_every_step = True  # set by fit()

    # -- one step ---------------------------------------------------------------------------------------

    def train_step(self, batch: Batch, ctx: StepContext, check: bool = True) -> dict[str, Any]:
        """One optimizer step. ``check`` (the default): the loss is read on the host and a non-finite one raises
        :class:`~alambic.errors.NonFiniteLossError` before the optimizer step; ``check=False`` leaves the loss
        on the device (no host sync) and its check to the next checked step (:meth:`check_finite`)."""
        if not self.student.training:  # .train() walks every submodule: only when something switched it off
            self.student.train()
        if not self.method.training:
            self.method.train()
        batch = move_batch(batch, self.device, self.pin)  # once per step
        batch = self.method.prepare(batch, ctx)  # on-policy methods draw their completions here (gkd)
        rows_global = len(batch)
        share = 1.0  # N · this rank's share of the global batch: the mean over ranks is the global mean
        if self.world.size > 1:
            full, batch = batch, batch.select(dist.shard(rows_global, self.world))
            share = self.world.size * float(self.method.chunk_weight(batch, full))
            if self._bn_buffers:  # BatchNorm running statistics: rank 0's, as DDP
                dist.broadcast_buffers(bufs=self._bn_buffers)
        if self.cfg.grad_accum == 1:
            out = self._forward(batch, ctx)
            self._backward(out.loss if share == 1.0 else out.loss * share)
            total, terms, monitors = out.loss.detach(), dict(out.terms), dict(out.monitors)
        else:  # chunks weighted by the method's chunk_weight (rows share; token share for token losses): one big step
            n = len(batch)
            total, terms, monitors = torch.zeros((), device=self.device), {}, {}
            # several ranks: the same number of chunks on each (forwards of a sharded teacher or student and
            # synchronised BatchNorm are collectives every rank joins)
            count = min(self.cfg.grad_accum, max(1, rows_global // self.world.size)) if self.world.size > 1 else None
            for rows in _chunks(n, self.cfg.grad_accum, count):
                chunk = batch.select(rows)
                weight = self.method.chunk_weight(chunk, batch)
                out = self._forward(chunk, ctx)
                self._backward(out.loss * (weight * share))
                total = total + out.loss.detach() * weight
                for k, v in out.terms.items():
                    terms[k] = terms.get(k, 0.0) + v * weight
                for k, v in out.monitors.items():
                    monitors[k] = monitors.get(k, 0.0) + v.detach() * weight
        if self.world.size > 1:  # gradients averaged; the global batch's loss and terms on every rank (all stop
            # together on a nan), in the same all-reduce
            vec = dist.average_gradients(self.averaged, _pack_logs(total, terms, monitors, share / self.world.size))
            total, terms, monitors = _unpack_logs(vec, terms, monitors)
        self._unchecked.append((ctx.step + 1, total, terms))
        loss: Any = total  # a 0-d tensor on the device until the host reads it (a log step: see _check_step)
        if check:
            loss = self.check_finite()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad_norm is not None:
            nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.cfg.clip_grad_norm
            )
        lr = self.lrs[ctx.step]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler is not None:  # fp16: skips the step when a gradient overflowed, then adapts the scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.teacher is not None:
            self.teacher.after_step(self.student, ctx.step + 1)
        return {"loss": loss, "terms": terms, "lr": lr, "monitors": monitors, "rows": rows_global}

    def check_finite(self) -> float | None:
        """Read the losses of the steps not checked yet on the host (one device-to-host copy) and raise
        :class:`~alambic.errors.NonFiniteLossError` at the first non-finite one, naming that step and term and
        the last good checkpoint; returns the last step's loss (None when every step was checked already)."""
        if not self._unchecked:
            return None
        pending, self._unchecked = self._unchecked, []
        for (step, total, terms), value in zip(pending, host_floats([t for _, t, _ in pending])):
            if not math.isfinite(value):
                bad = next((k for k, v in terms.items() if not math.isfinite(float(v))), "loss")
                self.optimizer.zero_grad(set_to_none=True)
                kept = str(self.checkpoint_path) if self.checkpoint_step is not None else None
                raise NonFiniteLossError(step, bad, float(terms.get(bad, total)), kept, self.checkpoint_step)
        return value

    def _check_step(self, pos: int) -> bool:
        """Whether the fit loop reads this step's loss on the host: always on a CPU (it costs nothing) and where
        the host needs it anyway (a metric line, a checkpoint, the epoch's end, callbacks, which never see a
        non-finite step); on an accelerator the other steps keep it on the device, so the loop does not wait
        for the device every step. The same on every rank (a non-finite loss stops them at the same step)."""
        step = self.step + 1
        return (self._check_every_step or step % self.cfg.log_every == 0 or step >= self.total_steps
                or pos + 1 >= self.steps_per_epoch
                or bool(self.cfg.checkpoint_every and step % self.cfg.checkpoint_every == 0))

    def _backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.cfg.gradient_checkpointing and self.student_taps is not None:
            self.student_taps.clear()  # the recomputation in backward fired the taps' hooks again

    def _forward(self, batch: Batch, ctx: StepContext):
        """Teacher outputs, student outputs, the method's loss: the top of the diagram. With bf16/fp16 the two
        forwards run under autocast and the method on their outputs cast to fp32 (softmaxes, distances and
        similarities of every method in fp32; :func:`~alambic.train.devices.float_outputs`)."""
        with autocast(self.device, self.cfg.precision):
            teacher_out = None
            if self.teacher is not None:
                teacher_out = move_outputs(self.teacher.outputs(batch, self.method.teacher_views), self.device)
            student_out = model_outputs(self.forward_student, batch, self.method.student_views, self.student_taps)
        if self.cfg.precision != "fp32" and not self.method.upcasts_itself:  # a [B, T, V] copy otherwise
            student_out, teacher_out = float_outputs(student_out), float_outputs(teacher_out)
        return self.method(student_out, teacher_out, batch, ctx)

    # -- the loop ---------------------------------------------------------------------------------------

    def fit(self, resume: bool = False) -> FitResult:
        epoch, pos, resumed = 0, 0, None
        if resume and self.checkpoint_path is not None and dist.broadcast_object(self.checkpoint_path.exists()):
            epoch, pos = self.load_checkpoint(self.checkpoint_path)
            resumed = self.step
            self.metrics.truncate_after(self.step)
        elif self.run_dir is not None and self.world.is_main:
            self.metrics.truncate_after(-1)
        # every step's loss read on the host where that is free (a CPU) or where a rank runs callbacks (any rank:
        # a non-finite loss must stop every rank at the same step); else only at the steps of _check_step
        self._check_every_step = self.device.type in SYNC_FREE or any(
            dist.gather_objects(bool(self.callbacks)) if self.world.size > 1 else [bool(self.callbacks)])
        self._clock = time.perf_counter()
        window = _Window()
        self.status: dict[str, str] = {}  # short "name value" strings callbacks and monitors show in the bar
        with self._progress() as bar:
            task = bar.add_task("train", total=self.total_steps, completed=self.step, loss=float("nan"), sps=0.0,
                                status="", epoch=epoch + 1, epochs=self.epochs)
            for cb in self.callbacks:
                cb.on_fit_start(self, resumed is not None)
            while epoch < self.epochs:
                for batch in self.loader.epoch(epoch, start=pos):
                    if self.step >= self.total_steps:  # train.steps may end the last epoch early
                        break
                    ctx = StepContext(self.step, epoch, self.total_steps, self.steps_per_epoch,
                                      {k: float(v[self.step]) for k, v in self.method_schedules.items()})
                    logs = self.train_step(batch, ctx, check=self._check_step(pos))
                    self.step += 1
                    pos += 1
                    window.add(logs, logs.get("rows", len(batch)))
                    if self.step % self.cfg.log_every == 0:
                        record = window.flush(self.step, epoch, logs["lr"])
                        self.metrics.write(record)
                        self.status.update({k: f"{v:.3g}" for k, v in record.get("monitors", {}).items()})
                        bar.update(task, loss=record["loss"], sps=record["samples_per_s"], status=self._status())
                    bar.update(task, advance=1, epoch=epoch + 1)  # the status text changes only at a metric line
                    if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0 and pos < self.steps_per_epoch:
                        self.save_checkpoint(epoch, pos)
                    for cb in self.callbacks:
                        cb.on_step_end(self, self.step, logs)
                if window.count:
                    self.metrics.write(window.flush(self.step, epoch, logs["lr"]))
                val = None
                if self.val_fn is not None and (self.world.is_main or self.sharded or self.sharded_teachers) and (
                        (epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.epochs):
                    val = self.val_fn(self.student)
                    self.metrics.write({"split": "val", "step": self.step, "epoch": epoch + 1, **val})
                    bar.update(task, description=f"epoch {epoch + 1}/{self.epochs} · {_val_text(val)}",
                               val_acc=val.get("accuracy"), val_ppl=val.get("perplexity"))
                epoch, pos = epoch + 1, 0
                self.save_checkpoint(epoch, pos)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, epoch, val)
        self.close()
        return FitResult(self.step, self.epochs, self._earlier_s + time.perf_counter() - self._clock, resumed)

    def close(self) -> None:
        if self.student_taps is not None:
            self.student_taps.remove()
        if self.sharded:  # an ordinary module again, full tensors on every rank: evaluation, export
            fsdp.consolidate(self.student)
            self.sharded = False
        for model in self.sharded_teachers:  # the teacher whole again: rank 0 evaluates it alone
            fsdp.consolidate(model)
        self.sharded_teachers = []

    # -- checkpoints ------------------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path | None:
        return self.run_dir / CHECKPOINT if self.run_dir is not None else None

    def save_checkpoint(self, epoch: int, pos: int) -> None:
        """Rank 0 writes (every rank's RNG state included); the other ranks wait until the file is there."""
        path = self.checkpoint_path
        if path is None:
            return
        rngs = _device_rngs(self.device)
        if self.sharded:  # a collective: every rank all-gathers the full tensors, rank 0 writes them
            full_student, (opt_t, opt_m) = fsdp.full_module_state(self.student), st.optimizer_state(
                fsdp.full_optimizer(self.optimizer))
        if self.world.size > 1:  # a collective: every rank calls save_checkpoint at the same step
            every = dist.gather_objects(rngs)
            rngs = {f"{k}.{r}": v for r, states in enumerate(every) for k, v in states.items()}
        if not self.world.is_main:
            dist.barrier()
            self.checkpoint_step = self.step
            for cb in self.callbacks:
                cb.on_checkpoint(self, path)
            return
        if not self.sharded:
            full_student, (opt_t, opt_m) = st.module_state(self.student), st.optimizer_state(self.optimizer)
        rng_t, rng_m = st.rng_state()
        tensors = {
            **st.prefixed("student", full_student),
            **st.prefixed("method", st.module_state(self.method)),
            **st.prefixed("optim", opt_t),
            **st.prefixed("rng", rng_t),
            **st.prefixed("rng_device", rngs),
        }
        if self.teacher is not None and hasattr(self.teacher, "state_tensors"):
            tensors.update(st.prefixed("teacher", self.teacher.state_tensors()))
        # training time so far, earlier attempts included (up to their last checkpoint): a resumed run reports
        # what the whole run cost, not only its last piece
        wall = self._earlier_s + (time.perf_counter() - self._clock if self._clock is not None else 0.0)
        meta = {"step": self.step, "epoch": epoch, "pos": pos, "optim": opt_m, "rng": rng_m,
                "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                "wall_time_s": round(wall, 3)}
        if self.teacher_fingerprint is not None:
            meta["teacher"] = self.teacher_fingerprint
        if self.scaler is not None:
            meta["grad_scaler"] = self.scaler.state_dict()
        if self.world.size > 1:
            meta["world_size"] = self.world.size
        try:
            st.atomic_save(tensors, meta, path)
        finally:
            dist.barrier()
        self.checkpoint_step = self.step
        for cb in self.callbacks:
            cb.on_checkpoint(self, path)

    def load_checkpoint(self, path: Path) -> tuple[int, int]:
        """Restore the state :meth:`save_checkpoint` wrote; returns (epoch, position in it).

        The file is verified against its digest (:func:`~alambic.train.state.load`) and checked against this
        run (:func:`~alambic.train.state.check_checkpoint`: metadata, tensor names and shapes, the teacher's
        fingerprint) before anything is restored; whatever still fails to load is a one-line
        :class:`~alambic.errors.CheckpointError` naming the file, never a traceback."""
        tensors, meta = st.load(path)  # CPU tensors: load_state_dict copies them onto the run's device
        if meta.get("world_size", 1) != self.world.size:
            from alambic.errors import CheckpointError

            raise CheckpointError(f"checkpoint {path} was written by {meta.get('world_size', 1)} process(es), this run "
                                  f"has {self.world.size}: resume with the same --nproc-per-node")
        stateful = self.teacher is not None and hasattr(self.teacher, "load_state_tensors")
        st.check_checkpoint(path, tensors, meta, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch,
                            epochs=self.epochs, optimizer=self.optimizer,
                            modules={"student": self.student, "method": self.method},
                            teacher_fingerprint=self.teacher_fingerprint, teacher_name=_teacher_name(self.teacher))
        try:
            if self.sharded:
                fsdp.load_full_state(self.student, st.unprefixed("student", tensors))
            else:
                self.student.load_state_dict(st.unprefixed("student", tensors))
            self.method.load_state_dict(st.unprefixed("method", tensors))
            st.load_optimizer_state(self.optimizer, st.unprefixed("optim", tensors), meta["optim"])
            if self.sharded:
                fsdp.shard_optimizer_state(self.optimizer)
            if stateful:
                self.teacher.load_state_tensors(st.unprefixed("teacher", tensors))
            st.set_rng_state(st.unprefixed("rng", tensors), meta["rng"])
            _set_device_rngs(st.unprefixed("rng_device", tensors), self.device, self.world)
            if self.scaler is not None and "grad_scaler" in meta:
                self.scaler.load_state_dict(meta["grad_scaler"])
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
            from alambic.errors import CheckpointError

            raise CheckpointError(f"checkpoint {path} does not fit this run ({type(exc).__name__}: "
                                  f"{st.one_line(exc)})") from None
        self.step = meta["step"]
        self.checkpoint_step = self.step
        self._earlier_s = float(meta.get("wall_time_s", 0.0))
        return meta["epoch"], meta["pos"]

    # -- helpers ----------------------------------------------------------------------------------------

    def _setup_method(self) -> SetupInfo:
        """Run one probe batch (eval mode, no grad: no BatchNorm update) so the method can size its state."""
        probe = next(iter(self.loader.epoch(0))).to(self.device)
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            teacher_out = self.teacher.outputs(probe, self.method.teacher_views) if self.teacher is not None else None
            student_out = model_outputs(self.student, probe, self.method.student_views, self.student_taps)
            teacher_out = move_outputs(teacher_out, self.device)
        self.student.train(was_training)
        first = student_out[self.method.student_views[0]].logits
        info = SetupInfo(self.student, int(first.shape[-1]), _num_samples(self.loader), self.steps_per_epoch,
                         self.epochs, self.total_steps, loader=self.loader, teacher=self.teacher)
        self.method.setup(student_out, teacher_out, info)
        return info

    def _status(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.status.items())

    def _progress(self):
        """A bar on a terminal, plain lines in a log (:mod:`alambic.train.progress`), nothing when off."""
        return training_progress(self.show_progress)


def _val_text(val: dict[str, Any]) -> str:
    """What the progress line shows of a validation: its accuracy, else (a language run) its perplexity."""
    if "accuracy" in val:
        return f"val acc {val['accuracy']:.3f}"
    if "perplexity" in val:
        return f"val ppl {val['perplexity']:.3g}"
    return "val " + " ".join(f"{k} {v:.3g}" for k, v in val.items() if isinstance(v, (int, float))) if val else "val"


def _resume_fingerprint(teacher: Teacher | None) -> str | None:
    """The teacher's fingerprint as the run starts, recorded in every checkpoint so that ``--resume`` refuses
    another teacher (a teacher run replaced under the same path). None without a teacher, and for a teacher
    whose changing state the checkpoint itself restores (an EMA teacher's ``state_tensors``)."""
    if teacher is None or hasattr(teacher, "state_tensors") or not hasattr(teacher, "fingerprint"):
        return None
    return str(teacher.fingerprint())


def _teacher_name(teacher: Teacher | None) -> str:
    """``FrozenTeacher``, ``CachedTeacher(FrozenTeacher)``, ``TeacherEnsemble(FrozenTeacher, ...)``: for messages."""
    if teacher is None:
        return "none"
    inner = getattr(teacher, "teachers", None) or ([teacher.teacher] if hasattr(teacher, "teacher") else [])
    name = type(teacher).__name__
    return f"{name}({', '.join(_teacher_name(t) for t in inner)})" if inner else name


def _device_rngs(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states the checkpoint's ``rng`` section lacks: this rank's CPU generator when several ranks run
    (rank 0's is ``rng.torch``), and the CUDA generator of a CUDA run (dropout draws there)."""
    out = {"torch": torch.get_rng_state()} if dist.active() else {}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_device_rngs(tensors: dict[str, torch.Tensor], device: torch.device, world: dist.World) -> None:
    """Restore :func:`_device_rngs`' states (keys ``torch[.rank]``, ``cuda[.rank]``); a CUDA state is skipped on
    another device (a CUDA checkpoint resumed on a CPU: its draws differ from there on, its weights do not)."""
    suffix = f".{world.rank}" if world.size > 1 else ""
    if world.size > 1 and f"torch{suffix}" in tensors:
        torch.set_rng_state(tensors[f"torch{suffix}"])
    if device.type == "cuda" and f"cuda{suffix}" in tensors:
        torch.cuda.set_rng_state(tensors[f"cuda{suffix}"], device)


def host_floats(values: Sequence[Any]) -> list[float]:
    """Python floats of numbers and 0-d tensors, the values ``float()`` of each gives, with one device-to-host
    copy per (device, dtype) rather than a sync per value."""
    out = list(values)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            groups.setdefault((v.device, v.dtype), []).append(i)
    for ids in groups.values():
        for i, x in zip(ids, torch.stack([values[i].detach().reshape(()) for i in ids]).tolist()):
            out[i] = x
    return [float(v) for v in out]


def _pack_logs(total: torch.Tensor, terms: dict[str, Any], monitors: dict[str, Any], weight: float) -> torch.Tensor:
    """``weight`` × [loss, terms..., monitors...] as one float32 vector: summed over ranks, the global batch's."""
    values = [total, *terms.values(), *monitors.values()]
    if all(isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.dim() == 0 and v.device == total.device
           for v in values):
        return torch.stack(values).detach_().mul_(weight)  # the common case, without a tensor per value
    return torch.stack([torch.as_tensor(v, dtype=torch.float32, device=total.device).detach().reshape(())
                        for v in values]) * weight


def _unpack_logs(vec: torch.Tensor, terms: dict[str, Any], monitors: dict[str, Any]):
    """The loss, terms and monitors of a vector :func:`_pack_logs` made (and the ranks summed)."""
    out = dict(zip([*terms, *monitors], vec[1:].unbind()))
    return vec[0], {k: out[k] for k in terms}, {k: out[k] for k in monitors}


def _num_samples(loader) -> int:
    """Rows a per-sample store needs: 1 + the largest stable index the loader yields."""
    data = getattr(loader, "split", None)
    if data is not None:
        return int(data.index.max()) + 1
    return len(getattr(loader, "dataset"))


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainSpec) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _chunks(n: int, k: int, count: int | None = None) -> list[slice]:
    """``n`` rows in chunks of ``ceil(n / k)`` rows; with ``count``: exactly ``count`` chunks whose sizes differ
    by at most one (every rank of a run gets the same number, whatever its share of the global batch)."""
    if count is not None:
        base, extra = divmod(n, count)
        return [slice(i * base + min(i, extra), (i + 1) * base + min(i + 1, extra)) for i in range(count)]
    size = -(-n // k)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class _Window:
    """Running means of the loss and its terms between two metric lines."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.count, self.samples = 0, 0
        self.losses: list[Any] = []  # floats, or 0-d device tensors of unchecked steps: summed at the flush
        self.terms: dict[str, Any] = {}
        self.monitors: dict[str, Any] = {}
        self.started = time.perf_counter()

    def add(self, logs: dict[str, Any], samples: int) -> None:
        self.count += 1
        self.samples += samples
        self.losses.append(logs["loss"])
        for k, v in logs["terms"].items():
            self.terms[k] = self.terms.get(k, 0.0) + v  # tensors: converted once per flush, not per step
        for k, v in logs.get("monitors", {}).items():
            self.monitors[k] = self.monitors.get(k, 0.0) + v

    def flush(self, step: int, epoch: int, lr: float) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        record = {
            # summed in step order from 0, as floats: the value a running float sum gave
            "split": "train", "step": step, "epoch": epoch, "loss": sum(host_floats(self.losses)) / self.count,
            "terms": {k: float(v) / self.count for k, v in self.terms.items()}, "lr": lr,
            "samples_per_s": self.samples / elapsed,
        }
        if self.monitors:
            record["monitors"] = {k: float(v) / self.count for k, v in self.monitors.items()}
        self.reset()
        return record
