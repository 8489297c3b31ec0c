"""The typed recipe schema: one YAML file in, validated config objects out.

A recipe mirrors this module's class tree. It is validated once, at load; code below the loader only ever sees
these objects. Unknown keys and bad values raise :class:`RecipeError` naming the dotted key, what was given and
what is allowed. ``--set a.b=c`` overrides are applied to the raw YAML before validation, so they obey the same
rules (``stages.<index or kind>.optim.lr=1e-4``).

The module is over 600 lines because the schema is one tree whose every field carries its documentation (the
recipe reference is generated from it): splitting it would split the reference, not a concern.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "DeepSpeedConfig",
    "ModelConfig",
    "OptimConfig",
    "Recipe",
    "RecipeError",
    "RegularizeConfig",
    "S3_SECRETS",
    "S3Config",
    "ScalingConfig",
    "SourceConfig",
    "StageConfig",
    "TrackingConfig",
    "apply_overrides",
    "load_recipe",
    "parse_recipe",
]

STAGE_KINDS = ("pretrain", "finetune", "eval")


class RecipeError(ValueError):
    """A recipe (or an override) is invalid; the message names every bad key."""


def _absolute(path: str) -> Path:
    """A local path made absolute against the working directory of whoever validates the recipe first — the
    driver: Ray Train workers run in folders of Ray's, where relative paths would point elsewhere."""
    return Path(path).expanduser().absolute()


