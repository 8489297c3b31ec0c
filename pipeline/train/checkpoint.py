"""Saving and restoring everything a training stage needs to resume, and exporting weights for the next stage.

A checkpoint directory (each rank writes its part into a local folder; ``ray.train.report`` merges the ranks'
folders into one checkpoint in ``storage_path`` — a crash mid-save leaves the previous complete checkpoint the
latest one):

    deepspeed/step/...        DeepSpeed engine state: each rank's ZeRO shard, optimizer state, LR state
    trainer_state.json        step, epoch, world size, ZeRO stage, the data stream's position (rank 0)
    rng_rank{r}.pt            each rank's RNG states
    ema.safetensors           full EMA weights (rank 0; gathered across ranks under ZeRO-3)
    export/model.safetensors  consolidated weights, loadable by ``revcol.create_model`` without DeepSpeed
    export/ema.safetensors    consolidated EMA weights (when EMA is on)

Resuming on a different number of workers loads the consolidated weights (and EMA) into the new engine and
starts the optimizer state afresh (ZeRO shards of the optimizer are tied to the world size); the trainer logs
that it did so.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.train.ema import ShardedEma

__all__ = ["TrainerState", "consolidated_state_dict", "load_checkpoint", "save_checkpoint"]

logger = logging.getLogger(__name__)

DS_TAG = "step"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Counters and positions saved with every checkpoint."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    """Current epoch (0-based)."""
    samples: int = 0
    """Training samples consumed (global)."""
    world_size: int = 1
    zero_stage: int = 0
    best_top1: float | None = None
    """Highest ``val/top1`` of a checkpoint so far (that checkpoint is kept as the run's ``best_step<N>``)."""
    stream: dict[str, Any] = field(default_factory=dict)
    """The data stream's resumable position."""


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor] | None:
    """The model's full weights (without the ``model.`` prefix of the training objective), on rank 0; a
    collective under ZeRO-3 (call on every rank); None on other ranks."""
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()  # gathers to rank 0; fp32 weights stay fp32
    else:
        full = engine.module.state_dict() if engine.global_rank == 0 else None
    if full is None:
        return None
    return {k.removeprefix("model."): v.detach().cpu().contiguous() for k, v in full.items() if k.startswith("model.")}


def save_checkpoint(engine: Any, folder: Path, state: TrainerState, *, ema: ShardedEma | None, export: bool) -> None:
    """Writes this rank's part of a checkpoint into ``folder`` (collective: call on every rank)."""
    rank = engine.global_rank
    folder.mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(folder / "deepspeed"), tag=DS_TAG, save_latest=False)
    torch.save(_rng_state(), folder / f"rng_rank{rank}.pt")
    ema_full = ema.full_state_dict() if ema is not None else None
    weights = consolidated_state_dict(engine) if export else None
    if rank != 0:
        return
    (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
    if ema_full is not None:
        save_file(ema_full, folder / "ema.safetensors")
    if weights is not None:
        (folder / "export").mkdir(exist_ok=True)
        save_file(weights, folder / "export" / "model.safetensors")
        if ema_full is not None:
            save_file(ema_full, folder / "export" / "ema.safetensors")


def load_checkpoint(engine: Any, folder: Path, *, ema: ShardedEma | None) -> TrainerState:
    """Restores engine, EMA, counters and (same world size) RNG states from a checkpoint folder."""
    state = TrainerState(**json.loads((folder / STATE_FILE).read_text()))
    world = engine.world_size
    if state.world_size == world:
        engine.load_checkpoint(str(folder / "deepspeed"), tag=DS_TAG)
        rng = folder / f"rng_rank{engine.global_rank}.pt"
        if rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))  # numpy/python RNG states are not plain tensors
    else:
        logger.warning(
            "checkpoint was written by %d workers, resuming on %d: loading consolidated weights, "
            "optimizer state starts afresh", state.world_size, world,
        )
        _load_weights_resharded(engine, folder)
    if ema is not None and (folder / "ema.safetensors").exists():
        ema.load_full_state_dict(load_file(folder / "ema.safetensors"))
    state.world_size = world
    return state


def _load_weights_resharded(engine: Any, folder: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if state_zero_stage(folder) == 0 and (folder / "export" / "model.safetensors").exists():
        weights = {f"model.{k}": v for k, v in load_file(folder / "export" / "model.safetensors").items()}
    else:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(folder / "deepspeed"), tag=DS_TAG)
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        params = dict(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            if engine.global_rank == 0:
                engine.module.load_state_dict(weights, strict=True)
    else:
        engine.module.load_state_dict(weights, strict=True)
    # the optimizer's fp32 master copies must follow the loaded weights
    if hasattr(engine.optimizer, "refresh_fp32_params"):
        engine.optimizer.refresh_fp32_params()
    elif hasattr(engine.optimizer, "_restore_from_bit16_weights"):
        engine.optimizer._restore_from_bit16_weights()


def state_zero_stage(folder: Path) -> int:
    return int(json.loads((folder / STATE_FILE).read_text()).get("zero_stage", 0))
