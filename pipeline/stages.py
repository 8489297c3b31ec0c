"""The stage chain: ``revcol run RECIPE.yaml`` executes pretrain → finetune → eval in order.

One MLflow parent run per pipeline (experiment = recipe name, tag ``revcol.pipeline``), one child run per stage
(tag ``revcol.stage``). A stage's outcome — its run id, checkpoint, exported weights, final metrics — is written to
``{storage_path}/{name}-{stage}/stage_result.json`` when it finishes; that file is what makes re-running
idempotent: finished stages are skipped and their outputs reused, an interrupted stage resumes from its last
checkpoint (Ray Train resumes a run of the same name), and the same MLflow runs are continued, not duplicated.

Lineage: each child run is tagged with the weights it started from (``revcol.init_from``, ``revcol.init_from_run``)
and the checkpoint and export it produced (``revcol.checkpoint_uri``, ``revcol.export_uri``); in MLflow 3's own
terms (:mod:`pipeline.lineage`) its datasets and the model it started from are its inputs, its export a LoggedModel,
and the final finetune export a registered model version with an alias.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config import Recipe, StageConfig
from pipeline.console import StageEvents

if TYPE_CHECKING:
    from pipeline.data.stream import ShardSet

__all__ = ["StageOutcome", "plan_pipeline", "run_pipeline"]

logger = logging.getLogger(__name__)

RESULT_FILE = "stage_result.json"


@dataclass
class StageOutcome:
    """What a stage produced (also the content of its ``stage_result.json``)."""

    stage: str
    kind: str
    status: str
    """FINISHED, SKIPPED (finished before: outputs reused) or FAILED."""
    run_id: str | None = None
    checkpoint_uri: str | None = None
    export_uri: str | None = None
    ema_export_uri: str | None = None
    model_id: str | None = None
    """The export's MLflow LoggedModel."""
    samples_per_s: float | None = None
    seconds: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- storage helpers
def _read_result(recipe: Recipe, stage: StageConfig) -> StageOutcome | None:
    from pipeline.train.run_folder import read_file

    data = read_file(recipe, stage, RESULT_FILE)
    return StageOutcome(**json.loads(data)) if data else None


def _write_result(recipe: Recipe, stage: StageConfig, outcome: StageOutcome) -> None:
    from pipeline.train.run_folder import write_file

    write_file(recipe, stage, RESULT_FILE, json.dumps(asdict(outcome), indent=1).encode())


def _checkpoint_uri(recipe: Recipe, path: str) -> str:
    from pipeline.storage import is_s3_url

    return f"s3://{path}" if is_s3_url(recipe.storage_path) else path