def _safe_name(what: str, name: str) -> str:
    """``name``, checked to be usable in folder names and metric keys."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"{what} {name!r} may only hold letters, digits, '_', '.', '-'")
    return name


class _Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, field docstrings are the documentation."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class TrackingConfig(_Section):
    uri: str = Field(default="sqlite:///mlflow.db", validate_default=True)
    """MLflow tracking URI: a local database (``sqlite:///mlflow.db``, made absolute like every local path) or a
    server (``http://host:5000``). MLflow 3 refuses plain-folder stores (``mlruns``)."""
    experiment: str | None = None
    """MLflow experiment name; defaults to the recipe ``name``."""
    system_metrics: bool = True
    """Log each node's CPU, memory, disk and network use (GPU too, when ``pynvml`` is installed and sees one) to
    the stage runs as MLflow system metrics (``system/...``, ``system/node<k>/...`` on more than one node)."""
    system_metrics_interval_s: float = Field(default=10.0, gt=0)
    """Seconds between two system-metric samples."""
    register_alias: str | None = "candidate"
    """Alias of the registered model version made from the final finetune export (model name = the recipe
    ``name``); null: register nothing."""

    @field_validator("uri")
    @classmethod
    def _absolute_database(cls, uri: str) -> str:
        sqlite = "sqlite:///"
        database = uri.removeprefix(sqlite)
        if uri.startswith(sqlite) and not Path(database).is_absolute():
            return sqlite + str(_absolute(database))
        return uri


S3_SECRETS = {"access_key_id", "secret_access_key", "session_token"}
"""The :class:`S3Config` fields left out of everything but the in-memory settings workers get."""


class S3Config(_Section):
    endpoint_url: str | None = None
    """S3 endpoint (e.g. ``http://127.0.0.1:9000``); defaults to ``AWS_ENDPOINT_URL`` or AWS itself."""
    region: str | None = None
    """Region name; defaults to ``AWS_DEFAULT_REGION``."""
    access_key_id: str | None = Field(default=None, repr=False)
    """Access key; prefer the standard ``AWS_ACCESS_KEY_ID`` variable. Never logged."""
    secret_access_key: str | None = Field(default=None, repr=False)
    """Secret key; prefer ``AWS_SECRET_ACCESS_KEY``. Never logged."""
    session_token: str | None = Field(default=None, repr=False)
    """Session token of temporary credentials (STS, SSO, instance roles); prefer ``AWS_SESSION_TOKEN``. Taken from
    the environment only when the keys are too. Never logged."""
    max_attempts: int = Field(default=5, ge=1, le=50)
    """Attempts per request (with exponential backoff) before a transient error fails the read."""


class ScalingConfig(_Section):
    num_workers: int | tuple[int, int] = 1
    """Ray Train workers (one per GPU when ``use_gpu``): a number, or a range ``min..max`` (``"2..8"``, or
    ``[2, 8]``) for Ray Train's elastic mode: the worker group starts with as many workers as the cluster has room
    for, at most ``max``, and when a node is lost it restarts from the last checkpoint on what is left as long as
    ``min`` fit (and grows back when nodes return). Each restart on another number of workers continues the
    learning-rate schedule by samples seen; the optimizer state then starts afresh (the consolidated weights are
    loaded, ZeRO shards are per world size)."""
    use_gpu: bool = False
    """Give each worker one GPU and use NCCL; otherwise CPU workers with gloo."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """CPUs reserved per training worker. Fractions leave room for the data pipeline on small machines."""
    gpus_per_worker: float = Field(default=1.0, gt=0)
    """GPUs per worker when ``use_gpu`` is set."""
    memory_per_worker_gb: float | None = Field(default=None, gt=0)
    """Memory reserved per worker, GiB (Ray resource); None reserves nothing."""
    gpu_memory_gb: float | None = Field(default=None, gt=0)
    """GPU memory per worker, GiB, that the recipe is sized for (``revcol plan`` checks against it; not a Ray
    resource). None: ``revcol plan`` assumes 80."""
    data_cpus: float | Literal["all"] = 1.0
    """CPU budget for the Ray Data decode/augment tasks, separate from the trainers: a number of CPUs > 0, or
    ``all``: every CPU of the data nodes, so the budget grows with the cluster (on a cluster without data nodes,
    the CPUs the training workers leave)."""
    placement: Literal["auto", "by_role", "anywhere"] = "auto"
    """Where work goes, by the nodes' role label (``role_label``). ``auto``: Ray Train workers on the nodes labelled
    ``train_role`` and decode tasks on those labelled ``data_role`` when such nodes are up, and wherever Ray's
    scheduler puts them when none is (one machine, an unlabelled cluster); ``by_role``: the same, but a cluster
    without nodes of a role is an error naming the label; ``anywhere``: labels ignored."""
    role_label: str = Field(default="revcol/role", min_length=1)
    """Node label that holds a node's role (``infra/`` labels each node ``revcol/role`` = ``head``, ``train`` or
    ``data``)."""
    train_role: str = Field(default="train", min_length=1)
    """``role_label`` value of the nodes that run the Ray Train workers."""
    data_role: str = Field(default="data", min_length=1)
    """``role_label`` value of the nodes that run the Ray Data decode tasks."""
    shared_paths: list[str] = Field(default_factory=list)
    """Local folders every node mounts at the same path (NFS, FSx for Lustre, a hostPath): on a cluster of more
    than one node, a local ``storage_path``, shards or weights are allowed only under one of these."""
    max_failures: int = Field(default=0, ge=-1)
    """Worker failures tolerated before the run fails (-1: unlimited); each restart resumes from the last checkpoint."""

    @field_validator("num_workers", mode="before")
    @classmethod
    def _count_or_range(cls, value: Any) -> Any:
        # one message naming every accepted form; "a..b" is what `--set scaling.num_workers=1..2` gives
        if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*\.\.\s*\d+\s*", value):
            value = [int(bound) for bound in value.split("..")]
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(
                isinstance(bound, int) and not isinstance(bound, bool) for bound in value):
            low, high = value
            if 1 <= low <= high:
                return low if low == high else (low, high)
        elif isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        raise ValueError("must be a number of workers >= 1, or a range 'min..max' (or [min, max]) with "
                         "1 <= min <= max")

    @property
    def elastic(self) -> bool:
        """Whether ``num_workers`` is a range (Ray Train's elastic mode)."""
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        """The fewest workers the stage runs on (``num_workers`` when fixed)."""
        return self.num_workers[0] if isinstance(self.num_workers, tuple) else self.num_workers

    @property
    def max_workers(self) -> int:
        """The most workers the stage runs on (``num_workers`` when fixed)."""
        return self.num_workers[1] if isinstance(self.num_workers, tuple) else self.num_workers

    @field_validator("data_cpus", mode="before")
    @classmethod
    def _cpus_or_all(cls, value: Any) -> Any:
        # one message naming both forms (a union would report each member's error under its own sub-key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value == "all" or (number and value > 0):
            return value
        raise ValueError("must be a number of CPUs > 0 or 'all'")


class SourceConfig(_Section):
    name: str
    """Source name (unique in the stage): the metric ``data/source/<name>/samples`` counts its training samples."""
    shards: str | list[str]
    """Its shards, in the forms of a single-source ``data.train``."""
    weight: float = Field(default=1.0, gt=0)
    """Its share of each epoch's samples, relative to the other sources' weights."""
    classes: dict[str, str] = Field(default_factory=dict)
    """Renames of its classes into the stage's label set (manifest class name → stage class name); a class not
    named keeps its manifest name. Samples are labelled by the stage's class of that name."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return _safe_name("source name", name)


class DataConfig(_Section):
    train: str | list[str] | list[SourceConfig] | None = None
    """Training shards: a manifest (``.../manifest.json``), a folder or ``s3://`` prefix holding one, or a shard list;
    or a weighted mixture: a list of sources (``{name, shards, weight, classes}``), each epoch
    ``epoch_samples`` samples drawn from them by weight (in whole shards, seeded by ``(seed, epoch)``)."""
    epoch_samples: int | None = Field(default=None, ge=1)
    """Mixtures: samples of one (virtual) epoch; default: the sources' samples added up."""
    replacement: bool = False
    """Mixtures: a source whose share of an epoch exceeds its size is read again (every shard once before any
    twice); false: every sample at most once per epoch, and such a share is an error naming the source."""
    classes: list[str] | None = None
    """Mixtures: the stage's label set (class names, index = label); default: the sources' (renamed) classes in
    order of first appearance. ``data.val`` must hold the same classes."""
    val: str | list[str] | None = None
    """Validation/eval shards, same forms as ``train``."""
    image_size: int | None = Field(default=None, ge=16, le=2048)
    """Input resolution; defaults to the model's pretrained cfg (224)."""
    batch_size: int = Field(default=128, ge=1)
    """Batch per worker (global batch = batch_size × num_workers × grad_accum)."""
    shuffle_buffer: int = Field(default=1000, ge=0)
    """Samples in the shuffle buffer (0: shard-order only)."""
    seed: int = 0
    """Seed of shard order, sample shuffle and augmentation."""
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    """timm RandAugment spec; None turns it off."""
    random_erasing: float = Field(default=0.25, ge=0, le=1)
    """Random erasing probability (pixel mode, one box)."""
    color_jitter: float = Field(default=0.0, ge=0)
    """Colour jitter strength (used when ``auto_augment`` is None)."""
    crop_pct: float | None = Field(default=None, gt=0, le=1)
    """Eval centre-crop fraction; defaults to the model cfg."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of the training RandomResizedCrop (the paper's (0.08, 1))."""
    hflip: float = Field(default=0.5, ge=0, le=1)
    """Horizontal-flip probability in training (0 for data where mirroring changes the class, e.g. digits)."""
    max_skipped_frac: float = Field(default=0.01, ge=0, le=1)
    """Fraction of undecodable/missing samples tolerated before the run stops naming the bad shards."""
    trace_dir: str | None = None
    """Audit trail: each training worker appends ``epoch shard index`` of every sample it trains on to a file in
    this local folder (one file per worker process), and every worker and decode task its Ray node to
    ``nodes.jsonl`` there. Off by default."""
    deterministic: bool = True
    """Keep the seeded order end to end (Ray Data ``preserve_order``): each rank's batches are then a function of
    (seed, epoch, number of workers). False lets decoded blocks flow in completion order instead."""

    @field_validator("train", mode="before")
    @classmethod
    def _spec_or_sources(cls, value: Any) -> Any:
        # a list of mappings is a mixture: validated as such here, so that a bad source's errors name its key alone
        # (the union would report every member's error)
        if not isinstance(value, list) or not any(isinstance(item, Mapping) for item in value):
            return value
        if not all(isinstance(item, Mapping) for item in value):
            raise ValueError("a list of sources (mappings) and shard paths mixed; give one or the other")
        sources = []
        for i, item in enumerate(value):
            try:
                sources.append(SourceConfig.model_validate(item))
            except ValidationError as err:
                raise ValueError(f"source {i}: " + "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or '<source>'}: "
                    f"{'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}" for e in err.errors())) from None
        return sources

    @property
    def sources(self) -> list[SourceConfig]:
        """The mixture's sources (empty for a single-source ``train``)."""
        train = self.train
        return train if isinstance(train, list) and train and isinstance(train[0], SourceConfig) else []  # type: ignore[return-value]

    def spec_paths(self, split: Literal["train", "val"]) -> list[str]:
        """Every shard path or URL that ``train`` or ``val`` names (a mixture's: every source's)."""
        value = getattr(self, split)
        items = [value] if isinstance(value, (str, SourceConfig)) else list(value or [])
        shards = [item.shards if isinstance(item, SourceConfig) else item for item in items]
        return [path for spec in shards for path in ([spec] if isinstance(spec, str) else spec)]

    @model_validator(mode="after")
    def _mixture_keys(self) -> DataConfig:
        names = [source.name for source in self.sources]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"train: duplicate source name(s) {duplicates}")
        if not self.sources:
            misplaced = [key for key, unset in (("epoch_samples", None), ("replacement", False), ("classes", None))
                         if getattr(self, key) != unset]
            if misplaced:
                raise ValueError(f"{', '.join(misplaced)}: apply to a mixture only (train as a list of sources)")
        if self.classes is not None and (not self.classes or len(set(self.classes)) != len(self.classes)):
            raise ValueError(f"classes must be unique class names, got {self.classes}")
        return self

    @field_validator("crop_scale")
    @classmethod
    def _crop_scale_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {scale}")
        return scale


