"""Evaluation of exported weights on a stage's validation shards: top-1/top-5 overall and per column.

Runs in the driver process over the Ray Data eval stream (decoding on the cluster's CPUs); every sample is seen
exactly once (bad or padding rows are flagged ``valid=False`` and not counted).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

import revcol
from pipeline.config import Recipe, StageConfig

__all__ = ["evaluate_model", "evaluate_stage"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def evaluate_model(model: revcol.RevCol, batches: Any) -> dict[str, float]:
    """Top-1/top-5 (and per-column top-1 for intermediate supervision) of ``model`` over ``batches``.

    Args:
        model: the network (put in eval mode here).
        batches: iterable of dicts with ``image`` (B, 3, H, W), ``label`` (B,) and optionally ``valid`` (B,).
    """
    model.eval()
    correct1 = correct5 = count = 0
    per_column: list[int] = []
    start = time.perf_counter()
    for batch in batches:
        images, labels = batch["image"].float(), batch["label"].long()
        valid = batch["valid"].bool() if "valid" in batch else torch.ones_like(labels, dtype=torch.bool)
        logits = model.forward_columns(images).logits
        if not per_column:
            per_column = [0] * len(logits)
        top5 = logits[-1].topk(min(5, logits[-1].shape[1]), dim=1).indices
        correct1 += int(((top5[:, 0] == labels) & valid).sum())
        correct5 += int(((top5 == labels[:, None]).any(1) & valid).sum())
        count += int(valid.sum())
        for k, col in enumerate(logits):
            per_column[k] += int(((col.argmax(1) == labels) & valid).sum())
    if count == 0:
        raise ValueError("evaluation saw no valid samples")
    metrics = {"val/top1": correct1 / count, "val/top5": correct5 / count, "samples": float(count),
               "samples_per_s": count / (time.perf_counter() - start)}
    if len(per_column) > 1:
        metrics.update({f"val/top1_col{k}": c / count for k, c in enumerate(per_column)})
    return metrics


def evaluate_stage(recipe: Recipe, stage: StageConfig, weights: dict[str, str]) -> dict[str, dict[str, float]]:
    """Evaluates each named weights URI (e.g. ``{"raw": …, "ema": …}``) on the stage's ``data.val``."""
    from pipeline.data.stream import build_eval_dataset, check_inputs, iter_eval_batches
    from pipeline.train.weights import read_weights

    data = check_inputs(stage.data, recipe.s3, splits=("val",))
    num_classes = stage.model.num_classes or data["val"].num_classes
    dataset = build_eval_dataset(stage.data, model_name=stage.model.name, s3_cfg=recipe.s3, num_splits=1,
                                 batch_size=stage.data.batch_size, data_cpus=recipe.scaling.data_cpus)
    results = {}
    for name, uri in weights.items():
        state = read_weights(uri, s3_cfg=recipe.s3)
        intersup = any(k.startswith("cls_blocks.") for k in state)
        model = revcol.create_model(stage.model.name, num_classes=num_classes, intersup=intersup,
                                    **stage.model.overrides)
        model.load_state_dict(state)
        results[name] = evaluate_model(model, iter_eval_batches(dataset, batch_size=stage.data.batch_size))
        logger.info("eval %s (%s weights): top-1 %.4f top-5 %.4f on %d samples", stage.name, name,
                    results[name]["val/top1"], results[name]["val/top5"], int(results[name]["samples"]))
    return results
