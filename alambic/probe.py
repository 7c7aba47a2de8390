"""What a representation learned: kNN and linear probes, online during training and offline on a run.

A self-supervised student has no trained classifier; what it learned is judged by how well a frozen
copy of its representation separates the classes: a weighted kNN (cosine, k, temperature; Wu et al.
2018, as DINO evaluates) and a linear probe (multinomial logistic regression whose regularisation is
chosen on the validation split). Both are fit on the *labelled* training samples only, so the label-scarce
setting probes with the few labels it has. The test split is read once, at the end (:func:`probe_model`);
online probes (:class:`ProbeCallback`) read the validation split.

Baselines put a number in context: the same network at random initialisation (the online probe at step 0)
and the raw pixels (:func:`pixel_baseline`).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from alambic.cache_dir import cache_dir, make_dirs
from alambic.data.splits import DataBundle, Split
from alambic.errors import AlambicError, RunDirError
from alambic.eval.probes import extract_features, knn_accuracy, linear_probe, representation_stats
from alambic.teachers.ema import EmaTeacher
from alambic.train.loop import Callback
from alambic.train.state import atomic_write_text

PROBE_JSON = "probe.json"


def _labelled(split: Split, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """Inputs and labels of the labelled rows of ``split`` (the first ``limit`` of them, a fixed subset)."""
    rows = split.labeled.nonzero().flatten()
    if limit is not None and len(rows) > limit:
        rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:limit]]
    return split.x[rows], split.y[rows]


def probe_features(train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor] | None,
                   num_classes: int, k: int = 20, temperature: float = 0.07, linear: bool = True) -> dict[str, Any]:
    """kNN (train -> val, train -> test) and linear-probe accuracies of given features.

    Each pair is (features [N, D], labels [N]). Returns ``knn_val``, ``knn_test``, ``linear_val``,
    ``linear_test``, ``linear_c`` (the inverse regularisation chosen on val) and representation statistics
    of the validation features (``feature_std``, ``rank``); test entries are None without ``test``, linear
    ones None without ``linear``.
    """
    (ftr, ytr), (fva, yva) = train, val
    out: dict[str, Any] = {"knn_val": knn_accuracy(ftr, ytr, fva, yva, num_classes, k=k, temperature=temperature)}
    out["knn_test"] = (knn_accuracy(ftr, ytr, test[0], test[1], num_classes, k=k, temperature=temperature)
                       if test is not None else None)
    out.update(linear_val=None, linear_test=None, linear_c=None)
    if linear:
        lp = linear_probe(ftr, ytr, fva, yva, None if test is None else test[0], None if test is None else test[1],
                          num_classes=num_classes)
        out.update(linear_val=lp["val_accuracy"], linear_test=lp.get("test_accuracy"), linear_c=lp["c"])
    out.update(representation_stats(fva))
    return out


def probe_model(model: nn.Module, feature: str | None, data: DataBundle, *, k: int = 20, temperature: float = 0.07,
                batch_size: int = 512, test: bool = True, linear: bool = True,
                max_train: int | None = None) -> dict[str, Any]:
    """Probe ``model``'s representation at tap ``feature`` (None: its output) on ``data``."""
    xtr, ytr = _labelled(data.train, max_train)
    if len(ytr) == 0:
        raise AlambicError("probe: the training split has no labelled sample to fit a probe on")
    f = lambda x: extract_features(model, x, feature, batch_size=batch_size)  # noqa: E731
    return probe_features((f(xtr), ytr), (f(data.val.x), data.val.y),
                          (f(data.test.x), data.test.y) if test else None,
                          data.num_classes, k=k, temperature=temperature, linear=linear)


def pixel_baseline(data: DataBundle, *, k: int = 20, temperature: float = 0.07, test: bool = True) -> dict[str, Any]:
    """The same probes on the raw inputs, flattened: what a representation has to beat."""
    xtr, ytr = _labelled(data.train)
    flat = lambda x: x.reshape(len(x), -1).float()  # noqa: E731
    return probe_features((flat(xtr), ytr), (flat(data.val.x), data.val.y),
                          (flat(data.test.x), data.test.y) if test else None,
                          data.num_classes, k=k, temperature=temperature)