class ModelConfig(_Section):
    name: str = "revcol_tiny"
    """A registered variant: revcol_tiny, revcol_small, revcol_base, revcol_large, revcol_xlarge, revcol_huge."""
    num_classes: int | None = Field(default=None, ge=1)
    """Classes of the head; defaults to the class count in the training manifest."""
    reversible: bool = True
    """Reversible backward (activation memory independent of the number of columns)."""
    fast_path: bool = True
    """Reversible: the last column's activations kept for backward rather than recomputed (one column's more,
    still independent of the number of columns; one column's forward less per step); false: the reference path.
    Channels-last activations are ``overrides: {channels_last: true}`` (slower on CPU, see benchmarks/model_speed.py)."""
    intersup: bool = False
    """Intermediate supervision: per-column classifiers and reconstruction decoders, compound loss."""
    drop_path_rate: float = Field(default=0.0, ge=0, lt=1)
    """Stochastic depth, linearly increasing over the blocks of a column."""
    head_init_scale: float | None = Field(default=None, gt=0)
    """Scale of a freshly initialized head's weights (0.001 in the official finetunes)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Architecture overrides passed to ``revcol.create_model`` (channels, layers, num_subnet, kernel_size)."""

    @field_validator("name")
    @classmethod
    def _known_variant(cls, name: str) -> str:
        import revcol

        if name not in revcol.list_variants():
            raise ValueError(f"unknown model {name!r}; allowed: {', '.join(revcol.list_variants())}")
        return name

    @field_validator("overrides")
    @classmethod
    def _known_overrides(cls, overrides: dict[str, Any]) -> dict[str, Any]:
        allowed = {"channels", "layers", "num_subnet", "kernel_size"}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(f"unknown override(s) {unknown}; allowed: {sorted(allowed)}")
        return overrides


