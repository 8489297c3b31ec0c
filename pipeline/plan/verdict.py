"""The verdict: plan a stage, check it against the cluster shape, and suggest settings that fit when it does not."""

from __future__ import annotations


import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any


from pipeline.config import Recipe, StageConfig
from pipeline.plan.ledger import _activation_items, _deepspeed_estimate, _host_items, _inference_state_items, _model_state_items
from pipeline.plan.model_stats import activation_trace, model_stats
from pipeline.plan.shapes import ActivationTrace, ClusterShape, GiB, ModelStats, Plan, StagePlan, Tier

logger = logging.getLogger(__name__)


def plan_stage(
    stage: StageConfig,
    cluster: ClusterShape,
    *,
    cpus_needed: float | None = None,
    reserve_gib: float = 3.0,
    headroom: float = 0.10,
    runtime_host_gib: float = 3.0,
    suggest: bool = True,
    with_deepspeed_estimate: bool = True,
) -> StagePlan:
    """Plans one stage on ``cluster``.

    Args:
        stage: a validated stage.
        cluster: the cluster shape.
        cpus_needed: CPU cores a worker reserves (its trainer CPUs and its share of the data CPUs), checked
            against ``cluster.cpus_per_worker``; None: not checked.
        reserve_gib: device memory taken by the CUDA context, cuBLAS/cuDNN workspaces and NCCL, GiB.
        headroom: fragmentation headroom, as a fraction of the dynamic (per-phase) bytes at the peak.
        runtime_host_gib: host memory of a worker process before any model (Python, torch, Ray, CUDA), GiB.
        suggest: when the stage does not fit, plan single changes and list them, those that fit first.
        with_deepspeed_estimate: also report DeepSpeed's own estimate (imports DeepSpeed).

    Returns:
        The stage plan; ``problems`` is empty when it fits.
    """
    settings = _Settings(cpus_needed=cpus_needed, reserve_gib=reserve_gib, headroom=headroom,
                         runtime_host_gib=runtime_host_gib)
    plan = _plan_with(stage, cluster, model_stats(stage), activation_trace(stage), settings)
    if with_deepspeed_estimate and stage.kind != "eval":
        plan.deepspeed_estimate = _deepspeed_estimate(plan.stats, stage, cluster)
    if suggest and not plan.fits:
        plan.suggestions = _suggestions(stage, cluster, plan, settings)
    return plan


@dataclass(frozen=True)
class _Settings:
    cpus_needed: float | None
    reserve_gib: float
    headroom: float
    runtime_host_gib: float


def _plan_with(
    stage: StageConfig, cluster: ClusterShape, stats: ModelStats, trace: ActivationTrace, settings: _Settings
) -> StagePlan:
    device: Tier = "gpu" if cluster.use_gpu else "host"
    ema = stage.regularize.ema_decay is not None and stage.kind != "eval"
    if stage.kind == "eval":
        items = _inference_state_items(stats, stage, cluster.workers, device)
    else:
        items = _model_state_items(stats, stage, cluster.workers, device, ema=ema)
    items += _activation_items(stats, trace, stage.deepspeed.precision, device)
    items += _host_items(stats, stage, trace, ema=ema, runtime_host_bytes=int(settings.runtime_host_gib * GiB))
    plan = StagePlan(
        stage=str(stage.name),
        kind=stage.kind,
        model=stage.model.name,
        image_size=trace.image_size,
        micro_batch=trace.micro_batch,
        grad_accum=stage.deepspeed.grad_accum,
        workers=cluster.workers,
        zero_stage=stage.deepspeed.zero_stage,
        precision=stage.deepspeed.precision,
        stats=stats,
        trace=trace,
        items=items,
        gpu_budget_bytes=int(cluster.gpu_mem_gib * GiB) if cluster.use_gpu else None,
        host_budget_bytes=int(cluster.host_mem_gib * GiB) if cluster.host_mem_gib is not None else None,
        reserve_bytes=int(settings.reserve_gib * GiB) if cluster.use_gpu else 0,
        headroom=settings.headroom,
    )
    if stage.model.num_classes is None:
        plan.notes.append("model.num_classes unset (taken from the manifest at run time): planned with 1000")
    if stage.deepspeed.precision != "fp32":
        plan.notes.append("activations traced in fp32: an upper bound under autocast")
    if "nvme" in (stage.deepspeed.offload_optimizer, stage.deepspeed.offload_param):
        plan.notes.append("NVMe offload: swap buffers modelled, disk bandwidth (the step time) is not")
    _check(plan, cluster, settings.cpus_needed)
    return plan


def _check(plan: StagePlan, cluster: ClusterShape, cpus_needed: float | None) -> None:
    """Fills ``plan.problems``: device memory, host memory, CPU cores."""
    if plan.gpu_budget_bytes is not None:
        need, (peak, phase) = plan.required_bytes("gpu"), plan.peak("gpu")
        if need > plan.gpu_budget_bytes:
            plan.problems.append(
                f"needs {need / GiB:.1f} GiB per GPU (peak {peak / GiB:.1f} GiB in {phase}, of which "
                f"{plan.persistent_bytes('gpu') / GiB:.1f} GiB for the whole run; plus reserve and headroom), "
                f"has {plan.gpu_budget_bytes / GiB:.1f} GiB"
            )
    if plan.host_budget_bytes is not None:
        need, (_, phase) = plan.required_bytes("host"), plan.peak("host")
        if need > plan.host_budget_bytes:
            plan.problems.append(
                f"needs {need / GiB:.1f} GiB host memory per worker (peak in {phase}), "
                f"has {plan.host_budget_bytes / GiB:.1f} GiB: raise scaling.memory_per_worker_gb (or use fewer "
                f"workers per node)"
            )
    if cpus_needed is not None and cluster.cpus_per_worker is not None and cpus_needed > cluster.cpus_per_worker:
        plan.problems.append(
            f"needs {cpus_needed:g} CPUs per worker (scaling.cpus_per_worker plus its share of scaling.data_cpus), "
            f"has {cluster.cpus_per_worker:g}: lower scaling.data_cpus or scaling.cpus_per_worker"
        )


