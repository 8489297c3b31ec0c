"""Checkpoint retention on a real local run folder, without Ray: Ray Train rotates the ``checkpoint_*`` folders
(the last ``checkpoint.keep``), ``keep_best`` keeps the best one beside them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from pipeline.config import parse_recipe
from pipeline.services import free_port
from pipeline import storage
from pipeline.train.run_folder import keep_best, latest_checkpoint, run_name


@pytest.fixture
def one_rank():
    """A gloo process group of one rank (``keep_best`` is a collective)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _checkpoint(folder: Path, step: int) -> Path:
    """A complete one-rank checkpoint folder, as ``save_checkpoint`` lays it out."""
    (folder / "deepspeed" / "step").mkdir(parents=True)
    (folder / "deepspeed" / "step" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (folder / "rng_rank0.pt").write_bytes(b"rng")
    (folder / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    return folder


def _run_folder(tmp_path: Path) -> tuple[object, Path]:
    recipe = parse_recipe({"name": "keep", "storage_path": str(tmp_path / "runs"),
                           "stages": [{"kind": "pretrain", "data": {"train": "unused"}}]})
    return recipe, tmp_path / "runs" / run_name(recipe, recipe.stages[0])


def test_keep_best_replaces_the_earlier_best_and_leaves_the_rotated_checkpoints(tmp_path, one_rank):
    recipe, run = _run_folder(tmp_path)
    rotated = [_checkpoint(run / f"checkpoint_2030-01-01_00-00-{s:02d}.000000", s) for s in (15, 20)]
    _checkpoint(run / "best_step000000005", 5)

    best = keep_best(_checkpoint(tmp_path / "local", 20), recipe, recipe.stages[0], step=20)

    assert sorted(p.name for p in run.iterdir()) == ["best_step000000020", *(p.name for p in rotated)]
    assert json.loads((Path(best) / "trainer_state.json").read_text())["step"] == 20
    assert (Path(best) / "deepspeed" / "step" / "mp_rank_00_model_states.pt").read_bytes() == b"weights"
    assert latest_checkpoint(recipe, recipe.stages[0]) == str(rotated[-1])  # resume: latest


def test_a_failed_copy_keeps_the_earlier_best(tmp_path, one_rank, monkeypatch):
    recipe, run = _run_folder(tmp_path)
    earlier = _checkpoint(run / "best_step000000005", 5)

    def storage_fails(*args, **kwargs):
        raise OSError("storage went away mid-copy")

    monkeypatch.setattr(storage, "put_file", storage_fails)
    with pytest.raises(OSError):
        keep_best(_checkpoint(tmp_path / "local", 20), recipe, recipe.stages[0], step=20)
    assert sorted(p.name for p in earlier.rglob("*") if p.is_file()) == [
        "mp_rank_00_model_states.pt", "rng_rank0.pt", "trainer_state.json"]


def test_rng_states_round_trip_through_the_safe_unpickler(tmp_path: Path) -> None:
    """A rank's RNG states are saved as tensors and plain values: ``torch.load(weights_only=True)`` reads them, and
    restoring them repeats the draws (torch, numpy, Python) that followed the save."""
    import random

    import numpy as np
    import torch

    from pipeline.train.checkpoint import _rng_state, _set_rng_state

    torch.save(_rng_state(), tmp_path / "rng_rank0.pt")
    draws = (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)])
    _set_rng_state(torch.load(tmp_path / "rng_rank0.pt", weights_only=True))
    assert (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]) == draws
