"""Evaluation on the Ray Train workers: top-1/top-5 overall and per column over an eval stream.

:func:`evaluate_stream` is the one tally, used by validation inside training (``loop.py``, on the DeepSpeed
engine) and by :func:`eval_func`, the worker of an evaluation run (the ``eval`` stage and ``revcol eval``): each rank
counts its split of the stream (every sample exactly once; padding and bad rows are ``valid=False`` and not
counted) and the integer counts are summed over the ranks with ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pipeline.config import StageConfig
from pipeline.train.job import WorkerJob
from pipeline.train.weights import ModelSpec, read_weights

__all__ = ["EvalJob", "eval_func", "evaluate_stream"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_stream(
    forward: Callable[[dict[str, Any]], Sequence[torch.Tensor]],
    batches: Iterable[dict[str, Any]],
    *,
    columns: int,
    device: torch.device | str,
) -> dict[str, float]:
    """Top-1/top-5 and per-column top-1 of ``forward`` over this rank's ``batches``, summed over all ranks.

    A collective when ``torch.distributed`` is initialized: every rank calls it (over the same number of batches,
    as the eval stream's equal split gives them).

    Args:
        forward: a batch → the per-column logits ``[(B, classes), ...]``, the last column's last.
        batches: dicts with ``image``, ``label`` (B,) and ``valid`` (B,) (``iter_eval_batches``).
        columns: number of per-column logits ``forward`` returns.
        device: where the counts live (NCCL sums only GPU tensors).

    Returns:
        ``val/top1``, ``val/top5``, ``val/samples`` (valid samples counted, all ranks) and, with more than one
        column, ``val/top1_col{k}``.

    Raises:
        ValueError: no valid sample on any rank.
    """
    counts = torch.zeros(3 + columns, dtype=torch.int64, device=device)  # correct@1, correct@5, valid, per column
    for batch in batches:
        labels, valid = batch["label"].long(), batch["valid"].bool()
        logits = forward(batch)
        top5 = logits[-1].float().topk(min(5, logits[-1].shape[1]), dim=1).indices
        counts[0] += ((top5[:, 0] == labels) & valid).sum()
        counts[1] += ((top5 == labels[:, None]).any(1) & valid).sum()
        counts[2] += valid.sum()
        for k, column in enumerate(logits):
            counts[3 + k] += ((column.argmax(1) == labels) & valid).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    correct1, correct5, count, *per_column = counts.tolist()
    if count == 0:
        raise ValueError("evaluation saw no valid samples")
    metrics = {"val/top1": correct1 / count, "val/top5": correct5 / count, "val/samples": float(count)}
    if columns > 1:
        metrics.update({f"val/top1_col{k}": c / count for k, c in enumerate(per_column)})
    return metrics


@dataclass(kw_only=True)
class EvalJob(WorkerJob):
    """Everything an evaluation worker needs, as plain data (what Ray hands :func:`eval_func`)."""

    weights: dict[str, str]
    """Weights to evaluate by name (``raw``, ``ema``): their URIs."""
    models: dict[str, dict[str, Any]]
    """The :class:`ModelSpec` (as a dict) each named weights file is built into, checked by the driver."""
    splits: list[str]
    """The datasets (eval streams) given to the trainer, each evaluated with every weights file."""


def _autocast(stage: StageConfig, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The stage's precision as training uses it (autocast over fp32 weights), on GPUs; fp32 on CPUs."""
    precision = stage.deepspeed.precision
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def eval_func(config: dict[str, Any]) -> dict[str, Any]:
    """One rank of an evaluation run (Ray Train ``train_loop_per_worker``): every weights file on every split.

    Returns (rank 0's becomes the run's ``Result.return_value``; the counts are all-reduced, so every rank's is
    the same): ``results`` — ``{split: {weights name: metrics}}`` — and which processes did the work:
    ``world_size`` and ``worker_pids`` (by rank).
    """
    import ray.train
    import ray.train.torch

    from pipeline.data.stream import iter_eval_batches

    job = EvalJob(**config)
    recipe, stage = job.resolved()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives (all_gather_object) use the current device
    shards = {split: ray.train.get_dataset_shard(split) for split in job.splits}
    results: dict[str, dict[str, dict[str, float]]] = {split: {} for split in job.splits}
    for name, uri in job.weights.items():
        model = ModelSpec(**job.models[name]).build()
        model.load_state_dict(read_weights(uri, s3_cfg=recipe.s3))
        model.to(device).eval()

        def forward(batch: dict[str, Any], model: Any = model) -> Sequence[torch.Tensor]:
            with _autocast(stage, device):
                return model.forward_columns(batch["image"]).logits

        for split, shard in shards.items():
            start = time.perf_counter()
            metrics = evaluate_stream(forward, iter_eval_batches(shard, device=device),
                                      columns=len(model.classifiers()), device=device)
            metrics["val/samples_per_s"] = metrics["val/samples"] / (time.perf_counter() - start)
            results[split][name] = metrics
            if rank == 0:
                logger.info("eval %s: %s weights on %s: top-1 %.4f top-5 %.4f (%d samples, %d workers)", stage.name,
                            name, split, metrics["val/top1"], metrics["val/top5"], metrics["val/samples"], world)
        del model
    pids: list[Any] = [None] * world
    dist.all_gather_object(pids, os.getpid())
    return {"results": results, "world_size": world, "worker_pids": pids}