# --------------------------------------------------------------------------------------------------- tracking
class _Runs:
    """The pipeline's MLflow parent run and its stage runs, found again on re-runs (never duplicated)."""

    def __init__(self, recipe: Recipe) -> None:
        from mlflow.tracking import MlflowClient

        from pipeline.tracking import flatten_params, log_new_params, training_experiment

        self.uri = recipe.tracking.uri
        self.client = MlflowClient(self.uri)
        self.experiment_id = training_experiment(self.client, recipe.tracking.experiment or recipe.name)
        parents = self.client.search_runs(
            [self.experiment_id], f"tags.`revcol.pipeline` = '{recipe.name}' and tags.`revcol.role` = 'pipeline'",
            order_by=["attributes.start_time DESC"], max_results=1,
        )
        if parents:
            self.parent_id = parents[0].info.run_id
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id, run_name=recipe.name,
                tags={"revcol.pipeline": recipe.name, "revcol.role": "pipeline"},
            )
            self.parent_id = run.info.run_id
            log_new_params(self.client, self.parent_id, flatten_params(recipe.model_dump(mode="json")))
        self.recipe = recipe

    def stage_run(self, stage: StageConfig) -> str:
        """The stage's child run: the existing one (resumed stage) or a new one."""
        from pipeline.tracking import flatten_params, log_new_params

        found = self.client.search_runs(
            [self.experiment_id],
            f"tags.`mlflow.parentRunId` = '{self.parent_id}' and tags.`revcol.stage` = '{stage.name}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(
            self.experiment_id, run_name=stage.name,
            tags={"mlflow.parentRunId": self.parent_id, "revcol.stage": stage.name, "revcol.kind": stage.kind,
                  "revcol.pipeline": self.recipe.name},
        )
        log_new_params(self.client, run.info.run_id, flatten_params(stage.model_dump(mode="json")))
        return run.info.run_id

    def finish(self, run_id: str, *, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
        for key, value in (tags or {}).items():
            if value is not None:
                self.client.set_tag(run_id, key, str(value))
        self.client.set_terminated(run_id, status=status)


# ----------------------------------------------------------------------------------------------------- stages
def _resolve_init(recipe: Recipe, stage: StageConfig, done: dict[str, StageOutcome]) -> tuple[str | None, str | None]:
    """``(weights URI, source run id)`` a stage starts from: an earlier stage's export, or a URI as given."""
    if stage.init_from is None:
        return None, None
    if stage.init_from in done:
        source = done[stage.init_from]
        return source.export_uri, source.run_id
    return stage.init_from, None


def _source_models(stage: StageConfig, done: dict[str, StageOutcome]) -> list[str]:
    """The LoggedModel a stage's weights come from (an earlier stage's export), as a list of ids."""
    source = done.get(stage.init_from or "")
    return [source.model_id] if source is not None and source.model_id else []


def _check_stage_names(recipe: Recipe, stages: list[str] | None) -> None:
    unknown = [s for s in stages or [] if s not in [st.name for st in recipe.stages]]
    if unknown:
        raise ValueError(f"--stages: unknown stage(s) {unknown}; recipe has {[s.name for s in recipe.stages]}")


def plan_pipeline(recipe: Recipe, *, stages: list[str] | None = None) -> dict[str, Any]:
    """Validates data and lineage without taking cluster resources: the ``--dry-run`` plan.

    Returns:
        Per stage: kind, model, sample and class counts of its data, what it initializes from, and whether it
        already finished (and would be skipped).
    """
    from pipeline.data.stream import check_inputs

    _check_stage_names(recipe, stages)
    plan = []
    for stage in recipe.stages:
        if stages and stage.name not in stages:
            continue
        data = check_inputs(stage.data, recipe.s3)
        previous = _read_result(recipe, stage)
        plan.append({
            "stage": stage.name,
            "kind": stage.kind,
            "model": stage.model.name,
            "init_from": stage.init_from,
            **{f"{split}_samples": shards.num_samples for split, shards in data.items()},
            **{f"{split}_classes": shards.num_classes for split, shards in data.items()},
            "finished_before": previous is not None and previous.status == "FINISHED",
        })
    return {"recipe": recipe.name, "storage_path": recipe.storage_path, "tracking_uri": recipe.tracking.uri,
            "stages": plan}


def _train_stage(recipe: Recipe, stage: StageConfig, runs: _Runs, run_id: str, done: dict[str, StageOutcome]) -> StageOutcome:
    from pipeline.data.stream import build_eval_dataset, build_train_dataset, check_inputs
    from pipeline.lineage import candidate_stage, log_datasets, log_export_model, register_candidate
    from pipeline.placement import resolve_placement
    from pipeline.train.launch import fit_stage

    data = check_inputs(stage.data, recipe.s3)
    log_datasets(runs.client, run_id, data, models=_source_models(stage, done))
    num_classes = stage.model.num_classes or data["train"].num_classes
    init_uri, init_run = _resolve_init(recipe, stage, done)
    for key, value in {"revcol.init_from": init_uri, "revcol.init_from_run": init_run}.items():
        if value:
            runs.client.set_tag(run_id, key, value)
    placement = resolve_placement(recipe.scaling)
    datasets = {"train": build_train_dataset(stage.data, model_name=stage.model.name, s3_cfg=recipe.s3,
                                             data_cpus=placement.data_cpus, label_selector=placement.data_selector)}
    if stage.data.val is not None:
        datasets["val"] = build_eval_dataset(
            stage.data, model_name=stage.model.name, s3_cfg=recipe.s3, batch_size=stage.data.batch_size,
            data_cpus=placement.data_cpus, label_selector=placement.data_selector,
        )
    start = time.perf_counter()
    result = fit_stage(recipe, stage, datasets=datasets, train_samples=data["train"].num_samples,
                       num_classes=num_classes, run_id=run_id, tracking_uri=recipe.tracking.uri,
                       init_weights=init_uri, placement=placement)
    seconds = time.perf_counter() - start
    if result.error is not None:
        raise RuntimeError(f"stage {stage.name!r} failed: {result.error}") from result.error
    ckpt = _checkpoint_uri(recipe, result.checkpoint.path)
    metrics = {k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    export_uri = f"{ckpt}/export/model.safetensors"
    ema_export_uri = f"{ckpt}/export/ema.safetensors" if stage.regularize.ema_decay else None
    model_id = log_export_model(runs.client, experiment_id=runs.experiment_id, run_id=run_id, stage=stage,
                                step=int(metrics.get("step", 0)), weights_uri=export_uri,
                                ema_weights_uri=ema_export_uri, num_classes=num_classes, val=data.get("val"))
    if stage.name == candidate_stage(recipe):
        register_candidate(runs.client, name=recipe.name, alias=recipe.tracking.register_alias, model_id=model_id,
                           run_id=run_id)
    client_metrics = runs.client.get_run(run_id).data.metrics
    return StageOutcome(
        stage=stage.name, kind=stage.kind, status="FINISHED", run_id=run_id, checkpoint_uri=ckpt,
        export_uri=export_uri, ema_export_uri=ema_export_uri, model_id=model_id,
        samples_per_s=client_metrics.get("train/samples_per_s"), seconds=seconds, metrics=metrics,
    )


def _selection_data(recipe: Recipe, stage: StageConfig, test: ShardSet) -> tuple[Any, str | None]:
    """The source stage's validation data, on which ``weights: auto`` chooses between raw and EMA, or why there
    is none: ``(DataConfig, None)`` or ``(None, reason)``. ``test``: the eval stage's resolved shards."""
    from pipeline.data.stream import resolve_shards

    if stage.init_from not in [s.name for s in recipe.stages]:
        return None, f"init_from {stage.init_from!r} is a weights URI, not a stage with validation data"
    source = recipe.stage(stage.init_from)
    if source.data.val is None:
        return None, f"source stage {source.name!r} has no validation data (data.val)"
    if resolve_shards(source.data.val, s3_cfg=recipe.s3).fingerprint == test.fingerprint:
        logger.warning("stage %s validates on the shards eval stage %s tests on: choosing raw or EMA there would "
                       "choose on the test split; reporting raw (give %s a validation split of its own)",
                       source.name, stage.name, source.name)
        return None, f"source stage {source.name!r} validates on this stage's test shards"
    return source.data, None


def _eval_stage(recipe: Recipe, stage: StageConfig, runs: _Runs, run_id: str, done: dict[str, StageOutcome]) -> StageOutcome:
    """Raw and EMA weights of the source on the stage's ``data.val`` (the test split), on Ray Train workers; the
    reported one chosen by ``stage.weights`` (:func:`pipeline.evaluate.choose_weights`), never by these scores."""
    from pipeline.data.stream import check_inputs
    from pipeline.evaluate import check_weights, choose_weights, evaluate_weights, stage_metrics
    from pipeline.lineage import log_datasets, log_model_metrics
    from pipeline.tracking import system_metrics_monitor

    init_uri, init_run = _resolve_init(recipe, stage, done)
    if init_uri is None:
        raise ValueError(f"eval stage {stage.name!r} needs init_from (an earlier stage or a weights URI)")
    source = done.get(stage.init_from or "")
    weights = {"raw": init_uri}
    if source is not None and source.ema_export_uri:
        weights["ema"] = source.ema_export_uri
    if stage.weights not in ("auto", *weights):
        raise ValueError(f"stages.{stage.name}.weights: {stage.weights!r}, but {stage.init_from!r} exported no "
                         f"{stage.weights} weights")
    for key, value in {"revcol.init_from": init_uri, "revcol.init_from_run": init_run}.items():
        if value:
            runs.client.set_tag(run_id, key, value)
    specs = check_weights(recipe, stage, weights)
    data = check_inputs(stage.data, recipe.s3, splits=("val",))
    models = _source_models(stage, done)
    log_datasets(runs.client, run_id, data, evaluation=True, models=models)
    splits = {"test": stage.data}
    selection, no_selection = None, None
    if stage.weights == "auto" and "ema" in weights:
        selection, no_selection = _selection_data(recipe, stage, data["val"])
    if selection is not None:
        splits["selection"] = selection
    monitor = system_metrics_monitor(recipe.tracking, run_id)
    start = time.perf_counter()
    try:
        run = evaluate_weights(recipe, stage, weights, splits=splits, specs=specs)
    finally:
        if monitor is not None:
            monitor.finish()
    seconds = time.perf_counter() - start
    choice = choose_weights(stage.weights, available=list(weights), selection=run.results.get("selection"),
                            no_selection=no_selection)
    logger.info("eval %s reports the %s weights (weights: %s): %s", stage.name, choice.weights, choice.rule,
                choice.reason)
    metrics = stage_metrics(run, choice)
    if models:  # the evaluated export's LoggedModel gets the held-out results, measured on the eval data
        log_model_metrics(runs.client, run_id, models[0], metrics, step=0, dataset=data["val"])
    else:
        runs.client.log_batch(run_id, metrics=_metric_list(metrics, step=0))
    runs.client.set_tag(run_id, "revcol.weights", choice.weights)
    runs.client.set_tag(run_id, "revcol.weights_reason", f"{choice.rule}: {choice.reason}")
    _log_json_artifact(runs, run_id, {
        "weights": weights, "results": run.results["test"], "selection": run.results.get("selection"),
        "reported": choice.weights, "choice": asdict(choice), "world_size": run.world_size,
        "worker_pids": run.worker_pids,
    }, "eval_results.json")
    return StageOutcome(stage=stage.name, kind=stage.kind, status="FINISHED", run_id=run_id, seconds=seconds,
                        samples_per_s=run.results["test"][choice.weights]["val/samples_per_s"],
                        metrics={k: float(v) for k, v in metrics.items()})


def _metric_list(metrics: dict[str, Any], *, step: int) -> list[Any]:
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(k, float(v), stamp, step) for k, v in metrics.items() if isinstance(v, (int, float))]


def _log_json_artifact(runs: _Runs, run_id: str, obj: Any, name: str) -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=1, default=str))
        runs.client.log_artifact(run_id, str(path))


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


