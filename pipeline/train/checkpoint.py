"""Saving and restoring everything a training stage needs to resume, and exporting weights for the next stage.

A checkpoint directory (each rank writes its part into a local folder; ``ray.train.report`` merges the ranks'
folders into one checkpoint in ``storage_path`` — a crash mid-save leaves the previous complete checkpoint the
latest one):

    deepspeed/step/...        DeepSpeed engine state: each rank's ZeRO shard, optimizer state, LR state
    trainer_state.json        step, epoch, world size, ZeRO stage, the data stream's position (rank 0)
    rng_rank{r}.pt            each rank's RNG states
    files_rank{r}.json        the files rank r wrote, with their sizes (written last: the completeness mark)
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
import os
import pickle
import random
import struct
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.train.ema import ShardedEma
from pipeline.train.deepspeed_fixes import refresh_master_weights
from pipeline.train.engine import load_weights, zero3_gathered
from pipeline.train.run_folder import STATE_FILE, rank_files_name

__all__ = ["TrainerState", "export_weights", "load_checkpoint", "save_checkpoint", "weights_only_loads"]

logger = logging.getLogger(__name__)

DS_TAG = "step"


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
    source_samples: dict[str, int] = field(default_factory=dict)
    """A mixture's training samples per source (global), as ``train/samples`` counts them."""
    rank_files: bool = False
    """Every rank listed its files (``files_rank{r}.json``, written last): the checkpoint is complete once each
    listed file is in storage. False in checkpoints of earlier versions, which only the RNG files mark complete."""


