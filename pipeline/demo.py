"""`revcol demo`: the embedded default — the whole chain on real data that ships with scikit-learn.

1. Splits the 1,797 bundled 8×8 digits (stratified, seeded) into pretrain / val / finetune / test image folders;
   the pretrain folder holds every image in its four rotations labelled digit×rotation (its own 40-class task).
   ``val`` is the finetune data's validation part (what the eval stage chooses raw or EMA weights on); ``test`` is
   only ever evaluated.
2. Writes them as WebDataset shards with ``revcol shards write`` (resumable: a re-run reuses them).
3. Runs ``jobs/demo_digits.yaml`` — pretrain → finetune (from the pretrained weights) → scratch (the same
   finetune without pretraining, the baseline) → scratch_eval and eval (each on the test split) — on a local Ray
   cluster with 2 Ray Train workers under DeepSpeed, local storage and a local MLflow store.
4. Prints a summary (stage, MLflow run id, samples/s, top-1) and the command that opens the MLflow UI on it.

With ``--services`` (``run_demo(services=True)``) the same chain runs the way a cluster does, against real servers
on 127.0.0.1 (:mod:`pipeline.services`, as ``infra/local/services.sh`` starts them): checkpoints and exports in an S3
server (``s3://revcol-demo/demo``), tracking on an MLflow server (SQLite in ``WORKDIR/services/mlflow.db``,
artifacts in the same S3). Both stop when the demo ends; the S3 data lives in memory and goes with them.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.console import StageEvents

__all__ = ["prepare_digits", "run_demo"]

logger = logging.getLogger(__name__)

RECIPE = Path(__file__).resolve().parent.parent / "jobs" / "demo_digits.yaml"
SPLITS = {"pretrain": 0.55, "val": 0.05, "finetune": 0.2, "test": 0.2}
"""Fractions of each digit's images, cut in this order: ``val`` comes out of what pretraining had, so finetune and
test hold the same images as before it existed."""
SERVICES_BUCKET = "revcol-demo"
"""The bucket of ``--services``: checkpoints and exports under ``s3://revcol-demo/demo``."""


def _split_indices(labels: np.ndarray, *, seed: int) -> dict[str, np.ndarray]:
    """Stratified split of sample indices by ``SPLITS`` (same seed, same split)."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {name: [] for name in SPLITS}
    for digit in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        cuts = np.round(np.cumsum(list(SPLITS.values())) * len(idx)).astype(int)
        for name, lo, hi in zip(SPLITS, [0, *cuts[:-1]], cuts, strict=True):
            parts[name].extend(idx[lo:hi].tolist())
    return {name: np.array(sorted(ids)) for name, ids in parts.items()}


def prepare_digits(workdir: Path, *, seed: int = 0, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Writes the demo's three image folders and their shards under ``workdir``; returns the manifests."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline.data.shards import write_shards

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (N, 8, 8), 0..255
    manifests = {}
    for name, idx in _split_indices(digits.target, seed=seed).items():
        folder = workdir / "images" / name
        if not (folder / ".complete").exists():
            for i in idx:
                rotations = range(4) if name == "pretrain" else [0]
                for r in rotations:
                    label = f"d{digits.target[i]}_r{90 * r}" if name == "pretrain" else str(digits.target[i])
                    target = folder / label / f"{i:04d}.png"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(np.rot90(images[i], r).copy(), mode="L").save(target)
            (folder / ".complete").touch()
        manifests[name] = write_shards(str(folder), str(workdir / "shards" / name), shard_size=400, seed=seed,
                                       progress=progress)
    return manifests


def _overrides(workdir: Path) -> list[str]:
    """Points the recipe's relative ``runs/demo`` paths at ``workdir``."""
    import yaml

    raw = yaml.safe_load(RECIPE.read_text())
    sets = [f"storage_path={workdir / 'storage'}", f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}"]
    for stage in raw["stages"]:
        for split in ("train", "val"):
            value = stage.get("data", {}).get(split)
            if value:
                sets.append(f"stages.{stage['name']}.data.{split}={workdir / Path(value).relative_to('runs/demo')}")
    return sets