def run_pipeline(recipe: Recipe, *, stages: list[str] | None = None,
                 events: StageEvents | None = None) -> list[StageOutcome]:
    """Runs the recipe's stages (or the named subset) in order; returns one outcome per stage.

    ``events`` hears each stage start, end or fail (the command line's :class:`pipeline.console.RunConsole`).

    Raises:
        RuntimeError: a stage failed (its MLflow run and the parent are marked FAILED; re-running resumes it).
    """
    from pipeline.cluster import check_shared_storage, connect_ray

    events = events or StageEvents()
    _check_stage_names(recipe, stages)
    # GPU memory, or the host memory the recipe is sized for, is a hard limit: refuse a misfit before taking
    # any resource (`revcol plan` tells the same, with what to change).
    if recipe.scaling.use_gpu or recipe.scaling.memory_per_worker_gb is not None:
        from pipeline.plan import plan_recipe

        plan = plan_recipe(recipe, with_deepspeed_estimate=False)
        if not plan.fits:
            raise ValueError(plan.refusal())
    if os.environ.get("RAY_ADDRESS") or _ray_initialized():
        connect_ray()  # an existing cluster: what its other nodes must see is checked before any run or worker
        check_shared_storage(recipe)
    runs = _Runs(recipe)
    _log_json_artifact(runs, runs.parent_id, recipe.model_dump(mode="json", exclude={"s3"}), "recipe.json")
    done: dict[str, StageOutcome] = {}
    outcomes = []
    for stage in recipe.stages:
        previous = _read_result(recipe, stage)
        if previous is not None and previous.status == "FINISHED":
            logger.info("stage %s finished before: reusing its outputs (run %s)", stage.name, previous.run_id)
            done[stage.name] = previous
            outcomes.append(StageOutcome(**{**asdict(previous), "status": "SKIPPED"}))
            events.stage_skipped(outcomes[-1])
            continue
        if stages and stage.name not in stages:
            continue
        connect_ray()
        run_id = runs.stage_run(stage)
        logger.info("stage %s (%s): MLflow run %s", stage.name, stage.kind, run_id)
        events.stage_started(stage.name, stage.kind, run_id)
        try:
            if stage.kind == "eval":
                outcome = _eval_stage(recipe, stage, runs, run_id, done)
            else:
                outcome = _train_stage(recipe, stage, runs, run_id, done)
        except BaseException as err:
            # Stopped — `ray job stop` sends SIGTERM, which ray.init's handler turns into SystemExit; Ctrl-C —
            # marks the runs KILLED, any other error FAILED. Either way a re-run resumes them from the checkpoint.
            status = "KILLED" if isinstance(err, (SystemExit, KeyboardInterrupt)) else "FAILED"
            events.stage_failed(stage.name, err)
            runs.finish(run_id, status=status)
            runs.finish(runs.parent_id, status=status)
            raise
        runs.finish(run_id, tags={"revcol.checkpoint_uri": outcome.checkpoint_uri, "revcol.export_uri": outcome.export_uri})
        _write_result(recipe, stage, outcome)
        done[stage.name] = outcome
        outcomes.append(outcome)
        events.stage_finished(outcome)
    runs.finish(runs.parent_id)
    return outcomes
