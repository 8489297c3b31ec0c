"""MLflow 3's own objects for a pipeline's stages, beyond runs and metrics (driver side):

* the **datasets** a stage read, as run inputs (the runs table's Dataset column): one per split, named after the
  shards' folder (a mixture: after its sources, ``upright+rotated``, with each one's shards per epoch in the
  profile), digest = the shards' fingerprint (names, sizes and sha256 of every shard, from the manifests),
  source = the folder or ``s3://`` prefix, profile = samples, classes and shards; input tags: context
  ``training``, ``validation`` or (eval stages) ``evaluation``, and ``revcol.split`` (``train``, ``val``);
* each **exported checkpoint** as an external LoggedModel: an output of its run at its step (the Models column),
  with the run's metrics at that step (``val/*`` tied to the validation dataset), the model config as params and
  the weights' URIs as tags; the weights stay in ``storage_path`` (no copy into the artifact store, only MLflow's
  small ``MLmodel`` file that marks the model external);
* the **candidate**: the final finetune export as a version of the registered model named after the recipe, with
  an alias (``tracking.register_alias``, ``candidate`` by default).

Called again for the same run (a stage re-run after a crash), the functions that make objects — datasets, model
inputs, LoggedModels, registered versions — find what exists instead of adding a second one.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import storage
from pipeline.config import Recipe, StageConfig

if TYPE_CHECKING:
    from pipeline.data.stream import ShardSet

__all__ = ["candidate_stage", "log_datasets", "log_export_model", "log_model_metrics", "register_candidate"]

logger = logging.getLogger(__name__)

WEIGHTS_TAG = "revcol.weights_uri"
EMA_WEIGHTS_TAG = "revcol.ema_weights_uri"
MODEL_TYPE = "revcol"
_CONTEXTS = {"train": "training", "val": "validation"}
_SCHEMA = {"mlflow_colspec": [{"type": "binary", "name": "image", "required": True},
                              {"type": "long", "name": "label", "required": True}]}
"""What a shard sample holds (an encoded image and its class index), as MLflow's column spec."""


def _dataset(shards: ShardSet) -> Any:
    from mlflow.entities import Dataset

    folders = list(shards.folders)
    source = {"uri": folders[0], **({"uris": folders} if len(folders) > 1 else {})}
    profile = {"num_samples": shards.num_samples, "num_classes": shards.num_classes,
               "num_shards": shards.num_shards, "classes": list(shards.classes)}
    if shards.mixture is not None:  # what one epoch reads
        profile.update(num_shards=shards.num_slots, sources=dict(zip(shards.sources, shards.mixture.draws, strict=True)))
    name = "+".join(shards.sources) if shards.sources else folders[0].rstrip("/").rsplit("/", 1)[-1]
    return Dataset(
        name=name, digest=shards.fingerprint,
        source_type="s3" if storage.is_s3_url(folders[0]) else "local", source=json.dumps(source),
        schema=json.dumps(_SCHEMA), profile=json.dumps(profile),
    )


def _model_metric(key: str, value: float, timestamp: int, step: int, *, model_id: str, dataset: Any) -> Any:
    """A metric of the LoggedModel ``model_id`` (and of its run), measured on ``dataset`` when not None."""
    from mlflow.entities import Metric

    return Metric(key, float(value), timestamp, step, model_id=model_id,
                  dataset_name=dataset.name if dataset is not None else None,
                  dataset_digest=dataset.digest if dataset is not None else None)


def log_datasets(client: Any, run_id: str, data: Mapping[str, ShardSet], *, evaluation: bool = False,
                 models: list[str] | None = None) -> None:
    """Records a stage's datasets (and the LoggedModels it started from) as inputs of its run.

    Args:
        client: an ``MlflowClient``.
        run_id: the stage run.
        data: the stage's resolved shards per split (``train``, ``val``).
        evaluation: an eval stage: its ``val`` data is logged with context ``evaluation``.
        models: ids of the LoggedModels the stage's weights came from.
    """
    from mlflow.entities import DatasetInput, InputTag, LoggedModelInput
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    datasets = [
        DatasetInput(_dataset(shards), tags=[
            InputTag(MLFLOW_DATASET_CONTEXT, "evaluation" if evaluation else _CONTEXTS[split]),
            InputTag("revcol.split", split),
        ])
        for split, shards in data.items()
    ]
    known = {m.model_id for m in client.get_run(run_id).inputs.model_inputs}
    new_models = [LoggedModelInput(m) for m in models or [] if m not in known]
    client.log_inputs(run_id, datasets=datasets, models=new_models or None)


