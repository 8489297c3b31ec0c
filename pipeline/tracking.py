"""Experiment tracking behind a small interface: MLflow for real runs, a no-op tracker for the other ranks.

Only rank 0 logs (the gating is here, not at call sites). The MLflow tracker

* never logs a metric step twice: on start it reads, per metric, the last step already logged to the run (a
  restarted worker resumes from a checkpoint *before* that step) and drops steps up to it;
* keeps training going when the tracking server is unreachable: metrics are buffered, a warning is printed once,
  and delivery is retried; whatever is still undelivered when training ends is written to a JSONL file in the
  run's storage folder, and the driver replays it into the run as soon as the server answers again;
* logs params as the flattened resolved recipe with secrets removed.

Also here, for driver and workers alike: the experiment is created as a model-training experiment
(:func:`training_experiment`), and :func:`system_metrics_monitor` starts MLflow's own system-metrics sampler.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import TrackingConfig

__all__ = [
    "EXPERIMENT_KIND_TAG",
    "MLflowTracker",
    "NullTracker",
    "Tracker",
    "flatten_params",
    "log_new_params",
    "redact",
    "start_run",
    "system_metrics_monitor",
    "training_experiment",
]

logger = logging.getLogger(__name__)

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
"""MLflow 3's type of an experiment; ``custom_model_development`` = model training (runs, datasets, models), not
GenAI (traces). MLflow 3.17's UI follows a GenAI / Model training switch of its own (in the browser, or
``?workflowType=machine_learning`` in a link) and reads the tag where that switch is off."""
_MODEL_TRAINING = "custom_model_development"

_SECRET = re.compile(r"(secret|password|passwd|token|access_key|api_key|credential|private)", re.IGNORECASE)
REDACTED = "***"


class Tracker(Protocol):
    """What the training loop logs through: metrics by step, then a close that reports delivery."""

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None: ...

    def close(self, *, timeout: float = 30.0) -> bool: ...


class NullTracker:
    """Logs nothing (ranks other than 0, tracking switched off)."""

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        pass

    def close(self, *, timeout: float = 0.0) -> bool:
        return True


def redact(value: Any, key: str = "") -> Any:
    """Returns ``value`` with every entry whose key looks like a secret replaced by ``***`` (recursively)."""
    if key and _SECRET.search(key) and value not in (None, ""):
        return REDACTED
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, key) for v in value]
    return value


def flatten_params(config: Mapping[str, Any], *, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}} -> {"a.b": "1"}``, secrets removed, values as MLflow-sized strings."""
    flat: dict[str, str] = {}
    for key, value in redact(dict(config)).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, prefix=f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for i, item in enumerate(value):
                label = item.get("name") or item.get("kind") or str(i)
                flat.update(flatten_params(item, prefix=f"{name}.{label}."))
        else:
            flat[name] = json.dumps(value, default=str)[:6000] if not isinstance(value, str) else value[:6000]
    return flat


