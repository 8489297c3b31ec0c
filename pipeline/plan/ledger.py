"""The memory ledger of one worker: every :class:`MemoryItem` (weights, gradients, master weights, AdamW state, EMA,
DeepSpeed's buckets and swap buffers, activations, host-side copies) with its bytes, its tier (``gpu``, ``host``,
``nvme``) and the step phases it is alive in, per ZeRO stage and offload setting of this engine (fp32 weights under
torch autocast, see ``pipeline/train/engine.py``). DeepSpeed's own estimate is here too, for comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import DeepSpeedConfig, StageConfig
from pipeline.plan.clusters import ClusterShape
from pipeline.plan.stats import ModelStats
from pipeline.plan.trace import ActivationTrace

GiB = 2**30
Tier = Literal["gpu", "host", "nvme"]
PHASES: tuple[str, ...] = ("init", "forward", "backward", "grad_reduce", "optimizer_step", "checkpoint")
"""Step phases; an item is alive in some of them, or ``persistent`` (the whole run)."""

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


def _zero_option(ds: DeepSpeedConfig, key: str, *, largest_param: int = 0) -> Any:
    """A ``zero_optimization`` option (``offload_param.buffer_size`` for nested ones) as the run will use it:
    from the generated DeepSpeed config (``deepspeed.extra`` merged in), else DeepSpeed's default."""
    from pipeline.train.engine import deepspeed_config

    zero = deepspeed_config(ds, micro_batch=1, largest_param=largest_param)["zero_optimization"]
    section, _, leaf = key.rpartition(".")
    values = zero.get(section, {}) if section else zero
    for name in (leaf, leaf.removeprefix("stage3_")):
        if name in values:
            return values[name]
    return _DS_DEFAULTS.get(key)


def _place(kind: str, ds: DeepSpeedConfig, device: Tier) -> Tier:
    """Where a kind of model state lives: the one place that knows offload.

    AdamW state and master weights follow ``offload_optimizer`` (``cpu``: host, ``nvme``: NVMe); the sharded
    gradients and the optimizer-step temporaries go with the optimizer to the host (NVMe offload stages them in
    host memory); ZeRO-3 parameter partitions follow ``offload_param``. Everything else stays on the device.
    ZeRO-Infinity's pinned staging and swap buffers, and the offload bandwidth, are not modelled yet: that is
    where an NVMe/CPU offload model adds its own items.
    """
    tier_of: dict[str, Tier] = {"none": device, "cpu": "host", "nvme": "nvme"}
    if kind in ("optimizer", "master"):
        return tier_of[ds.offload_optimizer]
    if kind in ("gradients", "optimizer_step") and ds.zero_stage >= 1 and ds.offload_optimizer != "none":
        return "host"
    if kind in ("swap_buffer", "host_parameters"):
        return "host"
    if kind == "parameters" and ds.zero_stage == 3:
        return tier_of[ds.offload_param]
    return device


