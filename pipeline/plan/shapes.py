"""The plan's data model: the cluster shape, memory items, model statistics, the activation trace, a stage's plan and the whole plan."""

from __future__ import annotations


import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal


from pipeline.config import Recipe

logger = logging.getLogger(__name__)

GiB = 2**30
Tier = Literal["gpu", "host", "nvme"]
PHASES: tuple[str, ...] = ("init", "forward", "backward", "grad_reduce", "optimizer_step", "checkpoint")
"""Step phases; an item is alive in some of them, or ``persistent`` (the whole run)."""

ACTIVATION_METHOD = (
    "analytic: live tensor-storage bytes tracked op by op through one fp32 training step (forward, loss, "
    "reversible backward) of the stage's model on fake tensors at the stage's resolution and micro-batch; "
    "upper bound under bf16/fp16 autocast; autocast weight-cast cache added analytically"
)

# Engine constants (fp32 weights + torch autocast, see pipeline/train/engine.py).
_FP32 = 4
_ADAM = 8  # exp_avg + exp_avg_sq, fp32
# DeepSpeed defaults (deepspeed/runtime/zero/config.py and offload_config.py) for what the generated config
# (pipeline.train.engine.deepspeed_config) leaves unset.
_DS_DEFAULTS = {
    "reduce_bucket_size": 500_000_000,
    "contiguous_gradients": True,
    "stage3_prefetch_bucket_size": 50_000_000,
    "stage3_max_live_parameters": 1_000_000_000,
    "stage3_param_persistence_threshold": 100_000,
    "sub_group_size": 1_000_000_000,
    "offload_optimizer.buffer_count": 4,
    "offload_param.buffer_count": 5,
    "offload_param.buffer_size": 100_000_000,
}
_MIN_SWAP_BYTES = 2**20  # deepspeed/runtime/swap_tensor/constants.py MIN_AIO_BYTES: smaller tensors stay in memory
_ZERO0_ALLREDUCE_ELEMENTS = 500_000_000  # engine.buffered_allreduce_fallback(elements_per_buffer=5e8)
_PREFETCH_BATCHES = 4  # input batches held by the Ray Data iterator and the step (decoded fp32 images)


@dataclass(frozen=True)
class ClusterShape:
    """The cluster a recipe is planned for, per worker (one worker = one GPU when ``use_gpu``).

    Attributes:
        workers: data-parallel workers (the ZeRO world size).
        use_gpu: workers train on GPUs; otherwise on CPU, and device memory is host memory.
        gpu_mem_gib: GPU memory per worker, GiB.
        host_mem_gib: host memory per worker, GiB; None: not checked.
        cpus_per_worker: CPU cores available per worker; None: not checked.
        gpus_per_node: GPUs per node (only for DeepSpeed's estimator, which splits by node).
        sources: where each value came from (``recipe``, ``cli`` or ``default``).
    """

    workers: int
    use_gpu: bool = True
    gpu_mem_gib: float = 80.0
    host_mem_gib: float | None = None
    cpus_per_worker: float | None = None
    gpus_per_node: int = 8
    sources: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.gpu_mem_gib <= 0:
            raise ValueError(f"gpu memory must be > 0 GiB, got {self.gpu_mem_gib}")
        if self.host_mem_gib is not None and self.host_mem_gib <= 0:
            raise ValueError(f"host memory must be > 0 GiB, got {self.host_mem_gib}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ValueError(f"cpus per worker must be > 0, got {self.cpus_per_worker}")

    @classmethod
    def from_recipe(
        cls,
        recipe: Recipe,
        *,
        workers: int | None = None,
        gpu_mem_gib: float | None = None,
        host_mem_gib: float | None = None,
        cpus_per_worker: float | None = None,
    ) -> ClusterShape:
        """The recipe's ``scaling`` section, with any of its values replaced by the given ones.

        Args:
            recipe: the validated recipe.
            workers: workers instead of ``scaling.num_workers`` (0 there means one in-process worker).
            gpu_mem_gib: GPU memory per worker instead of ``scaling.gpu_memory_gb`` (80 when neither is set).
            host_mem_gib: host memory per worker instead of ``scaling.memory_per_worker_gb``.
            cpus_per_worker: cores per worker instead of ``scaling.cpus_per_worker``.

        Returns:
            The cluster shape, with ``sources`` saying where each value came from.
        """
        sc = recipe.scaling
        sources = {}

        def pick(name: str, given: Any, from_recipe: Any, default: Any) -> Any:
            if given is not None:
                sources[name] = "cli"
                return given
            if from_recipe is not None:
                sources[name] = "recipe"
                return from_recipe
            sources[name] = "default"
            return default

        return cls(
            workers=pick("workers", workers, max(sc.num_workers, 1), 1),
            use_gpu=sc.use_gpu,
            gpu_mem_gib=pick("gpu_mem_gib", gpu_mem_gib, sc.gpu_memory_gb, 80.0),
            host_mem_gib=pick("host_mem_gib", host_mem_gib, sc.memory_per_worker_gb, None),
            cpus_per_worker=pick("cpus_per_worker", cpus_per_worker, None, None),
            sources=sources,
        )


@dataclass(frozen=True)
class MemoryItem:
    """One allocation of a worker: what, how many bytes, where it lives, when it is alive, how it is known.

    Attributes:
        name: what it is (``"AdamW state (exp_avg, exp_avg_sq), 1/8"``).
        bytes: size in bytes.
        tier: where it lives: ``gpu``, ``host`` or ``nvme``.
        phases: ``("persistent",)`` for the whole run, else the step phases during which it is alive.
        source: ``computed`` (from exact parameter counts and the engine's layout), ``traced`` (activation trace)
            or ``assumed`` (a documented constant).
        kind: what sort of state it is, which decides its tier under offload (:func:`_place`): ``parameters``,
            ``persistent_parameters``, ``gradients``, ``master``, ``optimizer``, ``optimizer_step``, ``ema``,
            ``buffer``, ``activations``, ``init``, ``checkpoint``, ``runtime``.
    """

    name: str
    bytes: int
    tier: Tier
    phases: tuple[str, ...] = ("persistent",)
    source: str = "computed"
    kind: str = "other"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "bytes": int(self.bytes),
            "gib": round(self.bytes / GiB, 3),
            "tier": self.tier,
            "phases": list(self.phases),
            "source": self.source,
        }