class MLflowTracker:
    """Logs to one existing MLflow run (created by the driver), resilient to tracking-server outages.

    Args:
        tracking_uri: the MLflow tracking URI.
        run_id: the run to log into.
        fallback_dir: where undelivered metrics go at ``close()`` if the server is still unreachable.
        retry_s: minimum seconds between delivery attempts while the server is down.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, fallback_dir: str | Path | None = None, retry_s: float = 10.0):
        from mlflow.tracking import MlflowClient

        # MLflow's HTTP client retries for minutes by default; we buffer instead, so fail fast (unless set)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id
        self.fallback_dir = Path(fallback_dir) if fallback_dir else None
        self.retry_s = retry_s
        self._pending: list[Any] = []
        self._down_since: float | None = None
        self._last_attempt = 0.0
        self._warned = False
        self.last_steps = self._last_steps()

    def _last_steps(self) -> dict[str, int]:
        """Per metric, the highest step already logged to the run: steps up to it are not logged again."""
        try:
            keys = list(self.client.get_run(self.run_id).data.metrics)
            return {k: max(m.step for m in self.client.get_metric_history(self.run_id, k)) for k in keys}
        except Exception as err:  # noqa: BLE001 - tracking must never stop training
            self._note_down(err)
            return {}

    def _note_down(self, err: Exception) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        if not self._warned:
            logger.warning("MLflow tracking unreachable (%s); training continues, metrics are buffered", type(err).__name__)
            self._warned = True

    def _flush(self, *, force: bool = False) -> None:
        if not self._pending:
            return
        now = time.monotonic()
        if self._down_since is not None and not force and now - self._last_attempt < self.retry_s:
            return
        self._last_attempt = now
        try:
            for start in range(0, len(self._pending), 1000):
                self.client.log_batch(self.run_id, metrics=self._pending[start : start + 1000])
        except Exception as err:  # noqa: BLE001
            self._note_down(err)
            return
        if self._down_since is not None:
            logger.warning("MLflow tracking reachable again; delivered %d buffered metric values", len(self._pending))
            self._down_since = None
            self._warned = False
        self._pending.clear()

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        for key, value in metrics.items():
            if step > self.last_steps.get(key, -1):
                self._pending.append(Metric(key, float(value), stamp, step))
                self.last_steps[key] = step
        self._flush()

    def close(self, *, timeout: float = 30.0) -> bool:
        """Delivers what is buffered, retrying for up to ``timeout`` seconds; what is still undelivered then is
        written to ``fallback_dir`` (see :attr:`fallback_path`). Returns whether everything was delivered."""
        deadline = time.monotonic() + timeout
        self._flush(force=True)
        while self._pending and time.monotonic() < deadline:
            time.sleep(min(3.0, max(0.0, deadline - time.monotonic())))
            self._flush(force=True)
        if not self._pending:
            return True
        if self.fallback_dir is not None:
            self.fallback_dir.mkdir(parents=True, exist_ok=True)
            with self.fallback_path.open("a") as f:
                for m in self._pending:
                    f.write(json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n")
            logger.warning("%d metric values could not be delivered to MLflow; saved to %s", len(self._pending),
                           self.fallback_path)
        self._pending.clear()
        return False

    @property
    def fallback_path(self) -> Path:
        """Where undelivered metrics are saved (``fallback_dir/mlflow-undelivered-{run_id}.jsonl``)."""
        return Path(self.fallback_dir or ".") / f"mlflow-undelivered-{self.run_id}.jsonl"


def start_run(
    tracking_uri: str,
    experiment: str,
    *,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Creates an MLflow run on the driver (before the trainers start) and returns its id.

    Args:
        tracking_uri: the tracking server or store.
        experiment: experiment name (created if missing).
        run_name: display name of the run.
        params: a (nested) config; logged flattened, secrets removed.
        tags: run tags.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment_id = training_experiment(client, experiment)
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
    log_new_params(client, run.info.run_id, flatten_params(params or {}))
    return run.info.run_id


def log_new_params(client: Any, run_id: str, params: Mapping[str, Any]) -> None:
    """Logs the params the run does not have yet (MLflow params are write-once), in batches of 100."""
    from mlflow.entities import Param

    existing = client.get_run(run_id).data.params
    new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
    for start in range(0, len(new), 100):
        client.log_batch(run_id, params=new[start : start + 100])


def training_experiment(client: Any, name: str) -> str:
    """The id of experiment ``name``, created as a model-training experiment when missing; an existing one without
    a kind (made before this tag existed) gets it, one whose kind a user chose keeps it.

    Args:
        client: an ``MlflowClient``.
        name: the experiment name.
    """
    found = client.get_experiment_by_name(name)
    if found is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: _MODEL_TRAINING})
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, _MODEL_TRAINING)
    return found.experiment_id


def system_metrics_monitor(tracking: TrackingConfig, run_id: str | None, *, node: str | None = None) -> Any:
    """Starts MLflow's system-metrics sampler for ``run_id`` in a background thread (call ``finish()`` on the
    result); None when ``tracking.system_metrics`` is off or there is no run.

    It samples CPU, memory, disk and network (GPU when ``pynvml`` sees one) every
    ``tracking.system_metrics_interval_s`` seconds and logs ``system/...`` metrics, continuing the run's
    ``system/`` steps on a resumed stage; it stops by itself when the run is no longer RUNNING.

    Args:
        tracking: the recipe's tracking section.
        run_id: the stage run.
        node: names this machine in the metric keys (``system/<node>/...``) when a stage spans several.
    """
    if not tracking.system_metrics or not run_id:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=tracking.system_metrics_interval_s,
                                       resume_logging=True, node_id=node, tracking_uri=tracking.uri)
    except Exception as err:  # noqa: BLE001 - tracking must never stop training
        logger.warning("system metrics not logged: %s", err)
        return None
    monitor.start()
    return monitor