def _model_state_items(
    stats: ModelStats, stage: StageConfig, workers: int, device: Tier, *, ema: bool
) -> list[MemoryItem]:
    """Parameters, gradients, master weights, AdamW state, EMA, ZeRO buffers and optimizer-step temporaries of
    one training worker (fp32 weights, see the module docstring)."""
    ds = stage.deepspeed
    z, w, p = ds.zero_stage, workers, stats.params
    own = math.ceil(p / w)  # this rank's partition
    shard = f", 1/{w}" if w > 1 else ""
    items: list[tuple[str, str, int, tuple[str, ...]]] = []  # (kind, name, bytes, phases)
    persistent = ("persistent",)
    if z == 3:
        threshold = int(_zero_option(ds, "stage3_param_persistence_threshold"))
        small = sum(n for n in stats.param_numels if n < threshold)
        items += [
            ("parameters", f"parameters (fp32{shard})", _FP32 * own, persistent),
            ("persistent_parameters", f"parameters kept whole (numel < {threshold}, fp32)", _FP32 * small, persistent),
        ]
        if ds.offload_param == "nvme":  # DeepSpeed's async I/O skips partitions under 1 MiB: they stay in memory
            unswapped = sum(math.ceil(n / w) for n in stats.param_numels if n >= threshold and _FP32 * n / w < _MIN_SWAP_BYTES)
            items.append(("host_parameters", "parameter partitions too small to swap (< 1 MiB, fp32)", _FP32 * unswapped,
                          persistent))
    else:
        items.append(("parameters", "parameters (fp32)", _FP32 * p, persistent))
    if z:
        # ZeRO-1 in DeepSpeed also reduces into the owned partition during backward (measured: ZeRO-1 and ZeRO-2
        # hold the same bytes after backward).
        items.append(("gradients", f"gradients (fp32{shard})", _FP32 * own, persistent))
        # A separate fp32 master partition even for fp32 weights under ZeRO-1/2 (stage_1_and_2.py clones it);
        # ZeRO-3 aliases fp32 weights (see deepspeed_fixes.use_fp32_weights_as_zero3_master) unless it offloads them.
        if z < 3 or ds.offload_optimizer != "none":
            items.append(("master", f"master weights (fp32{shard})", _FP32 * own, persistent))
        items.append(("optimizer", f"AdamW state (exp_avg, exp_avg_sq{shard})", _ADAM * own, persistent))
    else:
        items.append(("gradients", "gradients (fp32)", _FP32 * p, persistent))
        items.append(("optimizer", "AdamW state (exp_avg, exp_avg_sq)", _ADAM * p, persistent))
    if ema:  # pipeline.train.ema.ShardedEma: sharded like the weights under ZeRO-3
        ema_name = f"EMA weights (fp32{shard if z == 3 else ''})"
        items.append(("ema", ema_name, _FP32 * (own if z == 3 else p), persistent))
        items.append(("checkpoint", "EMA gathered whole for a checkpoint (fp32)", _FP32 * p, ("checkpoint",)))

    # Gradient communication buffers.
    bucket = int(_zero_option(ds, "reduce_bucket_size"))
    comm_dtypes = 1 if ds.precision == "fp32" else 2  # under autocast Linear/Conv gradients communicate in 16 bits
    if z == 0:
        if w > 1:
            elements = min(p, _ZERO0_ALLREDUCE_ELEMENTS)
            items.append(("buffer", "gradient all-reduce bucket (fp32)", _FP32 * elements, ("grad_reduce",)))
    elif _zero_option(ds, "contiguous_gradients"):
        overlap = _zero_option(ds, "overlap_comm")
        overlap = z == 3 if overlap is None else bool(overlap)
        if z == 3:  # one bucket per communication dtype, typed like it
            size = (_FP32 + (2 if comm_dtypes == 2 else 0)) * bucket
            name = f"gradient reduce buckets ({comm_dtypes} dtype(s) x {bucket:.0e})"
            items.append(("buffer", name, size, persistent))
        else:  # fp32 staging per communication dtype, doubled with overlap_comm
            copies = comm_dtypes * (2 if overlap else 1)
            size = copies * _FP32 * bucket
            items.append(("buffer", f"gradient reduce buckets ({copies} x {bucket:.0e} fp32)", size, persistent))
    if z == 3:
        prefetch = int(_zero_option(ds, "stage3_prefetch_bucket_size"))
        live = min(stats.largest_layer_params + prefetch, int(_zero_option(ds, "stage3_max_live_parameters")))
        name = "gathered parameters (largest layer + prefetch, fp32)"
        items.append(("buffer", name, _FP32 * live, ("forward", "backward")))
        # Built under zero.Init (pipeline.train.engine.build_model): one module whole at a time.
        items.append(("init", "largest module whole before partitioning (fp32)", _FP32 * stats.largest_layer_params,
                      ("init",)))
        if ds.offload_param == "nvme":
            largest = max(stats.param_numels)
            count = int(_zero_option(ds, "offload_param.buffer_count"))
            size = int(_zero_option(ds, "offload_param.buffer_size", largest_param=largest))
            items.append(("swap_buffer", f"parameter swap buffers ({count} x {size:.1e} fp32)", _FP32 * count * size,
                          persistent))

    # Optimizer step: the flat fp32 gradient of the owned partition, and torch AdamW's foreach temporary (the
    # square root of exp_avg_sq) over the largest parameter group on this rank.
    group = stats.largest_group_params[1 if stage.optim.layer_decay is not None else 0]
    step = ("optimizer_step",)
    if z and ds.offload_optimizer == "nvme":
        # The step swaps one sub-group at a time (weights, gradients, both moments) into pinned buffers and runs
        # CPU Adam there: no other step temporaries.
        count = int(_zero_option(ds, "offload_optimizer.buffer_count"))
        sub_group = min(own, int(_zero_option(ds, "sub_group_size")))
        name = f"optimizer swap buffers ({count} x {sub_group:.1e} fp32)"
        items.append(("swap_buffer", name, _FP32 * count * sub_group, persistent))
    elif z:
        flat = min(own, int(_zero_option(ds, "sub_group_size")))
        items.append(("optimizer_step", "flat fp32 gradient for the optimizer step", _FP32 * flat, step))
        name = "AdamW step temporary (largest group partition)"
        items.append(("optimizer_step", name, _FP32 * math.ceil(group / w), step))
    else:
        items.append(("optimizer_step", "AdamW step temporary (largest group)", _FP32 * group, step))
    return [MemoryItem(name, size, _place(kind, ds, device), phases, kind=kind) for kind, name, size, phases in items]