def _divisors_below(n: int) -> list[int]:
    return [d for d in range(n - 1, 0, -1) if n % d == 0]


def _suggestions(
    stage: StageConfig, cluster: ClusterShape, plan: StagePlan, settings: _Settings
) -> list[dict[str, Any]]:
    """Single changes to ``stage`` or the cluster, each planned: a higher ZeRO stage, a smaller micro-batch with
    more accumulation (same global batch; the trace scaled, since every activation carries the batch dimension),
    more workers (sharded states shrink; the global batch grows), optimizer offload to the host, more host
    memory. Those that fit come first: higher ZeRO stages, then the largest fitting micro-batch, then the rest."""
    key = f"stages.{stage.name}"
    ds, trace = stage.deepspeed, plan.trace
    candidates: list[tuple[list[str], StageConfig, ClusterShape, ActivationTrace, str]] = []

    def with_ds(**update: Any) -> StageConfig:
        return stage.model_copy(update={"deepspeed": ds.model_copy(update=update)})

    for z in range(ds.zero_stage + 1, 4):
        candidates.append(([f"{key}.deepspeed.zero_stage={z}"], with_ds(zero_stage=z), cluster, trace, f"ZeRO-{z}"))
    for micro in _divisors_below(trace.micro_batch):
        accum = ds.grad_accum * (trace.micro_batch // micro)
        new = stage.model_copy(update={"data": stage.data.model_copy(update={"batch_size": micro}),
                                       "deepspeed": ds.model_copy(update={"grad_accum": accum})})
        sets = [f"{key}.data.batch_size={micro}", f"{key}.deepspeed.grad_accum={accum}"]
        candidates.append((sets, new, cluster, trace.scaled(micro), f"micro-batch {micro}, same global batch"))
    if ds.zero_stage:
        for factor in (2, 4):
            more = dataclasses.replace(cluster, workers=cluster.workers * factor)
            why = f"{more.workers} workers (global batch x{factor})"
            candidates.append(([f"scaling.num_workers={more.workers}"], stage, more, trace, why))
    if stage.kind != "eval" and ds.zero_stage and ds.offload_optimizer == "none":
        candidates.append(([f"{key}.deepspeed.offload_optimizer=cpu"], with_ds(offload_optimizer="cpu"), cluster,
                           trace, "optimizer state on the host"))
    if plan.host_budget_bytes is not None and plan.required_bytes("host") > plan.host_budget_bytes:
        gib = math.ceil(plan.required_bytes("host") / GiB)
        bigger = dataclasses.replace(cluster, host_mem_gib=gib)
        candidates.append(([f"scaling.memory_per_worker_gb={gib}"], stage, bigger, trace, f"{gib} GiB host per worker"))

    out = []
    for sets, new_stage, new_cluster, new_trace, why in candidates:
        alt = _plan_with(new_stage, new_cluster, plan.stats, new_trace, settings)
        tier = alt.device_tier
        need = alt.required_bytes(tier)
        out.append({"set": sets, "why": f"{why}: {need / GiB:.1f} GiB per {'GPU' if tier == 'gpu' else 'worker'}",
                    "fits": alt.fits, "required_bytes": need})
    fitting = [s for s in out if s["fits"]]
    micro_fits = [s for s in fitting if "batch_size" in s["set"][0]]
    others = [s for s in fitting if "batch_size" not in s["set"][0]]
    return others + micro_fits[:1] + [s for s in out if not s["fits"]]


def plan_recipe(
    recipe: Recipe,
    cluster: ClusterShape | None = None,
    *,
    stage: str | None = None,
    with_deepspeed_estimate: bool = True,
    **kwargs: Any,
) -> Plan:
    """Plans every stage of ``recipe`` (or only ``stage``) on ``cluster``.

    Args:
        recipe: the validated recipe.
        cluster: the cluster shape; defaults to the recipe's ``scaling``.
        stage: plan only the stage of this name.
        with_deepspeed_estimate: also report DeepSpeed's own model-state estimates.
        **kwargs: passed to :func:`plan_stage` (``reserve_gib``, ``headroom``, ``runtime_host_gib``, ``suggest``).

    Returns:
        The plan; ``plan.fits`` is the verdict.

    Raises:
        KeyError: ``stage`` names no stage of the recipe.
    """
    cluster = cluster or ClusterShape.from_recipe(recipe)
    stages = [recipe.stage(stage)] if stage is not None else list(recipe.stages)
    sc = recipe.scaling
    cpus = sc.cpus_per_worker + sc.data_cpus / cluster.workers
    plans = [
        plan_stage(s, cluster, cpus_needed=cpus, with_deepspeed_estimate=with_deepspeed_estimate, **kwargs)
        for s in stages
    ]
    return Plan(recipe=recipe.name, cluster=cluster, stages=plans)
