"""The Ray Train worker: ``train_func(config)`` runs one training stage on one rank.

Shape (Ray's own examples): typed config from the plain dict → dataset shard → model → DeepSpeed engine →
resume from ``ray.train.get_checkpoint()`` → step loop → ``ray.train.report(metrics, checkpoint=...)``.
Side work (logging, checkpoints, evaluation) runs on intervals, outside the step itself.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

import revcol
from pipeline import storage
from pipeline.audit import open_sample_log
from pipeline.config import Recipe, StageConfig
from pipeline.data.stream import StreamPosition, iter_train_batches, skipped_counts
from pipeline.data.transforms import mix_seed
from pipeline.train.checkpoint import TrainerState, load_checkpoint, save_checkpoint
from pipeline.train.ema import ShardedEma
from pipeline.train.engine import Objective, build_engine, build_model, deepspeed_config, largest_param
from pipeline.train.job import WorkerJob
from pipeline.train.optim import build_optimizer, build_scheduler, param_groups, scaled_lr
from pipeline.train.run_folder import (
    fetch_checkpoint, keep_best, remove_checkpoint, remove_incomplete_after, resume_checkpoint, write_file,
)
from pipeline.train.validate import evaluate_stream
from pipeline.train.weights import MODEL_METADATA_KEY

__all__ = ["StageJob", "train_func"]

logger = logging.getLogger(__name__)


@dataclass(kw_only=True)
class StageJob(WorkerJob):
    """Everything a training worker needs, as plain data (what Ray hands ``train_func``)."""

    num_classes: int
    train_samples: int
    run_id: str | None = None
    tracking_uri: str | None = None
    init_weights: str | None = None
    log_every: int = 10


def _tracker(job: StageJob, rank: int, fallback_dir: Path) -> Any:
    from pipeline.tracking import MLflowTracker, NullTracker

    if rank != 0 or not job.run_id or not job.tracking_uri:
        return NullTracker()
    return MLflowTracker(job.tracking_uri, job.run_id, fallback_dir=fallback_dir)


def _system_metrics(job: StageJob, recipe: Recipe, ctx: Any) -> Any:
    """MLflow's system-metrics sampler on one worker per node (local rank 0); on more than one node each names its
    node in the metric keys (``system/node1/cpu_utilization_percentage``)."""
    from pipeline.tracking import system_metrics_monitor

    if ctx.get_local_rank() != 0 or not job.tracking_uri:
        return None
    single_node = ctx.get_local_world_size() == ctx.get_world_size()
    return system_metrics_monitor(recipe.tracking.model_copy(update={"uri": job.tracking_uri}), job.run_id,
                                  node=None if single_node else f"node{ctx.get_node_rank()}")


def model_builder(job: StageJob, stage: StageConfig) -> Callable[[], revcol.RevCol]:
    mc = stage.model
    head_init_scale = mc.head_init_scale if not job.init_weights else None  # a loaded head is scaled on reset
    return functools.partial(
        revcol.create_model,
        mc.name,
        num_classes=job.num_classes,
        reversible=mc.reversible,
        keep_last_column=mc.fast_path,
        intersup=mc.intersup,
        drop_path_rate=mc.drop_path_rate,
        **({"head_init_scale": head_init_scale} if head_init_scale else {}),
        **mc.overrides,
    )


def _build(job: StageJob, recipe: Recipe, stage: StageConfig, ds_config: dict[str, Any]) -> revcol.RevCol:
    """The stage's model: partitioned from the start under ZeRO-3 (``build_model``), initialized from an earlier
    stage's weights when the stage has them."""
    model = build_model(model_builder(job, stage), ds_config)
    if job.init_weights:
        from pipeline.train.weights import load_init_weights

        load_init_weights(model, job.init_weights, head_init_scale=stage.model.head_init_scale, s3_cfg=recipe.s3)
    return model


def _mixup(stage: StageConfig, num_classes: int) -> Any:
    reg = stage.regularize
    if reg.mixup <= 0 and reg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=reg.mixup,
        cutmix_alpha=reg.cutmix,
        prob=reg.mixup_prob,
        switch_prob=reg.mixup_switch_prob,
        label_smoothing=reg.label_smoothing,
        num_classes=num_classes,
    )


