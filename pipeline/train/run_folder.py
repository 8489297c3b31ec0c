"""A stage's run folder in ``storage_path``: its name, the small files kept there, and the checkpoints Ray Train
rotates in it (the latest complete one to resume from; the best one kept beside them).

Used by the driver (``launch``, ``stages``) and the workers (``loop``) alike; everything goes through
:mod:`pipeline.storage`, so a local folder and ``s3://`` behave the same.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from pipeline import storage
from pipeline.config import Recipe, S3Config, StageConfig

__all__ = [
    "BEST_PREFIX", "fetch_checkpoint", "is_complete", "keep_best", "latest_checkpoint", "rank_files_name", "read_file",
    "remove_checkpoint", "remove_incomplete_after", "resume_checkpoint", "run_name", "run_url", "write_file",
]

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
"""A checkpoint's counters, world size and stream position (written by rank 0)."""
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


def rank_files_name(rank: int) -> str:
    """The file in which ``rank`` lists the files it wrote into a checkpoint (name → size), written last."""
    return f"files_rank{rank}.json"


def is_complete(checkpoint: str, *, s3: S3Config | None = None) -> bool:
    """Whether every rank's part of the checkpoint at ``checkpoint`` is in storage: the trainer state, and each file
    every rank listed at its size (earlier versions' checkpoints, without the lists: each rank's RNG file)."""
    sizes = storage.file_sizes(checkpoint, s3=s3)
    if STATE_FILE not in sizes:
        return False
    state = json.loads(storage.read_bytes(storage.join(checkpoint, STATE_FILE), s3=s3))
    for rank in range(state["world_size"]):
        if not state.get("rank_files"):
            if f"rng_rank{rank}.pt" not in sizes:
                return False
            continue
        if rank_files_name(rank) not in sizes:
            return False
        listed = json.loads(storage.read_bytes(storage.join(checkpoint, rank_files_name(rank)), s3=s3))
        if any(sizes.get(name) != size for name, size in listed.items()):
            return False
    return True


def _checkpoint_names(recipe: Recipe, stage: StageConfig) -> list[str]:
    """The ``checkpoint_*`` folders of the stage's run folder, newest first (Ray Train names them by time)."""
    try:
        entries = storage.list_dir(run_url(recipe, stage), s3=recipe.s3)
    except OSError:
        return []
    return sorted((e.name for e in entries if e.is_dir and e.name.startswith("checkpoint_")), reverse=True)


def latest_checkpoint(recipe: Recipe, stage: StageConfig) -> str | None:
    """The URL of the newest complete checkpoint (:func:`is_complete`) in the stage's run folder; None if there is
    none."""
    for name in _checkpoint_names(recipe, stage):
        checkpoint = run_url(recipe, stage, name)
        if is_complete(checkpoint, s3=recipe.s3):
            return checkpoint
    return None


def resume_checkpoint(recipe: Recipe, stage: StageConfig, registered: str | None) -> str | None:
    """The checkpoint a (re)starting worker group resumes from: the newest complete one in the run folder, or
    ``registered`` (the one Ray Train hands over) when none is newer; None when there is none.

    Ray Train registers a checkpoint some time after every rank has uploaded its part, while training goes on; a
    node lost in between takes the registration with it, and Ray hands over the checkpoint before. Resuming from
    that one would train a whole interval again, and more.
    """
    found = latest_checkpoint(recipe, stage)
    if found is None or (registered is not None and storage.parent(found)[1] <= storage.parent(registered)[1]):
        return registered
    if registered is not None:
        logger.info("resuming from %s: complete in storage, newer than the checkpoint Ray Train registered (%s)",
                    found, registered)
    else:
        logger.info("resuming from %s (found in storage)", found)
    return found


def remove_incomplete_after(recipe: Recipe, stage: StageConfig, resume_from: str | None) -> list[str]:
    """Removes the checkpoint folders newer than ``resume_from`` (all of them when None): at a (re)start they are
    the incomplete parts a lost attempt left, which Ray Train never registered and so would never rotate away.
    Call before the new attempt writes any. Returns the URLs removed."""
    after = storage.parent(resume_from)[1] if resume_from is not None else ""
    newer = [run_url(recipe, stage, name) for name in _checkpoint_names(recipe, stage) if name > after]
    why = "an incomplete checkpoint of an earlier attempt"
    return [url for url in newer if remove_checkpoint(url, s3=recipe.s3, why=why)]


def remove_checkpoint(url: str, *, s3: S3Config | None, why: str) -> bool:
    """Removes a checkpoint folder Ray Train does not rotate (``why`` says which, in the log); a storage error is
    logged, not raised: only storage is lost, not the run. Returns whether it was removed."""
    try:
        storage.remove_tree(url, s3=s3)
    except OSError as err:
        logger.warning("could not remove %s (%s): %s", url, why, err)
        return False
    logger.info("removed %s: %s", url, why)
    return True


_RANK_FILE = re.compile(r"(?:^|/)(?:rng_rank|files_rank|(?:bf16_)?zero_pp_rank_)(\d+)[._]")
"""A file of one rank's own (``rng_rank3.pt``, ``files_rank3.json``,
``deepspeed/step/zero_pp_rank_3_mp_rank_00_optim_states.pt``)."""


def fetch_checkpoint(url: str, into: Path, *, rank: int, world_size: int, s3: S3Config | None) -> Path:
    """A folder holding what ``rank`` reads to resume from the checkpoint at ``url`` (layout in
    :mod:`pipeline.train.checkpoint`): ``url`` itself when local; from S3, a copy in ``into`` of only those files.

    On the world size that wrote it, a rank reads its own ZeRO shard(s) and RNG states and the common files
    (trainer state, EMA, ZeRO-1/2's module states), not the other ranks' shards nor the exported weights; on
    another world size it reads the consolidated weights instead (the export, else every shard for DeepSpeed to
    consolidate). For RevCol-H under ZeRO-3 on 64 ranks that is 1/64 of the optimizer state per rank, not all of it.
    """
    if not storage.is_s3_url(url):
        return Path(url)
    saved = json.loads(storage.read_bytes(storage.join(url, STATE_FILE), s3=s3))
    top = {e.name for e in storage.list_dir(url, s3=s3)}
    has_export = storage.exists(storage.join(url, "export", "model.safetensors"), s3=s3)
    resume_state = saved["world_size"] == world_size and "deepspeed" in top

    def needed(name: str) -> bool:
        if name in (STATE_FILE, "ema.safetensors"):
            return True
        if resume_state:
            own = _RANK_FILE.search(name)
            return not name.startswith("export/") and (own is None or int(own.group(1)) == rank)
        if has_export:
            return name == "export/model.safetensors"
        return name.startswith("deepspeed/")

    copied = storage.copy_tree(url, into, s3=s3, include=needed)
    logger.info("rank %d: fetched %d files of checkpoint %s (%s)", rank, len(copied), url,
                "its own shards and the common files" if resume_state else "the consolidated weights")
    return into


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