def cached_pixel_baseline(data: DataBundle, *, k: int = 20, temperature: float = 0.07) -> dict[str, Any]:
    """:func:`pixel_baseline`, kept under ``$ALAMBIC_CACHE/probes`` (default ``~/.cache/alambic``) by the
    data's fingerprint, k and T: it depends on nothing else, and on large data it takes minutes."""
    root = cache_dir("probes")
    path = root / f"pixels-{data.fingerprint}-k{k}-t{temperature:g}.json"
    if path.is_file():
        return json.loads(path.read_text())
    result = pixel_baseline(data, k=k, temperature=temperature)
    make_dirs(root)  # never group/world-writable, whatever the umask (alambic.cache_dir)
    atomic_write_text(path, json.dumps(result))
    return result


def _backbone(model: nn.Module) -> nn.Module:
    """The network whose representation is probed: the backbone of an EmbeddingNet, else the model."""
    return getattr(model, "backbone", model)


class ProbeCallback(Callback):
    """kNN probe of the student (and of an EMA teacher) on the validation split every ``every`` steps.

    Runs once before the first step (the random-initialisation baseline) and after every ``every``
    optimizer steps; writes ``{"split": "probe", "step", "student": {...}, "teacher": {...}}`` lines into
    ``metrics.jsonl`` and shows the student's kNN accuracy in the progress bar. Reads no global RNG state
    and leaves every module's train/eval mode as it found it, so it changes nothing in the training.
    """

    def __init__(self, data: DataBundle, feature: str, every: int, *, k: int = 20, temperature: float = 0.07,
                 max_train: int = 5000, batch_size: int = 512):
        if every < 1:
            raise AlambicError(f"ProbeCallback: every must be >= 1, got {every}")
        self.data, self.feature, self.every = data, feature, every
        self.k, self.temperature, self.batch_size = k, temperature, batch_size
        self.train = _labelled(data.train, max_train)
        self.history: list[dict[str, Any]] = []

    def _probe(self, model: nn.Module) -> dict[str, float]:
        f = lambda x: extract_features(_backbone(model), x, self.feature, batch_size=self.batch_size)  # noqa: E731
        res = probe_features((f(self.train[0]), self.train[1]), (f(self.data.val.x), self.data.val.y), None,
                             self.data.num_classes, k=self.k, temperature=self.temperature, linear=False)
        return {k: v for k, v in res.items() if v is not None}

    def record(self, trainer, step: int) -> None:
        rec: dict[str, Any] = {"split": "probe", "step": step, "student": self._probe(trainer.student)}
        if isinstance(trainer.teacher, EmaTeacher):  # a frozen teacher does not change: nothing to follow
            rec["teacher"] = self._probe(trainer.teacher.model)
        trainer.metrics.write(rec)
        self.history.append(rec)
        status = getattr(trainer, "status", None)
        if status is not None:
            status["kNN"] = f"{rec['student']['knn_val']:.3f}"
            status["std"] = f"{rec['student']['feature_std']:.3f}"
            if "teacher" in rec:
                status["kNN(T)"] = f"{rec['teacher']['knn_val']:.3f}"

    def on_fit_start(self, trainer, resumed: bool) -> None:
        if not resumed:
            self.record(trainer, trainer.step)

    def on_step_end(self, trainer, step: int, logs: dict[str, Any]) -> None:
        if step % self.every == 0:
            self.record(trainer, step)


class CollapseWatch(Callback):
    """Warns once when a self-distillation loss sits at ln(K) (a uniform teacher: DINO's collapse).

    A method reports ``monitors["loss_over_lnK"]``; after ``after`` of the run, a value above
    ``threshold`` for every step of a logging window means the teacher outputs no information. The
    warning goes to stderr and into ``self.warnings`` (the run writes them into ``summary.json``).
    """

    STATE = "collapse_watch.json"  # beside the checkpoint: the window and warnings as of its step

    def __init__(self, after: float = 0.2, threshold: float = 0.99):
        self.after, self.threshold = after, threshold
        self.warnings: list[str] = []
        self._window: list[float] = []

    def on_checkpoint(self, trainer, path: Path) -> None:
        """Keep the window and the warnings with the checkpoint, so a resumed run judges the same windows
        and its summary keeps a warning given before the kill."""
        state = {"step": trainer.step, "window": self._window, "warnings": self.warnings}
        atomic_write_text(path.with_name(self.STATE), json.dumps(state))

    def on_fit_start(self, trainer, resumed: bool) -> None:
        run_dir = getattr(trainer, "run_dir", None)
        if not resumed or run_dir is None or not (Path(run_dir) / self.STATE).is_file():
            return
        state = json.loads((Path(run_dir) / self.STATE).read_text())
        if state.get("step") == trainer.step:  # written with the checkpoint the run resumed from
            self._window, self.warnings = list(state["window"]), list(state["warnings"])

    def on_step_end(self, trainer, step: int, logs: dict[str, Any]) -> None:
        value = logs.get("monitors", {}).get("loss_over_lnK")
        if value is None or self.warnings or step < self.after * trainer.total_steps:
            return
        self._window.append(float(value))
        if len(self._window) >= trainer.cfg.log_every:
            if min(self._window) > self.threshold:
                msg = (f"step {step}: the self-distillation loss has stayed within {100 * (1 - self.threshold):.0f}% "
                       f"of ln(K) for {len(self._window)} steps: the teacher is uniform (collapse). Try a lower "
                       f"teacher temperature, a smaller output dimension, or a slower EMA.")
                self.warnings.append(msg)
                print(f"warning: {msg}", file=sys.stderr)
            self._window = []