@dataclass(frozen=True)
class ModelStats:
    """Exact parameter statistics of a model configuration, from the model built on the ``meta`` device.

    Attributes:
        name: the variant.
        params: parameter count.
        param_numels: every parameter's element count (for ZeRO-3's persistence threshold).
        cast_params: parameters of Linear/Conv modules (what autocast casts to 16 bits).
        column_cast_params: the largest column's Linear/Conv parameters.
        largest_layer_params: the most parameters held directly by one module (DeepSpeed's "largest layer").
        largest_group_params: elements of the largest AdamW parameter group, without and with layer decay.
    """

    name: str
    params: int
    param_numels: tuple[int, ...]
    cast_params: int
    column_cast_params: int
    largest_layer_params: int
    largest_group_params: tuple[int, int]


@dataclass(frozen=True)
class ActivationTrace:
    """Activation memory and FLOPs of one step, traced (see :func:`activation_trace`).

    Attributes:
        kept_bytes: live bytes after the forward and loss (memory kept for backward).
        forward_peak_bytes: most live bytes during forward and loss.
        backward_peak_bytes: most live bytes during the whole step (for training: inside backward).
        forward_flops: forward FLOPs of the micro-batch (FlopCounterMode).
        micro_batch: the traced micro-batch.
        image_size: the traced resolution.
        train: a training step (forward + backward) rather than inference.
    """

    kept_bytes: int
    forward_peak_bytes: int
    backward_peak_bytes: int
    forward_flops: int
    micro_batch: int
    image_size: int
    train: bool

    def scaled(self, micro_batch: int) -> ActivationTrace:
        """This trace at another micro-batch: every activation tensor carries the batch dimension."""
        f = micro_batch / self.micro_batch
        return dataclasses.replace(
            self,
            kept_bytes=round(self.kept_bytes * f),
            forward_peak_bytes=round(self.forward_peak_bytes * f),
            backward_peak_bytes=round(self.backward_peak_bytes * f),
            forward_flops=round(self.forward_flops * f),
            micro_batch=micro_batch,
        )