def _evaluate(engine: Any, shard: Any, batch_size: int) -> dict[str, float]:
    """Validation of the engine's model over this rank's part of the validation stream (:func:`evaluate_stream`;
    every rank the same number of forwards, as ZeRO-3 gathers parameters collectively)."""
    from pipeline.data.stream import iter_eval_batches

    engine.eval()
    try:
        return evaluate_stream(
            lambda batch: engine(batch["image"], batch["label"].long().clamp_min(0))[1],
            iter_eval_batches(shard, batch_size=batch_size, device=engine.device),
            columns=len(engine.module.model.classifiers()), device=engine.device,
        )
    finally:
        engine.train()


def _merged_position(position: StreamPosition) -> dict[str, Any]:
    """The union of every rank's consumed samples (a collective: all ranks call it at the same step), merged into
    this rank's own position too: a rank sees only its rows of each shard, so on its own it would keep a bitmap for
    every shard it touched; with the union, shards every rank is done with shrink to ranges."""
    import torch.distributed as dist

    states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(states, position.state_dict())
    return position.merge(states).state_dict()


class _SourceSamples:
    """A mixture's training samples per source (``data/source/<name>/samples``): each rank counts the rows it
    trains on, and :meth:`sync` (a collective: every rank calls it at the same step) adds all ranks' counts to the
    trainer state, so that a resumed run continues them from its checkpoint as it does ``train/samples``."""

    def __init__(self, names: list[str], state: TrainerState, device: Any) -> None:
        self.names, self.state = names, state
        self.pending = torch.zeros(len(names), dtype=torch.int64, device=device)

    def add(self, sources: torch.Tensor) -> None:
        self.pending += torch.bincount(sources.to(self.pending.device), minlength=len(self.names))

    def sync(self) -> dict[str, float]:
        """Folds every rank's counts into the state; returns the metrics."""
        import torch.distributed as dist

        dist.all_reduce(self.pending)
        totals = self.state.source_samples
        for name, count in zip(self.names, self.pending.tolist(), strict=True):
            totals[name] = totals.get(name, 0) + int(count)
        self.pending.zero_()
        return {f"data/source/{name}/samples": float(totals[name]) for name in self.names}