def _inference_state_items(stats: ModelStats, stage: StageConfig, workers: int, device: Tier) -> list[MemoryItem]:
    """The weights of an evaluation worker (no gradients, no optimizer)."""
    ds, p = stage.deepspeed, stats.params
    if ds.zero_stage != 3:
        return [MemoryItem("parameters (fp32)", _FP32 * p, device, kind="parameters")]
    prefetch = int(_zero_option(ds, "stage3_prefetch_bucket_size"))
    return [
        MemoryItem(f"parameters (fp32, 1/{workers})", _FP32 * math.ceil(p / workers), _place("parameters", ds, device),
                   kind="parameters"),
        MemoryItem("gathered parameters (largest layer + prefetch, fp32)",
                   _FP32 * (stats.largest_layer_params + prefetch), device, ("forward",), kind="buffer"),
        MemoryItem("parameters whole before partitioning (fp32)", _FP32 * p, device, ("init",), kind="init"),
    ]


def _activation_items(stats: ModelStats, trace: ActivationTrace, precision: str, device: Tier) -> list[MemoryItem]:
    """Traced activations per phase, plus autocast's cache of 16-bit weight copies."""
    items = [
        MemoryItem("activations: forward peak (traced)", trace.forward_peak_bytes, device, ("forward",), "traced",
                   kind="activations"),
    ]
    if trace.train:
        items.append(MemoryItem("activations: kept for backward + recompute working set (traced)",
                                trace.backward_peak_bytes, device, ("backward",), "traced", kind="activations"))
    if precision != "fp32":
        # torch.autocast caches the cast of every leaf fp32 weight it casts until the outermost autocast exits:
        # the engine's forward holds all of them; the reversible backward re-enters autocast per column.
        items.append(MemoryItem("autocast weight-cast cache (16-bit Linear/Conv weights)", 2 * stats.cast_params,
                                device, ("forward",), kind="activations"))
        if trace.train:
            items.append(MemoryItem("autocast weight-cast cache, one column's recompute", 2 * stats.column_cast_params,
                                    device, ("backward",), kind="activations"))
    return items


def _host_items(
    stats: ModelStats, stage: StageConfig, trace: ActivationTrace, *, ema: bool, runtime_host_bytes: int
) -> list[MemoryItem]:
    """Host memory of a worker process besides offloaded states: runtime, input batches, the fp32 model built on
    the host (and init weights read there) before DeepSpeed, and checkpoint/export copies (rank 0)."""
    p = stats.params
    batch_bytes = _PREFETCH_BATCHES * trace.micro_batch * 3 * trace.image_size**2 * _FP32
    items = [
        MemoryItem("process runtime (Python, torch, Ray, CUDA host side)", runtime_host_bytes, "host",
                   source="assumed", kind="runtime"),
        MemoryItem(f"input batches in flight ({_PREFETCH_BATCHES}, fp32)", batch_bytes, "host", kind="runtime"),
    ]
    partitioned = stage.deepspeed.zero_stage == 3 and stage.kind != "eval"  # built under zero.Init, exported streamed
    if not partitioned:
        items.append(MemoryItem("model built on the host before DeepSpeed (fp32)", _FP32 * p, "host", ("init",),
                                kind="init"))
    if stage.init_from:
        items.append(MemoryItem("init_from weights read on the host (fp32)", _FP32 * p, "host", ("init",), kind="init"))
    if stage.kind != "eval":
        exported = max(stats.param_numels) if partitioned else p
        items.append(MemoryItem("exported weights on the host (rank 0, fp32)", _FP32 * exported, "host", ("checkpoint",),
                                kind="checkpoint"))
        if ema:
            items.append(MemoryItem("EMA copied to the host for saving (fp32)", _FP32 * p, "host", ("checkpoint",),
                                    kind="checkpoint"))
    return items


def _deepspeed_estimate(stats: ModelStats, stage: StageConfig, cluster: ClusterShape) -> dict[str, Any]:
    """DeepSpeed's own model-state estimate for this stage (16-bit weights assumed), for comparison."""
    ds = stage.deepspeed
    per_node = min(cluster.gpus_per_node, cluster.workers)
    nodes = math.ceil(cluster.workers / per_node)
    note = (
        "DeepSpeed's estimator assumes 16-bit weights and gradients plus an fp32 master copy; this engine trains "
        "fp32 weights under autocast (see model_state_bytes), so the two differ by design"
    )
    if ds.zero_stage in (0, 1):
        return {"function": None, "note": f"DeepSpeed has no estimator for ZeRO-{ds.zero_stage}"}
    if ds.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        cpu, gpu = estimate_zero2_model_states_mem_needs(
            stats.params, num_gpus_per_node=per_node, num_nodes=nodes, cpu_offload=ds.offload_optimizer != "none"
        )
        fn = "deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs"
    else:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            stats.params,
            stats.largest_layer_params,
            num_gpus_per_node=per_node,
            num_nodes=nodes,
            cpu_offload=ds.offload_optimizer != "none",
            cpu_offload_params=ds.offload_param != "none",
            zero_init=False,
        )
        fn = "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
    return {"function": fn, "gpu_bytes": int(gpu), "cpu_bytes_per_node": int(cpu), "note": note}