class OptimConfig(_Section):
    name: Literal["adamw"] = "adamw"
    """Optimizer (the paper's AdamW)."""
    base_lr: float = Field(default=1e-3, gt=0)
    """Learning rate for a global batch of 1024; scaled linearly by global_batch/1024."""
    warmup_lr: float = Field(default=1e-5, ge=0)
    """Warmup start LR (for batch 1024, scaled like base_lr)."""
    min_lr: float = Field(default=1e-6, ge=0)
    """Final cosine LR (for batch 1024, scaled like base_lr)."""
    weight_decay: float = Field(default=0.05, ge=0)
    """Decoupled weight decay; not applied to norms, biases, layer scales and alphas."""
    layer_decay: float | None = Field(default=None, gt=0, le=1)
    """Layer-wise LR decay factor (finetuning); None for none."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    epochs: float = Field(default=300, gt=0)
    """Training length in epochs (fractions allowed)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (overrides ``epochs`` when smaller)."""
    warmup_epochs: float = Field(default=20, ge=0)
    """Linear warmup length in epochs."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """LR schedule after warmup, stepped per optimizer step."""

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas}")
        return betas


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters partitioned."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Training precision; fp16 uses dynamic loss scaling."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step."""
    grad_clip: float = Field(default=0.0, ge=0)
    """Gradient-norm clipping (0: none)."""
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    """Where ZeRO keeps optimizer state."""
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    """Where ZeRO-3 keeps parameters."""
    nvme_path: str | None = None
    """Local folder for NVMe offload files (made absolute)."""
    extra: dict[str, Any] = Field(default_factory=dict)
    """Raw DeepSpeed JSON merged over the generated config (expert escape hatch)."""

    @field_validator("nvme_path")
    @classmethod
    def _absolute_folder(cls, value: str | None) -> str | None:
        return None if value is None else str(_absolute(value))

    @model_validator(mode="after")
    def _offload_consistent(self) -> DeepSpeedConfig:
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError(f"offload_param={self.offload_param!r} needs zero_stage: 3 (got {self.zero_stage})")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError(f"offload_optimizer={self.offload_optimizer!r} needs zero_stage >= 1")
        if "nvme" in (self.offload_param, self.offload_optimizer) and not self.nvme_path:
            raise ValueError("nvme offload needs nvme_path (a local folder)")
        return self