@dataclass
class StagePlan:
    """The plan of one stage: ledger, peaks, FLOPs, verdict and what to change when it does not fit."""

    stage: str
    kind: str
    model: str
    image_size: int
    micro_batch: int
    grad_accum: int
    workers: int
    zero_stage: int
    precision: str
    stats: ModelStats
    trace: ActivationTrace
    items: list[MemoryItem]
    gpu_budget_bytes: int | None
    host_budget_bytes: int | None
    reserve_bytes: int
    headroom: float
    problems: list[str] = field(default_factory=list)
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deepspeed_estimate: dict[str, Any] | None = None

    # ------------------------------------------------------------------ derived numbers
    def tier_items(self, tier: str) -> list[MemoryItem]:
        """The items living on ``tier`` (``gpu``, ``host`` or ``nvme``)."""
        return [i for i in self.items if i.tier == tier]

    def phase_bytes(self, tier: str) -> dict[str, int]:
        """Bytes alive in each phase on ``tier`` on top of the persistent ones."""
        return {ph: sum(i.bytes for i in self.tier_items(tier) if ph in i.phases) for ph in PHASES}

    def persistent_bytes(self, tier: str) -> int:
        """Bytes on ``tier`` alive for the whole run."""
        return sum(i.bytes for i in self.tier_items(tier) if "persistent" in i.phases)

    def peak(self, tier: str) -> tuple[int, str]:
        """The most bytes alive on ``tier`` at once.

        Args:
            tier: ``gpu``, ``host`` or ``nvme``.

        Returns:
            ``(bytes, phase)``: persistent bytes plus those of the heaviest phase, and that phase.
        """
        phases = self.phase_bytes(tier)
        phase = max(phases, key=lambda p: phases[p])
        return self.persistent_bytes(tier) + phases[phase], phase

    def required_bytes(self, tier: str) -> int:
        """What ``tier`` must offer per worker for this stage.

        Args:
            tier: ``gpu``, ``host`` or ``nvme``.

        Returns:
            The peak, plus the fragmentation headroom on its phase's bytes, plus (on the training device) the
            runtime reserve.
        """
        peak, phase = self.peak(tier)
        dynamic = self.phase_bytes(tier)[phase]
        extra = self.reserve_bytes if tier == self.device_tier else 0
        return peak + math.ceil(self.headroom * dynamic) + extra

    @property
    def device_tier(self) -> str:
        return "gpu" if self.gpu_budget_bytes is not None else "host"

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.workers

    @property
    def fits(self) -> bool:
        return not self.problems

    @property
    def model_state_bytes(self) -> int:
        """Persistent bytes of parameters, gradients, master weights and optimizer state on all tiers."""
        kinds = ("parameters", "persistent_parameters", "gradients", "master", "optimizer")
        return sum(i.bytes for i in self.items if "persistent" in i.phases and i.kind in kinds)

    @property
    def step_flops(self) -> int:
        """FLOPs of one micro-batch step on one worker: ≈ 4× forward for training (reversible), 1× for eval."""
        return self.trace.forward_flops * (4 if self.trace.train else 1)

    def to_dict(self) -> dict[str, Any]:
        tiers = sorted({i.tier for i in self.items})
        per_worker = {}
        for tier in tiers:
            peak, phase = self.peak(tier)
            per_worker[tier] = {
                "persistent_bytes": self.persistent_bytes(tier),
                "peak_bytes": peak,
                "peak_phase": phase,
                "required_bytes": self.required_bytes(tier),
                "phase_bytes": self.phase_bytes(tier),
            }
        return {
            "stage": self.stage,
            "kind": self.kind,
            "model": self.model,
            "params": self.stats.params,
            "image_size": self.image_size,
            "micro_batch": self.micro_batch,
            "grad_accum": self.grad_accum,
            "workers": self.workers,
            "global_batch": self.global_batch,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "per_worker_bytes": {tier: v["required_bytes"] for tier, v in per_worker.items()},
            "per_worker": per_worker,
            "budget_bytes": {"gpu": self.gpu_budget_bytes, "host": self.host_budget_bytes},
            "reserve_bytes": self.reserve_bytes,
            "headroom": self.headroom,
            "model_state_bytes": self.model_state_bytes,
            "activations": {
                "method": ACTIVATION_METHOD,
                "kept_for_backward_bytes": self.trace.kept_bytes,
                "forward_peak_bytes": self.trace.forward_peak_bytes,
                "backward_peak_bytes": self.trace.backward_peak_bytes,
            },
            "flops": {
                "forward_per_micro_batch": self.trace.forward_flops,
                "step_per_micro_batch": self.step_flops,
                "step_rule": "4x forward (forward + recompute + 2x backward)" if self.trace.train else "forward",
                "per_optimizer_step_all_workers": self.step_flops * self.grad_accum * self.workers,
            },
            "deepspeed_estimate": self.deepspeed_estimate,
            "items": [i.to_dict() for i in self.items],
            "verdict": "fits" if self.fits else "does not fit",
            "problems": self.problems,
            "suggestions": self.suggestions,
            "notes": self.notes,
        }


@dataclass
class Plan:
    """The plan of a recipe: one :class:`StagePlan` per planned stage."""

    recipe: str
    cluster: ClusterShape
    stages: list[StagePlan]

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)

    def refusal(self) -> str:
        """A one-paragraph reason naming every stage that does not fit and the single changes that would fit."""
        lines = []
        for s in self.stages:
            if s.fits:
                continue
            fixes = [f"{_as_cli(x)} ({x['why']})" for x in s.suggestions if x["fits"]][:4]
            if fixes:
                hint = f"; fits with any of: {' | '.join(fixes)}"
            elif s.suggestions:
                hint = "; no single change (ZeRO stage, micro-batch, workers, offload) fits alone: combine them"
            else:
                hint = ""
            lines.append(f"stage {s.stage!r}: {'; '.join(s.problems)}{hint}")
        return f"recipe {self.recipe!r} does not fit: " + "\n  ".join(lines)

    def to_dict(self) -> dict[str, Any]:
        c = self.cluster
        return {
            "recipe": self.recipe,
            "cluster": {
                "workers": c.workers,
                "use_gpu": c.use_gpu,
                "gpu_mem_gib": c.gpu_mem_gib,
                "host_mem_gib": c.host_mem_gib,
                "cpus_per_worker": c.cpus_per_worker,
                "sources": c.sources,
            },
            "activation_method": ACTIVATION_METHOD,
            "stages": [s.to_dict() for s in self.stages],
            "fits": self.fits,
            "verdict": "fits" if self.fits else "does not fit",
        }


def _as_cli(suggestion: dict[str, Any]) -> str:
    """A suggestion as ``--set`` arguments."""
    return " ".join(f"--set {o}" for o in suggestion["set"])
