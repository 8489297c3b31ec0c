"""The text report of a plan (what ``revcol plan`` prints without ``--json``): per stage, every memory item by tier
with its phases, the peaks against the budget, FLOPs, notes, and the verdict with suggestions."""

from __future__ import annotations

from pipeline.plan.ledger import GiB
from pipeline.plan.result import Plan, _as_cli
from pipeline.plan.trace import ACTIVATION_METHOD


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def format_plan(plan: Plan) -> str:
    """A human-readable report: per stage, every item by tier with its phases, peaks, FLOPs and the verdict.

    Args:
        plan: a plan from :func:`plan_recipe`.

    Returns:
        The report, several lines.
    """
    c = plan.cluster
    host = "unchecked" if c.host_mem_gib is None else f"{c.host_mem_gib:g} GiB"
    lines = [
        f"recipe {plan.recipe}{'' if c.name is None else f' on cluster {c.name}'}: {c.workers} worker(s), "
        + (f"{c.gpu_mem_gib:g} GiB GPU each" if c.use_gpu else "CPU training")
        + f", host memory per worker {host}",
        f"activations: {ACTIVATION_METHOD}",
    ]
    for s in plan.stages:
        lines.append("")
        lines.append(
            f"stage {s.stage} ({s.kind}): {s.model} {s.stats.params / 1e6:.1f}M params, {s.image_size}px, "
            f"micro-batch {s.micro_batch} x accum {s.grad_accum} x {s.workers} workers = {s.global_batch}, "
            f"ZeRO-{s.zero_stage} {s.precision}"
        )
        for tier in ("gpu", "host", "nvme"):
            items = s.tier_items(tier)
            if not items:
                continue
            peak, phase = s.peak(tier)
            budget = s.gpu_budget_bytes if tier == "gpu" else s.host_budget_bytes if tier == "host" else None
            lines.append(
                f"  {tier}: peak {_gib(peak)} GiB ({phase}); "
                f"required {_gib(s.required_bytes(tier))} GiB of {_gib(budget)}"
            )
            for i in items:
                lines.append(f"    {_gib(i.bytes):>9} GiB  {'/'.join(i.phases):<22} {i.name}")
        if s.deepspeed_estimate and s.deepspeed_estimate.get("gpu_bytes") is not None:
            lines.append(
                f"  DeepSpeed's estimate of model states (16-bit weights assumed): "
                f"{_gib(s.deepspeed_estimate['gpu_bytes'])} GiB per GPU; ours (fp32 weights): "
                f"{_gib(s.model_state_bytes)} GiB"
            )
        lines.append(
            f"  FLOPs per micro-batch: forward {s.trace.forward_flops / 1e12:.2f} T, step {s.step_flops / 1e12:.2f} T"
            f" ({'4x forward' if s.trace.train else 'forward'})"
        )
        for note in s.notes:
            lines.append(f"  note: {note}")
        if s.fits:
            lines.append("  -> fits")
        else:
            lines.append(f"  -> DOES NOT FIT: {'; '.join(s.problems)}")
            for sug in s.suggestions:
                mark = "fits" if sug["fits"] else "still too big"
                lines.append(f"     try {_as_cli(sug)}  ({sug['why']}; {mark})")
    lines.append("")
    lines.append("verdict: " + ("fits" if plan.fits else "does not fit"))
    return "\n".join(lines)
