"""Checkpoints without Ray: retention on a real local run folder (Ray Train rotates the ``checkpoint_*`` folders,
the last ``checkpoint.keep``; ``keep_best`` keeps the best one beside them), completeness, and reading a real
DeepSpeed engine's checkpoint back weights-only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.distributed as dist

from pipeline.config import parse_recipe
from pipeline.services import free_port
from pipeline import storage
from pipeline.train.run_folder import (
    is_complete, keep_best, latest_checkpoint, rank_files_name, remove_incomplete_after, resume_checkpoint, run_name,
)


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


def _listed_checkpoint(folder: Path, step: int, *, world_size: int = 2) -> Path:
    """A checkpoint of ``world_size`` ranks whose every rank listed its files (``save_checkpoint``'s layout)."""
    state = {"step": step, "world_size": world_size, "rank_files": True}
    for rank in range(world_size):
        part = {f"deepspeed/step/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt": b"shard" * (rank + 1),
                f"rng_rank{rank}.pt": b"rng"}
        if rank == 0:
            part["trainer_state.json"] = json.dumps(state).encode()
        for name, data in part.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
        (folder / rank_files_name(rank)).write_text(json.dumps({n: len(d) for n, d in part.items()}))
    return folder


def test_a_checkpoint_is_complete_when_every_listed_file_is_there_at_its_size(tmp_path):
    """Ray Train uploads a rank's files in no fixed order: a node lost mid-upload can leave the trainer state and
    the RNG files in storage without a ZeRO shard. Only every rank's list, each file at its size, makes it whole."""
    folder = str(_listed_checkpoint(tmp_path / "ckpt", 10))
    assert is_complete(folder)
    shard = tmp_path / "ckpt" / "deepspeed" / "step" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"sha")  # a file still being written
    assert not is_complete(folder)
    shard.unlink()  # not uploaded yet, though its rank's RNG file is
    assert not is_complete(folder)
    _listed_checkpoint(tmp_path / "ckpt2", 10)
    (tmp_path / "ckpt2" / rank_files_name(1)).unlink()  # rank 1's list is the last of its files to arrive
    assert not is_complete(str(tmp_path / "ckpt2"))
    # an earlier version's checkpoint (no lists): each rank's RNG file marks it complete
    assert is_complete(str(_checkpoint(tmp_path / "old", 5)))
    (tmp_path / "old" / "rng_rank0.pt").unlink()
    assert not is_complete(str(tmp_path / "old"))


def test_resume_takes_a_complete_checkpoint_newer_than_the_registered_one(tmp_path, s3_bucket, s3_env):
    """A node lost between the upload of a checkpoint and its registration by Ray Train: the restarted group
    resumes from that newer, complete checkpoint, not from the registered one an interval earlier; an incomplete
    newer one is passed over, then removed. The same on S3."""
    recipe, run = _run_folder(tmp_path)
    stage = recipe.stages[0]
    older = str(_listed_checkpoint(run / "checkpoint_2030-01-01_00-00-10.000000", 10))
    newer = str(_listed_checkpoint(run / "checkpoint_2030-01-01_00-00-20.000000", 20))
    assert resume_checkpoint(recipe, stage, older) == newer
    assert resume_checkpoint(recipe, stage, newer) == newer
    assert resume_checkpoint(recipe, stage, None) == newer  # nothing registered yet: found in storage
    partial = _listed_checkpoint(run / "checkpoint_2030-01-01_00-00-30.000000", 30)
    (partial / "rng_rank1.pt").unlink()
    assert resume_checkpoint(recipe, stage, older) == newer
    # the incomplete one is a lost attempt's: Ray never registered it and would never rotate it away
    assert remove_incomplete_after(recipe, stage, newer) == [str(partial)]
    assert sorted(p.name for p in run.iterdir()) == [Path(older).name, Path(newer).name]
    empty, _ = _run_folder(tmp_path / "empty")
    assert resume_checkpoint(empty, empty.stages[0], None) is None

    on_s3 = recipe.model_copy(update={"storage_path": f"s3://{s3_bucket}/runs"})
    partial = _listed_checkpoint(tmp_path / "checkpoint_2030-01-01_00-00-30.000000", 30)
    (partial / "rng_rank1.pt").unlink()
    for folder in (older, newer, str(partial)):
        storage.copy_tree(folder, storage.join(on_s3.storage_path, run.name, Path(folder).name))
    s3_older, s3_newer, s3_partial = (storage.join(on_s3.storage_path, run.name, Path(f).name)
                                      for f in (older, newer, partial))
    assert resume_checkpoint(on_s3, stage, s3_older) == s3_newer
    assert remove_incomplete_after(on_s3, stage, s3_newer) == [s3_partial]
    assert not storage.exists(storage.join(s3_partial, "trainer_state.json"))


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


class _Planted:
    """Unpickled with the full unpickler, opens (creates) the file it names: what a planted checkpoint file could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _save_and_resume(rank: int, port: int, folder: str) -> None:
    """One gloo rank: a ZeRO-2 engine trains a step and saves a checkpoint; the checkpoint resumes, then resumes
    again with its optimizer-state file replaced by one that would create ``planted`` when unpickled."""
    import os
    import pickle

    import deepspeed
    import torch

    import revcol
    from pipeline.config import DeepSpeedConfig, OptimConfig, RegularizeConfig
    from pipeline.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint
    from pipeline.train.engine import Objective, build_engine, deepspeed_config
    from pipeline.train.optim import build_optimizer, param_groups

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    model = revcol.create_model("revcol_test", num_classes=10)
    optim = OptimConfig(base_lr=1e-3)
    config = deepspeed_config(DeepSpeedConfig(zero_stage=2), micro_batch=2)
    objective = Objective(model, RegularizeConfig(), mean=(0.5,) * 3, std=(0.5,) * 3)
    engine = build_engine(objective, build_optimizer(param_groups(model, optim), optim, lr=1e-3), config)
    loss, _ = engine(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))
    engine.backward(loss)
    engine.step()
    checkpoint = Path(folder) / "checkpoint"
    save_checkpoint(engine, checkpoint, TrainerState(step=1), ema=None, export=False, optimizer_state=True)
    result = {"resumed_step": load_checkpoint(engine, checkpoint, ema=None).step}

    (optim_file,) = (checkpoint / "deepspeed").rglob("*optim_states.pt")
    planted = Path(folder) / "planted"
    torch.save({"optimizer_state_dict": _Planted(str(planted))}, optim_file)
    try:
        load_checkpoint(engine, checkpoint, ema=None)
        result["refused"] = ""
    except pickle.UnpicklingError as err:
        result["refused"] = str(err)
    result["planted"] = planted.exists()
    result["forced_after"] = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    (Path(folder) / "result.json").write_text(json.dumps(result))
    engine.destroy()
    deepspeed.comm.destroy_process_group()


def test_resume_reads_deepspeed_files_weights_only(tmp_path: Path) -> None:
    """DeepSpeed reads its own checkpoint files with the full unpickler; a resume reads them weights-only (with
    DeepSpeed's three pickled classes allowed), so a planted file is refused before it runs anything."""
    import torch.multiprocessing as mp

    mp.spawn(_save_and_resume, args=(free_port(), str(tmp_path)), nprocs=1, join=True)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["resumed_step"] == 1
    assert "refusing to unpickle step/zero_pp_rank_0_mp_rank_00_optim_states.pt (io.open)" in result["refused"], result
    assert result["planted"] is False
    assert result["forced_after"] is None  # the switch is process-wide: it is off again after the load
