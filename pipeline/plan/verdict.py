"""The verdict: whether a stage's plan fits its cluster (GPU memory, host memory, CPU cores), and when it does not,
the single changes that would (a higher ZeRO stage, a smaller micro-batch, more workers, optimizer offload, more
host memory), each planned again."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

from pipeline.config import StageConfig
from pipeline.plan.clusters import ClusterShape
from pipeline.plan.ledger import GiB
from pipeline.plan.result import StagePlan
from pipeline.plan.trace import ActivationTrace

Replan = Callable[[StageConfig, ClusterShape, ActivationTrace], StagePlan]
"""Plans a changed stage on a changed cluster with a (scaled) trace: how suggestions are checked."""


def _check(plan: StagePlan, cluster: ClusterShape, cpus_needed: float | None) -> None:
    """Fills ``plan.problems``: device memory, host memory, CPU cores."""
    for tier, budget in (("gpu", plan.gpu_budget_bytes), ("host", plan.host_budget_bytes)):
        if budget is None:
            continue
        need, (peak, phase) = plan.required_bytes(tier), plan.peak(tier)
        if need <= budget:
            continue
        if tier == "gpu":
            what = (f"per GPU (peak {peak / GiB:.1f} GiB in {phase}, of which {plan.persistent_bytes('gpu') / GiB:.1f} "
                    f"GiB for the whole run; plus reserve and headroom)")
            fix = ""
        else:
            what, fix = f"host memory per worker (peak in {phase})", (
                ": raise scaling.memory_per_worker_gb (or use fewer workers per node)")
        plan.problems.append(f"needs {need / GiB:.1f} GiB {what}, has {budget / GiB:.1f} GiB{fix}")
    if cpus_needed is not None and cluster.cpus_per_worker is not None and cpus_needed > cluster.cpus_per_worker:
        plan.problems.append(
            f"needs {cpus_needed:g} CPUs per worker (scaling.cpus_per_worker plus its share of scaling.data_cpus), "
            f"has {cluster.cpus_per_worker:g}: lower scaling.data_cpus or scaling.cpus_per_worker"
        )


def _divisors_below(n: int) -> list[int]:
    return [d for d in range(n - 1, 0, -1) if n % d == 0]


def _suggestions(
    stage: StageConfig, cluster: ClusterShape, plan: StagePlan, replan: Replan
) -> list[dict[str, Any]]:
    """Single changes to ``stage`` or the cluster, each planned: a higher ZeRO stage, a smaller micro-batch with
    more accumulation (same global batch; the trace scaled, since every activation carries the batch dimension),
    more workers (sharded states shrink; the global batch grows), optimizer offload to the host, more host
    memory. Those that fit come first: higher ZeRO stages, then the largest fitting micro-batch, then the rest.

    ``replan(stage, cluster, trace)`` plans a changed stage with the same model statistics and settings."""
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
        alt = replan(new_stage, new_cluster, new_trace)
        tier = alt.device_tier
        need = alt.required_bytes(tier)
        out.append({"set": sets, "why": f"{why}: {need / GiB:.1f} GiB per {'GPU' if tier == 'gpu' else 'worker'}",
                    "fits": alt.fits, "required_bytes": need})
    fitting = [s for s in out if s["fits"]]
    micro_fits = [s for s in fitting if "batch_size" in s["set"][0]]
    others = [s for s in fitting if "batch_size" not in s["set"][0]]
    return others + micro_fits[:1] + [s for s in out if not s["fits"]]