def probe_run(run_dir: str | Path, *, k: int = 20, temperature: float = 0.07, feature: str | None = None,
              baselines: bool = False, write: bool = True, trust_code: bool = False) -> dict[str, Any]:
    """``alambic probe RUN_DIR``: probe the finished student of a run (and, if asked, the baselines).

    The data are rebuilt from the run's recipe (the same split); the feature path is the one the run
    recorded (``student.json: features``), ``feature`` overrides it. The student's probe is read from the
    run's summary when it was made with the same feature, k and T. With ``baselines`` the same probes run
    on the raw pixels (cached by data fingerprint: :func:`cached_pixel_baseline`) and on the same
    architecture at the run's seed before training. The result is written to ``RUN_DIR/probe.json`` and
    ``RUN_DIR/report.md`` is rendered again so that it shows it; then ``report`` is the report's path.
    A run whose student is a user factory (``arch: module``) is probed only with ``trust_code`` (see
    :func:`alambic.student.load_student`): a received run directory never runs code on its own.
    """
    from alambic.data.splits import build_data
    from alambic.models.heads import DEFAULT_FEATURES
    from alambic.models.zoo import build_model
    from alambic.recipe.load import load_recipe
    from alambic.student import load_student, student_kind
    from alambic.train.seeding import seed_everything

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").exists():
        raise RunDirError(f"{run_dir} holds no alambic run (no recipe.yaml)")
    if student_kind(run_dir / "student.json") == "causal_lm":
        raise AlambicError(f"probe: {run_dir} is a language run: probes are for representations (kNN and linear "
                           "probes of image features); its summary.json and report.md hold perplexity and agreement")
    recipe = load_recipe(run_dir / "recipe.yaml")
    model, meta = load_student(run_dir, trust_code=trust_code)  # before the baselines rebuild its arch
    path = feature or meta.get("features") or DEFAULT_FEATURES.get(recipe.student.arch)
    if path is None:
        raise AlambicError(f"probe: no default representation for model '{recipe.student.arch}': pass --feature")
    data = build_data(recipe.data)
    summary_path = run_dir / "summary.json"
    saved = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    same = (saved.get("feature") == path and saved.get("probe", {}).get("linear_test") is not None
            and recipe.eval.knn_k == k and recipe.eval.knn_temperature == temperature)
    student = saved["probe"] if same else probe_model(model, path, data, k=k, temperature=temperature)
    out: dict[str, Any] = {"feature": path, "k": k, "temperature": temperature, "student": student}
    if baselines:
        out["pixels"] = cached_pixel_baseline(data, k=k, temperature=temperature)
        seed_everything(recipe.seed)
        init = build_model(recipe.student, data.input_shape, data.num_classes)
        out["random_init"] = probe_model(init, path, data, k=k, temperature=temperature)
    if write:
        atomic_write_text(run_dir / PROBE_JSON, json.dumps(out, indent=2))
        if summary_path.is_file():  # the report lists what probe.json holds: render it again, not stale
            from alambic.report import render_report

            out["report"] = str(render_report(run_dir))
    return out


def format_probe(result: dict[str, Any]) -> str:
    """A small text table of a :func:`probe_run` result."""
    rows = [("representation", "kNN test", "linear test", "feature std", "rank")]
    for name in ("student", "random_init", "pixels"):
        r = result.get(name)
        if r is None:
            continue
        pct = lambda v: "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.2f}"  # noqa: E731
        rows.append((name, pct(r.get("knn_test")), pct(r.get("linear_test")), f"{r.get('feature_std', float('nan')):.4f}",
                     f"{r.get('rank', float('nan')):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)