def log_model_metrics(client: Any, run_id: str, model_id: str, metrics: Mapping[str, float], *, step: int,
                      dataset: ShardSet | None = None) -> None:
    """Logs ``metrics`` to the run *and* to the LoggedModel ``model_id`` (measured on ``dataset`` when given)."""
    stamp = int(time.time() * 1000)
    tied = _dataset(dataset) if dataset is not None else None
    client.log_batch(run_id, metrics=[_model_metric(key, value, stamp, step, model_id=model_id, dataset=tied)
                                      for key, value in metrics.items()])


def log_export_model(client: Any, *, experiment_id: str, run_id: str, stage: StageConfig, step: int,
                     weights_uri: str, ema_weights_uri: str | None, num_classes: int,
                     val: ShardSet | None = None) -> str:
    """Records a stage's exported checkpoint as an external LoggedModel linked to its run and step; returns its id.

    The model gets the run's metrics at ``step`` (``system/`` ones excepted: their steps count samples of the
    sampler, not training steps), ``val/*`` tied to the ``val`` dataset.

    Args:
        client: an ``MlflowClient``.
        experiment_id: the pipeline's experiment.
        run_id: the stage run that exported.
        stage: the stage (its name names the model; its model section becomes the model's params).
        step: the optimizer step of the checkpoint.
        weights_uri: the exported safetensors (in ``storage_path``).
        ema_weights_uri: the exported EMA weights, when the stage keeps an EMA.
        num_classes: classifier width.
        val: the stage's validation shards.
    """
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.models.utils import get_external_mlflow_model_spec
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    from pipeline.tracking import flatten_params

    run = client.get_run(run_id)
    for output in run.outputs.model_outputs:
        if output.step == step:
            return output.model_id
    tags = {MLFLOW_MODEL_IS_EXTERNAL: "true", WEIGHTS_TAG: weights_uri, "revcol.stage": stage.name}
    if ema_weights_uri:
        tags[EMA_WEIGHTS_TAG] = ema_weights_uri
    params = {**flatten_params(stage.model.model_dump(mode="json")), "num_classes": str(num_classes)}
    model = client.create_logged_model(experiment_id, name=stage.name, source_run_id=run_id, tags=tags,
                                       params=params, model_type=MODEL_TYPE)
    with tempfile.TemporaryDirectory() as tmp:  # MLflow's marker of an external model: a few hundred bytes
        get_external_mlflow_model_spec(model).save(str(Path(tmp) / MLMODEL_FILE_NAME))
        client.log_model_artifacts(model.model_id, tmp)
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step)])
    val_dataset = _dataset(val) if val is not None else None
    rows = []
    for key in run.data.metrics:
        if key.startswith("system/"):
            continue
        measured_on = val_dataset if key.startswith("val/") else None
        rows += [_model_metric(m.key, m.value, m.timestamp, m.step, model_id=model.model_id, dataset=measured_on)
                 for m in client.get_metric_history(run_id, key) if m.step == step]
    for start in range(0, len(rows), 1000):
        client.log_batch(run_id, metrics=rows[start : start + 1000])
    logger.info("stage %s: export at step %d is MLflow model %s (weights stay at %s)", stage.name, step,
                model.model_id, weights_uri)
    return model.model_id


def candidate_stage(recipe: Recipe) -> str | None:
    """The stage whose export is registered: the finetune stage the last eval stage evaluates, else the last
    finetune stage; None when the recipe has no finetune stage (or ``tracking.register_alias`` is null)."""
    if recipe.tracking.register_alias is None:
        return None
    finetunes = [s.name for s in recipe.stages if s.kind == "finetune"]
    evaluated = [s.init_from for s in recipe.stages if s.kind == "eval" and s.init_from in finetunes]
    if evaluated:
        return evaluated[-1]
    return finetunes[-1] if finetunes else None


def register_candidate(client: Any, *, name: str, alias: str, model_id: str, run_id: str) -> str:
    """Registers the LoggedModel ``model_id`` as a new version of registered model ``name`` (created when missing)
    and points ``alias`` at it; a model registered before keeps its version. Returns the version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    model = client.get_logged_model(model_id)
    versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    mine = [v["version"] for v in versions if v["name"] == name]
    if mine:
        return str(mine[-1])
    try:
        client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {k: v for k, v in model.tags.items() if k in (WEIGHTS_TAG, EMA_WEIGHTS_TAG)}
    # Source ``models:/<id>``: what the UI turns into the version's "Source Model" link. A local SQL registry
    # resolves it through the process-wide tracking URI, not the client's (a TODO in MLflow 3.17): point that here.
    with _use_tracking_uri(client.tracking_uri):
        version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                              tags=tags).version
    client.set_registered_model_alias(name, alias, version)
    # what mlflow.register_model records too: the model page links its registered versions
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps([*versions, {"name": name,
                                                                                            "version": version}])})
    logger.info("registered %s version %s (@%s) from model %s", name, version, alias, model_id)
    return str(version)