class RegularizeConfig(_Section):
    mixup: float = Field(default=0.0, ge=0)
    """Mixup alpha (0: off)."""
    cutmix: float = Field(default=0.0, ge=0)
    """CutMix alpha (0: off)."""
    mixup_prob: float = Field(default=1.0, ge=0, le=1)
    """Probability of applying mixup or cutmix to a batch."""
    mixup_switch_prob: float = Field(default=0.5, ge=0, le=1)
    """Probability of cutmix instead of mixup when both are on."""
    label_smoothing: float = Field(default=0.1, ge=0, lt=1)
    """Label smoothing."""
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    """Model EMA decay (0.9999 in the paper); None turns EMA off."""
    fcoe: float = Field(default=3.0, ge=0)
    """Weight of the reconstruction terms of the intermediate-supervision loss."""
    ccoe: float = Field(default=0.7, ge=0)
    """Weight of the intermediate classification terms of the intermediate-supervision loss."""


class CheckpointConfig(_Section):
    interval_steps: int = Field(default=500, ge=1)
    """Save every N optimizer steps (and at the end of each epoch)."""
    keep: int = Field(default=2, ge=1)
    """Keep the last K checkpoints, and beside them (``best_step<N>`` in the run folder) the one with the highest
    ``val/top1`` so far (checkpoints taken right after a validation)."""
    at_epoch_end: bool = True
    """Also checkpoint at the end of every epoch (off for runs of many tiny epochs)."""
    val_interval_epochs: int = Field(default=1, ge=1)
    """Validate (``data.val``) every N epochs, and always at the end."""
    optimizer_state: bool = True
    """Save the optimizer state (exact resume). Off: checkpoints hold weights only and a resume starts the
    optimizer afresh, for models whose optimizer state does not fit on disk twice (RevCol-H with NVMe offload)."""