def _rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain Python values only, so that ``torch.load(weights_only=True)``
    reads them back (numpy's key array pickled as an ndarray would need the unsafe unpickler)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                       int(has_gauss), float(gauss)], "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def export_weights(engine: Any, path: Path, *, metadata: dict[str, str] | None = None) -> None:
    """The model's full weights (without the training objective's ``model.`` prefix) as safetensors at ``path``,
    written by rank 0, with ``metadata`` in its header; a collective under ZeRO-3 (call on every rank).

    Under ZeRO-3 the file is written one parameter at a time, each gathered only while its bytes are written:
    safetensors' layout (a JSON header of names, shapes and byte ranges, then the raw tensors) is known from
    the partitioned parameters' shapes before any is gathered, so no process ever holds the whole model.
    """
    tensors = [(k.removeprefix("model."), t) for k, t in _named_tensors(engine.module) if k.startswith("model.")]
    rank = engine.global_rank
    if engine.zero_optimization_stage() != 3:
        if rank == 0:
            save_file({name: t.detach().cpu().contiguous() for name, t in tensors}, path, metadata=metadata)
        return
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors:
        size = _numel(t) * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(_shape(t)), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") if rank == 0 else nullcontext() as out:
        if out is not None:
            out.write(struct.pack("<Q", len(blob)) + blob)
        for _, t in tensors:
            with zero3_gathered([t]) if hasattr(t, "ds_id") else nullcontext():
                if out is not None:
                    out.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(getattr(t, "ds_shape", t.shape))  # a ZeRO-3 partitioned parameter's data is flat


def _numel(t: torch.Tensor) -> int:
    return getattr(t, "ds_numel", t.numel())


def save_checkpoint(
    engine: Any, folder: Path, state: TrainerState, *, ema: ShardedEma | None, export: bool, optimizer_state: bool = True,
    export_metadata: dict[str, str] | None = None,
) -> None:
    """Writes this rank's part of a checkpoint into ``folder`` (collective: call on every rank). Without
    ``optimizer_state`` the checkpoint holds the consolidated weights instead of DeepSpeed's state.
    ``export_metadata`` goes into the exported files' headers (the model they hold, for ``revcol eval``)."""
    rank = engine.global_rank
    folder.mkdir(parents=True, exist_ok=True)
    if optimizer_state:
        engine.save_checkpoint(str(folder / "deepspeed"), tag=DS_TAG, save_latest=False)
    torch.save(_rng_state(), folder / f"rng_rank{rank}.pt")
    ema_full = ema.full_state_dict() if ema is not None else None
    if export or not optimizer_state:
        (folder / "export").mkdir(exist_ok=True)
        export_weights(engine, folder / "export" / "model.safetensors", metadata=export_metadata)
    if rank == 0:
        state.rank_files = True
        (folder / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
        if ema_full is not None:
            save_file(ema_full, folder / "ema.safetensors")
            if export:
                save_file(ema_full, folder / "export" / "ema.safetensors", metadata=export_metadata)
    # Last: Ray Train uploads the folder's files in no fixed order, so this list, not any one file, tells whether
    # the rank's part of the checkpoint is all in storage (a node lost mid-upload leaves it incomplete).
    files = {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    (folder / rank_files_name(rank)).write_text(json.dumps(files, indent=0, sort_keys=True))


def load_checkpoint(engine: Any, folder: Path, *, ema: ShardedEma | None) -> TrainerState:
    """Restores engine, EMA, counters and (same world size) RNG states from a checkpoint folder."""
    state = TrainerState(**json.loads((folder / STATE_FILE).read_text()))
    world = engine.world_size
    if state.world_size == world and (folder / "deepspeed").exists():
        with weights_only_loads(folder / "deepspeed"):
            engine.load_checkpoint(str(folder / "deepspeed"), tag=DS_TAG)
        rng = folder / f"rng_rank{engine.global_rank}.pt"
        if rng.exists():
            try:
                _set_rng_state(torch.load(rng, weights_only=True))
            except pickle.UnpicklingError:  # written before the RNG states were plain values: not unpickled unsafely
                logger.warning("checkpoint %s: %s holds pickled numpy arrays (an earlier version's format); this "
                               "rank's RNG states start afresh instead", folder, rng.name)
    else:
        reason = (
            "holds weights only" if not (folder / "deepspeed").exists()
            else f"was written by {state.world_size} workers, resuming on {world}"
        )
        logger.warning("checkpoint %s: loading consolidated weights, optimizer state starts afresh", reason)
        _load_consolidated_weights(engine, folder)
    if ema is not None and (folder / "ema.safetensors").exists():
        ema.load_full_state_dict(load_file(folder / "ema.safetensors"))
    state.world_size = world
    return state


def _load_consolidated_weights(engine: Any, folder: Path) -> None:
    export = folder / "export" / "model.safetensors"
    if export.exists():
        weights = load_file(export)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with weights_only_loads(folder / "deepspeed"):
            full = get_fp32_state_dict_from_zero_checkpoint(str(folder / "deepspeed"), tag=DS_TAG)
        weights = {k.removeprefix("model."): v for k, v in full.items()}
    model = engine.module.model
    own = {name for name, _ in _named_tensors(model)}
    if own != set(weights):
        raise ValueError(f"checkpoint {folder} does not fit the model: missing {sorted(own - set(weights))[:10]}, "
                         f"unexpected {sorted(set(weights) - own)[:10]}")
    load_weights(model, weights)
    refresh_master_weights(engine)


@contextmanager
def weights_only_loads(folder: Path) -> Iterator[None]:
    """Makes every ``torch.load`` in its scope weights-only, DeepSpeed's own included, for the files of ``folder``.

    DeepSpeed 0.19.8 reads its checkpoint files with ``torch.load(weights_only=False)``: a file planted in the
    checkpoint storage (a shared bucket) would run code on every resuming worker. Its files hold tensors, plain
    values and three DeepSpeed classes (the loss scaler, the ZeRO stage enum and fragment addresses, for ZeRO
    1-3 in fp32, bf16 and fp16, optimizer offloaded or not), which are allowed; a file with anything else is
    refused with a ``pickle.UnpicklingError`` naming it and what it holds. torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``
    overrides the explicit ``weights_only=False``; it is process-wide, so it is set only for the load.
    """
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [LossScaler, ZeroStageEnum, fragment_address]
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as err:
        names = {f"{c.__module__}.{c.__qualname__}" for c in allowed}
        found = {str(f.relative_to(folder)): sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(f)) - names)
                 for f in sorted(folder.rglob("*.pt"))}
        named = "; ".join(f"{name} ({', '.join(objects)})" for name, objects in found.items() if objects)
        raise pickle.UnpicklingError(
            f"checkpoint {folder}: refusing to unpickle {named or 'a file'}: checkpoint files may hold tensors, plain "
            "values and DeepSpeed's loss scaler, ZeRO stage and fragment addresses only; anything else could run code "
            "when loaded. Resume from a checkpoint this pipeline wrote, or remove the file.") from err
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