def train_func(config: dict[str, Any]) -> None:
    """The per-worker training loop of one stage (Ray Train ``train_loop_per_worker``)."""
    import ray.train
    import torch.distributed as dist

    job = StageJob(**config)
    recipe, stage = job.resolved()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    micro, accum = stage.data.batch_size, stage.deepspeed.grad_accum
    _remove_offload_files(stage, rank)  # left by a crashed attempt: rebuilt from the model or checkpoint anyway
    nvme_params = stage.deepspeed.offload_param == "nvme"
    ds_config = deepspeed_config(
        stage.deepspeed, micro_batch=micro, largest_param=largest_param(model_builder(job, stage)) if nvme_params else 0
    )
    torch.manual_seed(stage.data.seed)  # identical initial weights on every rank

    model = _build(job, recipe, stage, ds_config)
    cfg = revcol.model_cfg(stage.model.name)
    objective = Objective(model, stage.regularize, mean=cfg["mean"], std=cfg["std"])
    global_batch = micro * world * accum
    lr_factor = global_batch / 1024
    optimizer = build_optimizer(
        param_groups(model, stage.optim), stage.optim, lr=scaled_lr(stage.optim.base_lr, global_batch),
        cpu_offload=stage.deepspeed.offload_optimizer != "none",
    )
    engine = build_engine(objective, optimizer, ds_config)
    _seed_rank(stage.data.seed, rank)  # the weights are built: from here on each rank draws its own randomness
    batches_per_epoch = job.train_samples // world // micro  # equal split, drop_last
    steps_per_epoch = max(1, batches_per_epoch // accum)
    ema = ShardedEma(model, stage.regularize.ema_decay) if stage.regularize.ema_decay else None
    mixup = _mixup(stage, job.num_classes)

    state = TrainerState(world_size=world, zero_stage=stage.deepspeed.zero_stage)
    position = StreamPosition()
    checkpoint = ray.train.get_checkpoint()  # the last one Ray Train registered; a newer one may be complete
    registered = None
    if checkpoint is not None:  # Ray Train's checkpoint lives in storage_path: bucket/prefix/... on S3
        registered = f"s3://{checkpoint.path}" if storage.is_s3_url(recipe.storage_path) else checkpoint.path
    choice = [None]
    if rank == 0:
        choice = [(resume_checkpoint(recipe, stage, registered), registered)]
        remove_incomplete_after(recipe, stage, choice[0][0])
    dist.broadcast_object_list(choice, src=0)  # every rank resumes from the same one
    resume_from, registered = choice[0]
    # a checkpoint other than the one Ray Train handed over (newer, or there was none) is one it never registered
    # (its run snapshot would have named it), so its rotation would never remove it
    unregistered = resume_from if resume_from is not None and resume_from != registered else None
    if resume_from is not None:
        resume_copy = Path(tempfile.mkdtemp(prefix="revcol-resume-"))  # this rank's files of a remote checkpoint
        try:
            folder = fetch_checkpoint(resume_from, resume_copy, rank=rank, world_size=world, s3=recipe.s3)
            state = load_checkpoint(engine, folder, ema=ema)
        finally:
            shutil.rmtree(resume_copy, ignore_errors=True)
        if state.stream:
            position = StreamPosition.from_state_dict(state.stream)
        logger.info("rank %d resumed at step %d (epoch %d, %d samples of it consumed)", rank, state.step,
                    state.epoch, position.num_consumed)
    # Progress is counted in samples, so that a run resumed on another number of workers continues its schedule at
    # the same point and ends after the same number of samples (to within the drop-last of an epoch's split).
    total_steps = state.step + math.ceil(
        max(0, math.ceil(stage.optim.epochs * steps_per_epoch) * global_batch - state.samples) / global_batch)
    if stage.optim.max_steps is not None:
        total_steps = min(total_steps, stage.optim.max_steps)
    scheduler = build_scheduler(
        optimizer, stage.optim, total_samples=state.samples + (total_steps - state.step) * global_batch,
        warmup_samples=round(stage.optim.warmup_epochs * steps_per_epoch * global_batch), lr_factor=lr_factor,
    )
    scheduler.step_update(state.samples)

    # made by the tracker only if MLflow is still unreachable at the end: a worker killed mid-run leaves no folder
    scratch = Path(tempfile.gettempdir()) / f"revcol-undelivered-{os.getpid()}-{time.time_ns()}"
    tracker = _tracker(job, rank, scratch)
    system_monitor = _system_metrics(job, recipe, ctx)
    names = [source.name for source in stage.data.sources]
    source_samples = _SourceSamples(names, state, engine.device) if names else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if stage.data.val is not None else None
    interval = stage.checkpoint.interval_steps
    proc = psutil.Process()
    export_metadata = {MODEL_METADATA_KEY: json.dumps({"name": stage.model.name, "overrides": stage.model.overrides})}

    def report(metrics: dict[str, float], *, export: bool = False) -> None:
        nonlocal unregistered
        state.stream = _merged_position(position)
        if source_samples is not None:
            source_samples.sync()
        state.epoch = position.epoch or 0
        top1 = metrics.get("val/top1")  # the same on every rank (all-reduced)
        new_best = top1 is not None and (state.best_top1 is None or top1 > state.best_top1)
        if new_best:
            state.best_top1 = top1
        with tempfile.TemporaryDirectory(prefix="revcol-ckpt-") as tmp:
            save_checkpoint(engine, Path(tmp), state, ema=ema, export=export,
                            optimizer_state=stage.checkpoint.optimizer_state, export_metadata=export_metadata)
            ray.train.report(
                {**metrics, "step": state.step, "epoch": state.epoch},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )
            if new_best:
                keep_best(Path(tmp), recipe, stage, step=state.step)
        if unregistered is not None:  # once every rank's part of a newer one is stored, it goes, as Ray would rotate it
            dist.barrier()
            if rank == 0:
                why = "resumed from, never registered by Ray Train, superseded"
                remove_checkpoint(unregistered, s3=recipe.s3, why=why)
            unregistered = None

    trace = None if stage.data.trace_dir is None else open_sample_log(stage.data.trace_dir, rank)
    done = state.step >= total_steps
    window = {"loss": 0.0, "n": 0, "wait": 0.0, "time": 0.0, "samples": 0}
    while not done:
        state.epoch = position.epoch or 0  # the pass in training (the progress line shows it), not the last report's
        t_wait = time.perf_counter()
        for batch in iter_train_batches(train_shard, batch_size=micro, position=position, device=engine.device):
            t_got = time.perf_counter()
            if trace is not None:
                trace.writelines(f"{batch['epoch']} {s} {i}\n" for s, i in zip(batch["shard"].tolist(), batch["index"].tolist()))
                trace.flush()
            if source_samples is not None:
                source_samples.add(batch["source"])
            images, labels = batch["image"], batch["label"].long()
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            loss, _ = engine(images, targets)
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.detach()  # read back at log intervals only: no host sync per step
            window["n"] += 1
            window["wait"] += t_got - t_wait
            window["samples"] += len(labels) * world
            window["time"] += time.perf_counter() - t_wait
            if engine.is_gradient_accumulation_boundary():
                state.step += 1
                state.samples += global_batch
                scheduler.step_update(state.samples)
                if ema is not None:
                    ema.update()
                if state.step % job.log_every == 0 or state.step == total_steps:
                    _log_progress(job, stage, state, total_steps, engine, optimizer, tracker, window, rank, world,
                                  skipped=skipped_counts(train_shard)["total"], rss=proc.memory_info().rss,
                                  extra=source_samples.sync() if source_samples is not None else {})
                    window = {"loss": 0.0, "n": 0, "wait": 0.0, "time": 0.0, "samples": 0}
                if state.step >= total_steps:
                    done = True
                    break
                if state.step % interval == 0:
                    report({"train/loss": loss.item()})
            t_wait = time.perf_counter()
        metrics: dict[str, float] = {}
        passes = (position.epoch or 0)  # iter_train_batches moved the position past the finished epoch
        if val_shard is not None and (done or passes % stage.checkpoint.val_interval_epochs == 0):
            metrics = _evaluate(engine, val_shard, micro)
            tracker.log_metrics(metrics, step=state.step)
            if rank == 0:
                logger.info("%s epoch %d validation %s", stage.name, state.epoch, metrics)
        if done or stage.checkpoint.at_epoch_end:
            report(metrics, export=done)
        elif metrics:
            ray.train.report({**metrics, "step": state.step, "epoch": position.epoch or 0})
    engine.destroy()
    if system_monitor is not None:
        system_monitor.finish()
    _remove_offload_files(stage, rank)
    if not tracker.close() and tracker.fallback_path.exists():
        uri = write_file(recipe, stage, tracker.fallback_path.name, tracker.fallback_path.read_bytes())
        logger.warning("undelivered metrics saved to %s; the driver replays them when MLflow is back", uri)
    shutil.rmtree(scratch, ignore_errors=True)


def _seed_rank(seed: int, rank: int) -> None:
    """Seeds torch (CPU and every CUDA device), numpy and Python from (seed, rank): drop-path masks, mixup/cutmix
    (numpy) and anything else drawn during training differ between ranks yet repeat run to run. A resumed run
    restores the checkpoint's states over these."""
    rank_seed = mix_seed(seed, rank, 0x5EED)
    torch.manual_seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    random.seed(rank_seed)


def _remove_offload_files(stage: StageConfig, rank: int) -> None:
    """This rank's DeepSpeed swap files under ``deepspeed.nvme_path`` (tens of GB for a large model): scratch,
    so they go when the stage ends rather than staying on the disk."""
    if stage.deepspeed.nvme_path is None:
        return
    for folder in Path(stage.deepspeed.nvme_path).glob(f"zero_stage_*/*/rank{rank}"):
        shutil.rmtree(folder, ignore_errors=True)


def _log_progress(
    job: StageJob, stage: StageConfig, state: TrainerState, total_steps: int, engine: Any, optimizer: Any,
    tracker: Any, window: dict[str, float], rank: int, world: int, *, skipped: int, rss: int,
    extra: dict[str, float],
) -> None:
    """Metrics of the last logging window (and ``extra`` ones) to the tracker (rank 0) and a progress line to the
    job log."""
    grad_norm = engine.get_global_grad_norm()
    metrics = {
        "train/loss": float(window["loss"]) / max(window["n"], 1),
        "train/lr": max(g["lr"] for g in optimizer.param_groups),
        "train/samples_per_s": window["samples"] / max(window["time"], 1e-9),
        "data/stall_frac": window["wait"] / max(window["time"], 1e-9),
        "data/skipped": float(skipped),
        "sys/rss_mb": rss / 2**20,
        # the x axes of `revcol compare --x samples|epochs`: steps differ between runs of other batch sizes
        "train/samples": float(state.samples),
        "train/epoch": state.samples / max(job.train_samples, 1),
        **extra,
    }
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    tracker.log_metrics(metrics, step=state.step)
    if rank == 0:
        logger.info(
            "%s step %d/%d epoch %d loss %.4f lr %.2e %.3g samples/s stall %.0f%% skipped %d",
            stage.name, state.step, total_steps, state.epoch, metrics["train/loss"], metrics["train/lr"],
            metrics["train/samples_per_s"], 100 * metrics["data/stall_frac"], skipped,
        )
