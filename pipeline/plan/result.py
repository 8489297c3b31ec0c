"""What a plan is: :class:`StagePlan` (one stage's ledger, its peaks and required bytes per tier, FLOPs, problems
and suggestions) and :class:`Plan` (every planned stage, the verdict, the refusal text), both with their JSON."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pipeline.plan.clusters import ClusterShape
from pipeline.plan.ledger import PHASES, MemoryItem
from pipeline.plan.stats import ModelStats
from pipeline.plan.trace import ACTIVATION_METHOD, ActivationTrace


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
        """FLOPs of one micro-batch step on one worker: for training ≈ (3 + the recomputed share of the columns)×
        forward (3.75× for RevCol-T's 4 columns on the default path, 4× on the reference path), 1× for eval."""
        return self.trace.step_flops

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
                "name": c.name,
                "workers": c.workers,
                "use_gpu": c.use_gpu,
                "gpu_mem_gib": c.gpu_mem_gib,
                "host_mem_gib": c.host_mem_gib,
                "cpus_per_worker": c.cpus_per_worker,
                "gpus_per_node": c.gpus_per_node,
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