class StageConfig(_Section):
    name: str | None = None
    """Stage name (unique in the recipe); defaults to ``kind``."""
    kind: Literal["pretrain", "finetune", "eval"]
    """What the stage does."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Shards and input pipeline."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    """The RevCol variant and its options."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """ZeRO stage, precision, accumulation, offload."""
    regularize: RegularizeConfig = Field(default_factory=RegularizeConfig)
    """Mixup/cutmix, smoothing, EMA, intermediate-supervision weights."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint and validation intervals."""
    init_from: str | None = None
    """Weights to start from: an earlier stage's name, or a URI (folder, ``s3://``, ``.safetensors``)."""
    weights: Literal["auto", "raw", "ema"] = "auto"
    """Eval stages: which of the source's raw and EMA weights is the stage's result (both are evaluated). ``auto``:
    the one with the higher top-1 on the source stage's own validation data (its ``data.val``; raw when it keeps
    no EMA, has no validation data, or validates on this stage's shards) — never the score on this stage's data."""

    @model_validator(mode="after")
    def _defaults_and_checks(self) -> StageConfig:
        if self.name is None:
            self.name = self.kind
        _safe_name("stage name", self.name)
        if self.kind in ("pretrain", "finetune") and self.data.train is None:
            raise ValueError(f"a {self.kind} stage needs data.train")
        if self.kind == "eval" and self.data.val is None:
            raise ValueError("an eval stage needs data.val")
        if self.kind != "eval" and self.weights != "auto":
            raise ValueError(f"weights: {self.weights!r} applies to eval stages only")
        return self