@contextlib.contextmanager
def _local_services(workdir: Path, events: StageEvents) -> Iterator[list[str]]:
    """Starts an S3 server and an MLflow server (a new ``WORKDIR/services/mlflow.db``) on 127.0.0.1 for the demo;
    yields the recipe overrides that point storage and tracking at them. The S3 server's AWS variables are exported
    for this process (and so for the local Ray it starts) until both servers stop."""
    from pipeline.services import MLflowServer, S3Server

    folder = workdir / "services"
    # The last run's S3 data went with its server: its MLflow runs would be continued without their checkpoints.
    (folder / "mlflow.db").unlink(missing_ok=True)
    with S3Server(log_dir=folder) as s3, MLflowServer(s3, folder) as mlflow:
        s3.create_bucket(SERVICES_BUCKET)
        events.note(f"services: s3 (moto) up at {s3.endpoint_url} (pid {s3.pid}), "
                    f"mlflow up at {mlflow.tracking_uri} (pid {mlflow.pid}); both stop when the demo ends")
        saved = {key: os.environ.get(key) for key in s3.env()}
        os.environ.update(s3.env())
        try:
            yield [f"storage_path=s3://{SERVICES_BUCKET}/demo", f"tracking.uri={mlflow.tracking_uri}"]
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def run_demo(*, workdir: str | Path = "runs/demo", overrides: list[str] | None = None, seed: int = 0,
             progress: bool = True, services: bool = False, stages: list[str] | None = None,
             events: StageEvents | None = None) -> dict[str, Any]:
    """Prepares the data, runs the demo chain and returns its summary (what ``--json`` prints).

    Args:
        workdir: where shards, checkpoints and the MLflow store go.
        overrides: extra ``key=value`` recipe overrides (e.g. fewer epochs).
        seed: seed of the data split.
        progress: show progress bars while writing shards.
        services: run against a local S3 server (storage) and MLflow server (tracking) started for the demo and
            stopped after it, instead of local storage and a local MLflow store. Needs a local Ray (not
            ``RAY_ADDRESS``): the S3 variables reach the workers through this process's environment.
        stages: run only these stages (and reuse those finished before); None: all of them.
        events: hears the data being ready and each stage start and end (the command line's console).
    """
    from pipeline.config import load_recipe
    from pipeline.stages import run_pipeline

    workdir = Path(workdir).resolve()
    if services and os.environ.get("RAY_ADDRESS"):
        raise ValueError(f"--services starts its own servers for a local Ray; unset RAY_ADDRESS "
                         f"({os.environ['RAY_ADDRESS']!r}) or point the recipe at shared services with --set")
    events = events or StageEvents()
    manifests = prepare_digits(workdir, seed=seed, progress=progress)
    events.note("data: " + ", ".join(f"{name} {m['num_samples']} images" for name, m in manifests.items())
                + f", as shards in {workdir / 'shards'}")
    with contextlib.ExitStack() as stack:
        sets = _overrides(workdir)
        if services:
            sets += stack.enter_context(_local_services(workdir, events))
        recipe = load_recipe(RECIPE, [*sets, *(overrides or [])])
        outcomes = run_pipeline(recipe, stages=stages, events=events)
    summary = {
        "recipe": recipe.name,
        "tracking_uri": recipe.tracking.uri,
        "stages": {
            o.stage: {"run_id": o.run_id, "status": o.status, "samples_per_s": o.samples_per_s,
                      "top1": o.metrics.get("val/top1"), "metrics": o.metrics}
            for o in outcomes
        },
        "mlflow_ui": f"mlflow ui --backend-store-uri {recipe.tracking.uri}",
    }
    if services:  # the server is gone; its runs stay in its SQLite store (their artifacts went with the S3 data)
        summary["tracking_uri"] = f"sqlite:///{workdir / 'services' / 'mlflow.db'}"
        summary["storage_path"] = recipe.storage_path
        summary["mlflow_ui"] = f"mlflow ui --backend-store-uri {summary['tracking_uri']}"
    summary["mlflow_runs_page"] = _runs_page(summary["tracking_uri"], recipe.tracking.experiment or recipe.name)
    _print_summary(summary)
    return summary


def _runs_page(tracking_uri: str, experiment: str) -> str:
    """The experiment's runs in the model-training view of ``mlflow ui`` (default address). MLflow 3.17's UI picks
    its view from a switch kept in the browser, GenAI unless set; ``workflowType`` in the link sets it."""
    from mlflow.tracking import MlflowClient

    found = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else "0"
    return f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _print_summary(summary: dict[str, Any]) -> None:
    rows = [("stage", "MLflow run", "status", "samples/s", "top-1")]
    for name, s in summary["stages"].items():
        rate = f"{s['samples_per_s']:.0f}" if s["samples_per_s"] else "-"
        top1 = f"{s['top1']:.2%}" if s["top1"] is not None else "-"
        rows.append((name, s["run_id"] or "-", s["status"], rate, top1))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    stages = summary["stages"]
    if stages.get("eval", {}).get("top1") is not None and stages.get("scratch_eval", {}).get("top1") is not None:
        gain = stages["eval"]["top1"] - stages["scratch_eval"]["top1"]
        print(f"pretraining gain on held-out digits: {gain:+.2%} top-1 (eval vs scratch_eval: finetune vs scratch, "
              f"each with the weights chosen on val)")
    print(f"open the runs: {summary['mlflow_ui']}, then {summary['mlflow_runs_page']}")
