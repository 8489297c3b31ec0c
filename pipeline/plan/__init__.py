"""``revcol plan``: per-worker memory and step cost of each stage of a recipe on a cluster shape, before launching.

For every stage the plan builds a ledger of :class:`MemoryItem` — what is allocated, how many bytes, *where it
lives* (``gpu``, ``host`` or ``nvme``: the tier) and *when* (``persistent``, or during one phase of the step:
``init``, ``forward``, ``backward``, ``grad_reduce``, ``optimizer_step``, ``checkpoint``) — and the peak per tier is
``sum(persistent) + max over phases of sum(phase items)``. A stage fits when the GPU peak, plus a runtime reserve
(CUDA context, cuBLAS/NCCL workspaces) and a fragmentation headroom on the dynamic part, is within the GPU memory
per worker, and the host peak within the host memory per worker (when one is known). Offload (ZeRO-Offload /
ZeRO-Infinity) is a matter of which tier an item is placed on: see :func:`pipeline.plan.ledger._place`.

Where the numbers come from:

* **Parameter counts** are exact: the stage's model is built on the ``meta`` device (no weights are allocated).
* **Model states** (parameters, gradients, AdamW state, master weights, EMA, communication buckets) are computed
  per ZeRO stage for *this* engine: fp32 weights with torch autocast (``pipeline/train/engine.py``), so parameters,
  gradients and master weights are fp32 — 16 bytes/parameter unsharded (4 weights + 4 gradients + 8 AdamW), ZeRO-1
  shards the AdamW state (and, in DeepSpeed, the gradients too), ZeRO-2 the gradients, ZeRO-3 also the weights.
  ZeRO-1/2 also keep a separate fp32 master partition (4/W bytes per parameter): DeepSpeed clones it even from
  fp32 weights. ZeRO-3 uses the fp32 weights as their own master (``stage3.py`` means to, and does once
  ``pipeline.train.deepspeed_fixes.use_fp32_weights_as_zero3_master`` fixes its device check), unless the optimizer is
  offloaded, where the master is a converted copy on the host or NVMe. These per-stage
  bytes were checked against real DeepSpeed engines on 2 gloo ranks (CPU heap after backward: within 5 % for
  ZeRO-0…3, fp32 and bf16). DeepSpeed's own estimators
  (``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``, the functions behind
  ``…_all_cold``) assume 16-bit weights and gradients plus an fp32 master (2·P + 18·P/W for ZeRO-2,
  4·largest_layer + 18·P/W for ZeRO-3): their figure is reported beside ours as ``deepspeed_estimate`` for
  comparison, not used for the verdict.
* **Activations** are *analytic, from the model itself*: one training step (forward with the reversible columns,
  the stage's loss, reversible backward) is run on fake tensors (``FakeTensorMode``: meta storage, no memory,
  no compute) at the stage's resolution and micro-batch, and the bytes of live tensor storages are tracked after
  every aten op (:class:`pipeline.plan.trace._LiveBytes`). That gives the memory kept for backward (live bytes after the loss — what
  ``revcol.measure.memory_kept_for_backward`` measures on a real CPU run; tests compare the two), the forward peak,
  and the backward peak (kept + one column's level-by-level recompute working set + gradients in flight). The
  trace runs in fp32; under bf16/fp16 autocast the GPU keeps many of these tensors in 16 bits, so for those
  precisions the traced activation bytes are an upper bound. Autocast's weight-cast cache (16-bit copies of
  Linear/Conv weights, alive through the forward, and one column's during its recompute) is added analytically.
* **FLOPs**: the forward is counted by ``torch.utils.flop_counter.FlopCounterMode`` during the same trace; a training
  step of the reversible model is ≈ (3 + r)× forward (forward, 2× backward, and the recompute of the share r of
  the columns: all but the last on the default path, 3.75× for RevCol-T; all on ``fast_path: false``, 4×). The
  counter's own backward count is not used: it ignores ``groups`` in ``convolution_backward`` and over-counts
  depthwise convolutions ×C.

Traces and model statistics are cached in-process per (model, classes, resolution, micro-batch, ...), so planning
suggestions and several recipes sharing a model costs one trace each.

Modules, in the order a plan is made:

* ``clusters``: :class:`ClusterShape`, the cluster a recipe is planned for (from the recipe's ``scaling``, or a
  cluster declared in ``infra/clusters.yaml``: ``revcol plan --cluster NAME``);
* ``stats``: exact parameter statistics of a stage's model, built on the ``meta`` device;
* ``trace``: the activation trace (one step on fake tensors: live bytes op by op, forward FLOPs);
* ``ledger``: the memory items of a worker per ZeRO stage and offload setting (what lives where, when);
* ``result``: :class:`StagePlan` and :class:`Plan` (peaks per tier, required bytes, JSON);
* ``verdict``: whether a stage fits (GPU, host memory, CPUs) and the single changes that would make it fit;
* ``planner``: :func:`plan_stage` and :func:`plan_recipe`, which put the above together;
* ``report``: :func:`format_plan`, the text report;
* ``command``: ``revcol plan`` (its parser and command function).

Names are re-exported here lazily (PEP 562): ``import pipeline.plan`` and ``pipeline.plan.command`` (what the CLI
imports to build its parser) load no torch; the first use of a planning name imports its module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.plan.clusters import ClusterShape
    from pipeline.plan.command import add_parser
    from pipeline.plan.ledger import MemoryItem
    from pipeline.plan.planner import plan_recipe, plan_stage
    from pipeline.plan.report import format_plan
    from pipeline.plan.result import Plan, StagePlan
    from pipeline.plan.stats import ModelStats, model_stats
    from pipeline.plan.trace import ActivationTrace, activation_trace

__all__ = [
    "ActivationTrace",
    "ClusterShape",
    "MemoryItem",
    "ModelStats",
    "Plan",
    "StagePlan",
    "activation_trace",
    "add_parser",
    "format_plan",
    "model_stats",
    "plan_recipe",
    "plan_stage",
]

_MODULE_OF = {
    "ActivationTrace": "trace",
    "ClusterShape": "clusters",
    "MemoryItem": "ledger",
    "ModelStats": "stats",
    "Plan": "result",
    "StagePlan": "result",
    "activation_trace": "trace",
    "add_parser": "command",
    "format_plan": "report",
    "model_stats": "stats",
    "plan_recipe": "planner",
    "plan_stage": "planner",
}


def __getattr__(name: str) -> Any:
    """Imports the module that defines ``name`` on first use (see the module docstring)."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
