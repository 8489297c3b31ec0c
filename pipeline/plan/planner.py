"""Planning: :func:`plan_recipe` (what ``revcol plan`` and ``revcol run`` call) and :func:`plan_stage` build each
stage's ledger from its model statistics and activation trace, check it, and attach suggestions and DeepSpeed's
own estimate."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from pipeline.config import Recipe, StageConfig
from pipeline.plan.clusters import ClusterShape
from pipeline.plan.ledger import (
    GiB,
    Tier,
    _activation_items,
    _deepspeed_estimate,
    _host_items,
    _inference_state_items,
    _model_state_items,
)
from pipeline.plan.result import Plan, StagePlan
from pipeline.plan.stats import ModelStats, model_stats
from pipeline.plan.trace import ActivationTrace, activation_trace
from pipeline.plan.verdict import _check, _suggestions


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
    # data_cpus "all" takes the data nodes' CPUs, or what the workers leave: never a worker's own share
    data_share = 0.0 if sc.data_cpus == "all" else sc.data_cpus / cluster.workers
    cpus = sc.cpus_per_worker + data_share
    plans = [
        plan_stage(s, cluster, cpus_needed=cpus, with_deepspeed_estimate=with_deepspeed_estimate, **kwargs)
        for s in stages
    ]
    return Plan(recipe=recipe.name, cluster=cluster, stages=plans)


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
        plan.suggestions = _suggestions(stage, cluster, plan, functools.partial(_replan, plan.stats, settings))
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


def _replan(
    stats: ModelStats, settings: _Settings, stage: StageConfig, cluster: ClusterShape, trace: ActivationTrace
) -> StagePlan:
    return _plan_with(stage, cluster, stats, trace, settings)
