"""Evaluation runs, driver side: named weights files (``raw``, ``ema``) on one or more eval streams, computed on
Ray Train workers — the ``eval`` stage and ``revcol eval`` — and the rule that picks the stage's reported weights.

The driver only checks and schedules: it checks each weights file against its model on the ``meta`` device
(:func:`pipeline.train.weights.model_spec`, before any resource is taken), builds one eval stream per split, divided
among the workers, and runs :func:`pipeline.train.validate.eval_func` in a ``TorchTrainer`` with the
recipe's scaling, as training does (GPUs when ``use_gpu``). Each rank evaluates its part of every stream (every
sample exactly once) and the counts are all-reduced.

Which of raw and EMA is the stage's result (:func:`choose_weights`) is never decided by the scores on the eval
split itself: ``weights: auto`` takes the one that scores higher on the source stage's own validation data.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

from pipeline import storage
from pipeline.config import S3_SECRETS, DataConfig, Recipe, StageConfig
from pipeline.train.weights import ModelSpec

__all__ = ["EvalRun", "WeightsChoice", "check_weights", "choose_weights", "evaluate_weights", "stage_metrics"]

logger = logging.getLogger(__name__)


@dataclass
class EvalRun:
    """What an evaluation run measured, and where."""

    results: dict[str, dict[str, dict[str, float]]]
    """``{split: {weights name: metrics}}`` (``val/top1``, ``val/top5``, ``val/samples``, ``val/top1_col{k}``)."""
    world_size: int
    worker_pids: list[int]
    """The Ray Train worker processes, by rank."""


def check_weights(recipe: Recipe, stage: StageConfig, weights: dict[str, str]) -> dict[str, ModelSpec]:
    """The model each weights file is built into (``stage.model``'s variant and overrides), checked without
    loading any weights.

    Raises:
        FileNotFoundError: a weights file is missing.
        ValueError: a weights file does not fit the stage's model (or its ``model.num_classes``).
    """
    from pipeline.train.weights import model_spec

    specs = {}
    for name, uri in weights.items():
        spec = model_spec(uri, model=stage.model.name, overrides=stage.model.overrides, s3_cfg=recipe.s3)
        if stage.model.num_classes is not None and stage.model.num_classes != spec.num_classes:
            raise ValueError(f"model.num_classes={stage.model.num_classes}, but the weights {uri!r} classify "
                             f"{spec.num_classes} classes")
        specs[name] = spec
    return specs


def evaluate_weights(
    recipe: Recipe,
    stage: StageConfig,
    weights: dict[str, str],
    *,
    splits: dict[str, DataConfig],
    specs: dict[str, ModelSpec] | None = None,
) -> EvalRun:
    """Evaluates every named weights file on every split's ``val`` shards, on the Ray cluster this process is
    connected to, with ``recipe.scaling`` (workers, GPUs, resources).

    Args:
        recipe: the pipeline (scaling, storage for Ray Train's run folder, S3 settings).
        stage: the eval stage (model, precision, the Ray Train run's name).
        weights: weights URIs by name.
        splits: the eval streams by name: each one's ``val`` shards with its preprocessing; the eval batch is
            ``stage.data.batch_size`` for all of them.
        specs: the models, when :func:`check_weights` ran already.

    Raises:
        RuntimeError: the run failed on the workers.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.data.stream import build_eval_dataset, check_inputs, train_data_config
    from pipeline.placement import resolve_placement
    from pipeline.train.launch import run_name, scaling_config
    from pipeline.train.validate import EvalJob, eval_func

    specs = specs or check_weights(recipe, stage, weights)
    placement = resolve_placement(recipe.scaling)
    datasets = {}
    for split, data in splits.items():
        shards = check_inputs(data, recipe.s3, splits=("val",))["val"]
        too_many = {name: s.num_classes for name, s in specs.items() if s.num_classes < shards.num_classes}
        if too_many:
            raise ValueError(f"{split} shards {data.val!r} have {shards.num_classes} classes, more than the weights "
                             f"classify: {too_many}")
        datasets[split] = build_eval_dataset(
            data, model_name=stage.model.name, s3_cfg=recipe.s3, batch_size=stage.data.batch_size,
            data_cpus=placement.data_cpus, label_selector=placement.data_selector,
        )
    job = EvalJob(
        recipe=recipe.model_dump(mode="json", exclude={"s3": S3_SECRETS}),
        stage=stage.name,
        weights=weights,
        models={name: {"name": s.name, "num_classes": s.num_classes, "intersup": s.intersup,
                       "overrides": s.overrides} for name, s in specs.items()},
        splits=list(splits),
        s3=storage.resolve_s3_config(recipe.s3),  # as the training workers get it
    )
    path, filesystem = storage.ray_storage(recipe.storage_path, s3=recipe.s3)
    trainer = TorchTrainer(
        eval_func,
        train_loop_config=job.to_dict(),
        scaling_config=scaling_config(recipe, placement),
        run_config=ray.train.RunConfig(name=run_name(recipe, stage), storage_path=path,
                                       storage_filesystem=filesystem),
        datasets=datasets,
        dataset_config=train_data_config(datasets),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"evaluation {stage.name!r} failed: {result.error}") from result.error
    return EvalRun(**result.return_value)


@dataclass(frozen=True)
class WeightsChoice:
    """Which weights an eval stage reports, by which rule, and why."""

    weights: str
    rule: str
    reason: str


def choose_weights(
    rule: Literal["auto", "raw", "ema"],
    *,
    available: list[str],
    selection: dict[str, dict[str, float]] | None = None,
    no_selection: str | None = None,
) -> WeightsChoice:
    """The weights an eval stage reports: fixed by the recipe (``raw``, ``ema``), or, for ``auto``, the one of
    raw and EMA with the higher top-1 on the source stage's validation data (``selection``; raw on a tie) —
    raw when there is no EMA or no such data (``no_selection`` says why). The eval split's own scores play no
    part.

    Raises:
        ValueError: ``ema`` asked for, but there are no EMA weights.
    """
    if rule != "auto":
        if rule not in available:
            raise ValueError(f"weights: {rule} asked for, but the source has only {available} weights")
        return WeightsChoice(rule, rule, "fixed by the recipe (weights)")
    if "ema" not in available:
        return WeightsChoice("raw", rule, "the source keeps no EMA weights")
    if selection is None:
        return WeightsChoice("raw", rule, f"raw by default: {no_selection or 'no validation data to choose on'}")
    raw, ema = selection["raw"]["val/top1"], selection["ema"]["val/top1"]
    winner = "ema" if ema > raw else "raw"
    return WeightsChoice(winner, rule, f"higher top-1 on the source stage's validation data (raw {raw:.4f}, "
                                       f"ema {ema:.4f}{', a tie: raw' if ema == raw else ''})")


def stage_metrics(run: EvalRun, choice: WeightsChoice) -> dict[str, Any]:
    """The eval stage's MLflow metrics: the chosen weights' under their plain names, each weights' under
    ``{name}/``, the scores the choice was made on under ``selection/{name}/``."""
    metrics: dict[str, Any] = {**run.results["test"][choice.weights]}
    for name, values in run.results["test"].items():
        metrics.update({f"{name}/{k}": v for k, v in values.items()})
    for name, values in run.results.get("selection", {}).items():
        metrics.update({f"selection/{name}/{k}": v for k, v in values.items()})
    return metrics


def evaluate_file(
    weights: str,
    data: str,
    *,
    model: str | None = None,
    workers: int = 1,
    use_gpu: bool = False,
    batch_size: int = 128,
    image_size: int | None = None,
    tracking_uri: str | None = None,
    experiment: str = "revcol-eval",
) -> dict[str, Any]:
    """``revcol eval``: one weights file on one set of shards, on Ray Train workers of the cluster this process
    finds (``RAY_ADDRESS``) or a local one; an MLflow run when ``tracking_uri`` is given.

    Args:
        weights: a ``.safetensors`` file or export folder, or an official ``.pth`` checkpoint; local or ``s3://``.
        data: the shards (manifest, folder or ``s3://`` prefix).
        model: the RevCol variant; default: the one the weights record (exports of this pipeline do).
        workers: Ray Train workers (each evaluates its part of the shards).
        use_gpu: one GPU per worker.
        batch_size: eval batch per worker.
        image_size: input resolution; default: the variant's.
        tracking_uri: MLflow tracking URI (None: no run).
        experiment: the MLflow experiment of the run.

    Returns:
        ``weights``, ``data``, ``model``, ``metrics`` (top-1/5 overall and per column), ``world_size``,
        ``run_id`` (None without tracking).

    Raises:
        FileNotFoundError: no weights at ``weights``, or no shards at ``data``.
        ValueError: no model named or recorded, or the weights do not fit it (naming both).
    """
    import shutil
    import tempfile

    from pipeline.config import parse_recipe
    from pipeline.data.stream import check_inputs
    from pipeline.cluster import connect_ray
    from pipeline.train.weights import model_spec

    spec = model_spec(weights, model=model)
    storage_dir = tempfile.mkdtemp(prefix="revcol-eval-")  # Ray Train's run folder: nothing is kept there
    recipe = parse_recipe({
        "name": "revcol-eval", "storage_path": storage_dir,
        # Half a CPU per CPU worker leaves the decode tasks theirs on a small machine (trainers taking every CPU
        # starve the stream).
        "scaling": {"num_workers": workers, "use_gpu": use_gpu, "cpus_per_worker": 1.0 if use_gpu else 0.5},
        "stages": [{"name": "eval", "kind": "eval", "init_from": weights,
                    "data": {"val": data, "batch_size": batch_size, "image_size": image_size},
                    "model": {"name": spec.name, "overrides": spec.overrides}}],
    })
    stage = recipe.stages[0]
    check_inputs(stage.data, recipe.s3, splits=("val",))  # bad shards fail here, before Ray starts
    try:
        connect_ray()
        run = evaluate_weights(recipe, stage, {"model": stage.init_from}, splits={"test": stage.data},
                               specs={"model": spec})
    finally:
        shutil.rmtree(storage_dir, ignore_errors=True)
    metrics = run.results["test"]["model"]
    summary = {"weights": weights, "data": data, "model": spec.name, "num_classes": spec.num_classes,
               "metrics": metrics, "world_size": run.world_size, "run_id": None}
    if tracking_uri:
        summary["run_id"] = _track_eval(tracking_uri, experiment, summary)
    return summary


def _track_eval(tracking_uri: str, experiment: str, summary: dict[str, Any]) -> str:
    """An MLflow run of a ``revcol eval``: params, metrics, the results JSON as an artifact; returns its id."""
    import tempfile
    import time
    from pathlib import Path

    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import start_run

    run_id = start_run(tracking_uri, experiment, run_name=f"eval {summary['model']}",
                       params={k: summary[k] for k in ("weights", "data", "model", "world_size")},
                       tags={"revcol.kind": "eval", "revcol.weights_uri": summary["weights"]})
    client = MlflowClient(tracking_uri)
    stamp = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, 0) for k, v in summary["metrics"].items()])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "eval_results.json"
        path.write_text(json.dumps({**summary, "run_id": run_id}, indent=1))
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id
