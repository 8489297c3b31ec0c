"""A stage's run folder in ``storage_path``: its name, the small files kept there, and the checkpoints Ray Train
rotates in it (the latest complete one to resume from; the best one kept beside them).

Used by the driver (``launch``, ``stages``) and the workers (``loop``) alike; everything goes through
:mod:`pipeline.storage`, so a local folder and ``s3://`` behave the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline import storage
from pipeline.config import Recipe, StageConfig

__all__ = ["BEST_PREFIX", "keep_best", "latest_checkpoint", "read_file", "run_name", "run_url", "write_file"]

logger = logging.getLogger(__name__)

BEST_PREFIX = "best_step"
"""Folder name prefix of the best checkpoint (``best_step000000120``)."""


def run_name(recipe: Recipe, stage: StageConfig) -> str:
    """The Ray Train run (and storage folder) of a stage: the same name resumes the same run."""
    return f"{recipe.name}-{stage.name}"


def run_url(recipe: Recipe, stage: StageConfig, *names: str) -> str:
    """The stage's run folder (or a file in it): a local path made absolute, or an ``s3://`` URL."""
    base = recipe.storage_path
    if not storage.is_s3_url(base):
        base = str(Path(base).expanduser().resolve())
    return storage.join(base, run_name(recipe, stage), *names)


def write_file(recipe: Recipe, stage: StageConfig, name: str, data: bytes) -> str:
    """Writes a small file into the stage's run folder; returns its URI."""
    url = run_url(recipe, stage, name)
    storage.write_bytes(url, data, s3=recipe.s3)
    return url


def read_file(recipe: Recipe, stage: StageConfig, name: str) -> bytes | None:
    """Reads a file of the stage's run folder; None when it does not exist."""
    try:
        return storage.read_bytes(run_url(recipe, stage, name), s3=recipe.s3)
    except FileNotFoundError:
        return None


def latest_checkpoint(recipe: Recipe, stage: StageConfig, *, into: Path) -> Path | None:
    """The newest complete checkpoint in the stage's run folder, copied to ``into`` when remote; None if none.

    Ray Train hands a restarted worker group the last checkpoint its controller registered; a worker killed right
    after reporting can take that registration with it. Complete means the trainer state and every rank's RNG
    file are there (each rank writes its RNG file after its DeepSpeed shard).
    """
    folder = run_url(recipe, stage)
    try:
        entries = storage.list_dir(folder, s3=recipe.s3)
    except OSError:
        return None
    for entry in sorted((e for e in entries if e.is_dir and e.name.startswith("checkpoint_")), key=lambda e: e.name,
                        reverse=True):
        checkpoint = storage.join(folder, entry.name)
        names = {e.name for e in storage.list_dir(checkpoint, s3=recipe.s3)}
        if "trainer_state.json" not in names:
            continue
        world = json.loads(storage.read_bytes(storage.join(checkpoint, "trainer_state.json"), s3=recipe.s3))
        if all(f"rng_rank{r}.pt" in names for r in range(world["world_size"])):
            if not storage.is_s3_url(checkpoint):
                return Path(checkpoint)
            storage.copy_tree(checkpoint, into, s3=recipe.s3)
            return into
    return None


def keep_best(local: Path, recipe: Recipe, stage: StageConfig, *, step: int) -> str:
    """Keeps this rank's part of the checkpoint just reported (the local folder ``local``) as the run's best:
    copies it to ``best_step<step>`` in the run folder and, once every rank has, deletes the earlier best.
    Collective: call on every rank. Returns the new best's URI.

    Ray Train rotates the ``checkpoint_*`` folders (the last ``checkpoint.keep``); the best lives beside them
    because Ray cannot keep "last k plus best" itself, and deleting folders it lists would make it refuse to
    resume the run (its run snapshot must find every checkpoint it names). Until the new best is complete the
    old one stays, so a crash here leaves a complete best, and the ``checkpoint_*`` folders are never touched.
    """
    import torch.distributed as dist

    name = f"{BEST_PREFIX}{step:09d}"
    best = run_url(recipe, stage, name)
    storage.copy_tree(local, best, s3=recipe.s3)
    dist.barrier()  # every rank's part is stored before the previous best goes
    if dist.get_rank() == 0:
        for entry in storage.list_dir(run_url(recipe, stage), s3=recipe.s3):
            if entry.is_dir and entry.name.startswith(BEST_PREFIX) and entry.name != name:
                storage.remove_tree(run_url(recipe, stage, entry.name), s3=recipe.s3)
    return best