class Recipe(_Section):
    name: str
    """Pipeline name: the MLflow experiment, and the folder under ``storage_path``."""
    storage_path: str = Field(default="runs", validate_default=True)
    """Where checkpoints and exports go: a local folder (made absolute) or ``s3://bucket/prefix``."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow: where runs go."""
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    """Workers, GPUs and CPU budgets."""
    s3: S3Config = Field(default_factory=S3Config)
    """S3 endpoint and credentials (else the standard AWS variables)."""
    stages: Annotated[list[StageConfig], Field(min_length=1)]
    """Ordered stages; each runs after the previous one finished."""

    @field_validator("storage_path")
    @classmethod
    def _absolute_storage(cls, value: str) -> str:
        return value if "://" in value else str(_absolute(value))

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return _safe_name("name", name)

    @model_validator(mode="after")
    def _stage_graph(self) -> Recipe:
        seen: list[str] = []
        for i, stage in enumerate(self.stages):
            if stage.name in seen:
                raise ValueError(f"stages.{i}.name: duplicate stage name {stage.name!r}")
            ref = stage.init_from
            if ref is not None and "/" not in ref and "." not in ref and ref not in seen:
                raise ValueError(
                    f"stages.{i}.init_from: {ref!r} is neither an earlier stage ({seen or 'none'}) nor a URI"
                )
            if ref is not None and ref not in seen and "://" not in ref:
                stage.init_from = str(_absolute(ref))  # a local weights path, read by the workers
            if stage.weights == "ema" and (ref not in seen or self.stage(ref).regularize.ema_decay is None):
                raise ValueError(f"stages.{i}.weights: 'ema', but init_from {ref!r} is not an earlier stage that keeps "
                                 "an EMA (regularize.ema_decay)")
            seen.append(stage.name)
        return self

    def stage(self, name: str) -> StageConfig:
        """Returns the stage called ``name``."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage {name!r}; stages: {[s.name for s in self.stages]}")


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if p not in ("function-after",)) or "<recipe>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] != "missing" and "input" in e:
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "invalid recipe:\n" + "\n".join(lines)


def parse_recipe(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validates a raw recipe mapping (after applying ``key.sub=value`` overrides).

    Raises:
        RecipeError: naming every bad key, value and what is allowed.
    """
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping at top level, got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_errors(err)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Reads a recipe YAML file, applies overrides, validates it."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    return parse_recipe(raw, overrides)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Returns a copy of ``raw`` with each ``a.b.c=value`` override applied (value parsed as YAML).

    List items are addressed by index, and stages also by name or kind: ``stages.finetune.optim.base_lr=1e-4``.
    """
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: value is not valid YAML: {err}") from None
        parts = key.strip().split(".")
        node: Any = raw
        for depth, part in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                index = _list_index(node, part, where)
                if last:
                    node[index] = value
                else:
                    node = node[index]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise RecipeError(f"override {item!r}: {'.'.join(parts[:depth])} is a value, not a section")
    return raw


def _list_index(items: list[Any], part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        index = int(part)
        if not -len(items) <= index < len(items):
            raise RecipeError(f"override key {where}: index {index} out of range (list has {len(items)} items)")
        return index
    names = [(it.get("name") or it.get("kind")) if isinstance(it, dict) else None for it in items]
    if part in names:
        return names.index(part)
    raise RecipeError(f"override key {where}: no item named {part!r}; items: {names}")


def reference_markdown() -> str:
    """The recipe reference, generated from the classes above (``docs/recipe-reference.md`` is this output;
    a test keeps them equal)."""
    sections: list[tuple[str, type[BaseModel]]] = [("", Recipe)]
    lines = [
        "# Recipe reference",
        "",
        "Generated from `pipeline/config.py` by `python -m pipeline.config > docs/recipe-reference.md`; a test",
        "fails when they differ. Unknown keys are errors. Override any leaf with `--set dotted.key=value`",
        "(stages by index or name: `stages.finetune.optim.base_lr=1e-4`).",
    ]
    seen: set[type] = set()
    while sections:
        prefix, cls = sections.pop(0)
        if cls in seen:
            continue
        seen.add(cls)
        lines += ["", f"## `{prefix or 'recipe'}` ({cls.__name__})", "", "| key | type | default | meaning |",
                  "|---|---|---|---|"]
        for name, field in cls.model_fields.items():
            annotation = field.annotation
            nested = _section_class(annotation)
            if nested is not None:
                sections.append(((f"{prefix}.{name}" if prefix else name) + ("[]" if _is_list(annotation) else ""), nested))
            default = "required" if field.is_required() else repr(field.get_default(call_default_factory=True))
            if nested is not None:
                default = "see below" if not field.is_required() else "required"
            kind = re.sub(r"<class '([\w.]+)'>", r"\1", str(annotation))
            kind = re.sub(r"\b(?:[A-Za-z_]\w*\.)+(\w+)", r"\1", kind)  # module prefixes off
            doc = " ".join((field.description or "").split())
            lines.append(f"| `{name}` | `{kind}` | `{default}` | {doc} |".replace("`see below`", "see below").replace("`required`", "required"))
    return "\n".join(lines) + "\n"


def _section_class(annotation: Any) -> type[BaseModel] | None:
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        for inner in (candidate, *typing.get_args(candidate)):
            if isinstance(inner, type) and issubclass(inner, _Section):
                return inner
    return None


def _is_list(annotation: Any) -> bool:
    import typing

    return any(typing.get_origin(a) is list for a in (annotation, *typing.get_args(annotation)))


if __name__ == "__main__":
    print(reference_markdown(), end="")
