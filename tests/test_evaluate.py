"""Evaluation on Ray Train workers: the ``eval`` stage (2 workers, every sample once, raw/EMA never chosen on the
test split) and ``revcol eval`` on local and S3 weights; plus the choice rule, the ``weights`` recipe key and the
weights check, which need no cluster.

The weights are real RevCol models whose classifier always answers one class (raw: class 0, EMA: class 1); the
validation shards hold mostly 0s and the test shards mostly 1s, so EMA wins on the test split and raw on the
validation data, and which one a stage reports shows what it chose on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import revcol
from pipeline.config import RecipeError, parse_recipe
from pipeline.evaluate import choose_weights
from pipeline.train.weights import MODEL_METADATA_KEY, model_spec

REPO = Path(__file__).resolve().parent.parent
COUNTS = {"val": {"0": 30, "1": 10}, "test": {"0": 10, "1": 30}}
"""Images per class of each split: a constant answer scores 0.75 on one split and 0.25 on the other."""


def _constant_state(answer: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {k: v.clone().contiguous() for k, v in revcol.create_model("revcol_test", num_classes=2).state_dict().items()}
    state["cls.classifier.1.weight"].zero_()
    state["cls.classifier.1.bias"].copy_(torch.tensor([5.0, -5.0] if answer == 0 else [-5.0, 5.0]))
    return state


def _export(path: Path, answer: int, *, record_model: bool = True) -> str:
    metadata = {MODEL_METADATA_KEY: json.dumps({"name": "revcol_test", "overrides": {}})} if record_model else None
    save_file(_constant_state(answer), path, metadata=metadata)
    return str(path)


@pytest.fixture(scope="module")
def skewed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Shards of digits 0 and 1 in the proportions of ``COUNTS``: ``{split: shards folder}``."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline.data.shards import write_shards

    root = tmp_path_factory.mktemp("skewed")
    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    out = {}
    for split, counts in COUNTS.items():
        for label, count in counts.items():
            ids = np.flatnonzero(digits.target == int(label))[: count] if split == "val" else \
                np.flatnonzero(digits.target == int(label))[-count:]
            for i in ids:
                target = root / "images" / split / label / f"{i:04d}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(target)
        write_shards(str(root / "images" / split), str(root / split), shard_size=16, progress=False)
        out[split] = str(root / split)
    return out


# --------------------------------------------------------------------------------------- no cluster needed
def test_choice_follows_the_rule_never_the_test_scores() -> None:
    both = ["raw", "ema"]
    selection = {"raw": {"val/top1": 0.9}, "ema": {"val/top1": 0.8}}
    assert choose_weights("auto", available=both, selection=selection).weights == "raw"
    selection["ema"]["val/top1"] = 0.95
    choice = choose_weights("auto", available=both, selection=selection)
    assert choice.weights == "ema" and "validation" in choice.reason
    selection["ema"]["val/top1"] = 0.9
    assert choose_weights("auto", available=both, selection=selection).weights == "raw"  # a tie: raw
    assert choose_weights("auto", available=["raw"]).weights == "raw"
    no_val = choose_weights("auto", available=both, no_selection="source stage 'finetune' has no validation data")
    assert no_val.weights == "raw" and "no validation data" in no_val.reason
    assert choose_weights("ema", available=both).weights == "ema"
    with pytest.raises(ValueError, match="ema"):
        choose_weights("ema", available=["raw"])


def _two_stages(**eval_stage) -> dict:
    return {"name": "w", "stages": [
        {"name": "finetune", "kind": "finetune", "data": {"train": "/x/train", "val": "/x/val"}},
        {"name": "eval", "kind": "eval", "init_from": "finetune", "data": {"val": "/x/test"}, **eval_stage},
    ]}


def test_weights_key_is_checked_at_load() -> None:
    assert parse_recipe(_two_stages()).stages[1].weights == "auto"
    with pytest.raises(RecipeError, match="weights"):
        parse_recipe(_two_stages(weights="best"))
    with pytest.raises(RecipeError, match=r"stages\.1\.weights: 'ema'.*ema_decay"):
        parse_recipe(_two_stages(weights="ema"))  # the finetune stage keeps no EMA
    recipe = _two_stages(weights="ema")
    recipe["stages"][0]["regularize"] = {"ema_decay": 0.99}
    assert parse_recipe(recipe).stages[1].weights == "ema"
    recipe["stages"][0]["weights"] = "raw"
    with pytest.raises(RecipeError, match="eval stages only"):
        parse_recipe(recipe)
    local = _two_stages(init_from="exports/w.safetensors")  # read by the workers, in folders of Ray's
    assert parse_recipe(local).stages[1].init_from == str(Path("exports/w.safetensors").absolute())


def test_weights_check_names_what_is_wrong(tmp_path: Path) -> None:
    recorded = _export(tmp_path / "recorded.safetensors", 0)
    spec = model_spec(recorded)  # the variant from the export's metadata, classes from its head
    assert (spec.name, spec.num_classes, spec.intersup) == ("revcol_test", 2, False)
    bare = _export(tmp_path / "bare.safetensors", 0, record_model=False)
    with pytest.raises(ValueError, match="do not record their model.*--model"):
        model_spec(bare)
    with pytest.raises(ValueError, match=r"do not fit model 'revcol_tiny' \(they record 'revcol_test'\)"):
        model_spec(recorded, model="revcol_tiny")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        model_spec(str(tmp_path / "nowhere.safetensors"))
    torch.save({"model": {f"module.{k}": v for k, v in _constant_state(1).items()}, "epoch": 3}, tmp_path / "r.pth")
    assert model_spec(str(tmp_path / "r.pth"), model="revcol_test").num_classes == 2  # the release's layout


# ------------------------------------------------------------------------------------ on a local Ray cluster
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             log_to_driver=True, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_eval_stage_runs_on_two_workers_and_chooses_on_validation(ray_cluster, skewed, tmp_path: Path) -> None:
    """The finetune stage (finished before: its outputs are reused) left raw weights that answer 0 and EMA weights
    that answer 1. On the test split EMA scores 0.75 and raw 0.25; on the finetune stage's validation data raw
    scores 0.75: ``weights: auto`` reports raw. Both run on 2 Ray Train workers (not this process), every test
    sample counted once."""
    from mlflow.artifacts import download_artifacts
    from mlflow.tracking import MlflowClient

    from pipeline.stages import StageOutcome, _write_result, run_pipeline

    storage, tracking = str(tmp_path / "runs"), f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = {"batch_size": 16, "image_size": 32}
    recipe = parse_recipe({
        "name": "evalchoice", "storage_path": storage, "tracking": {"uri": tracking},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "stages": [
            {"name": "finetune", "kind": "finetune", "data": {**data, "train": skewed["val"], "val": skewed["val"]},
             "model": {"name": "revcol_test"}, "regularize": {"ema_decay": 0.9}},
            {"name": "eval", "kind": "eval", "init_from": "finetune", "data": {**data, "val": skewed["test"]},
             "model": {"name": "revcol_test"}},
        ],
    })
    _write_result(recipe, recipe.stages[0], StageOutcome(
        stage="finetune", kind="finetune", status="FINISHED",
        export_uri=_export(tmp_path / "raw.safetensors", 0), ema_export_uri=_export(tmp_path / "ema.safetensors", 1),
    ))
    outcomes = {o.stage: o for o in run_pipeline(recipe)}
    assert outcomes["finetune"].status == "SKIPPED"
    evaluated = outcomes["eval"]
    assert evaluated.metrics["val/top1"] == pytest.approx(0.25)  # raw, although EMA scores 0.75 here
    assert evaluated.metrics["ema/val/top1"] == pytest.approx(0.75)
    assert evaluated.metrics["selection/raw/val/top1"] == pytest.approx(0.75)
    assert evaluated.metrics["val/samples"] == sum(COUNTS["test"].values())  # each sample once, padding not counted

    run = MlflowClient(tracking).get_run(evaluated.run_id)
    assert run.data.tags["revcol.weights"] == "raw"
    assert "validation data" in run.data.tags["revcol.weights_reason"]
    results = json.loads(Path(download_artifacts(run_id=evaluated.run_id, artifact_path="eval_results.json",
                                                 tracking_uri=tracking, dst_path=str(tmp_path))).read_text())
    assert results["reported"] == "raw" and results["choice"]["rule"] == "auto"
    assert results["world_size"] == 2
    assert len(set(results["worker_pids"])) == 2 and os.getpid() not in results["worker_pids"]
    assert {name: r["val/samples"] for name, r in results["results"].items()} == {"raw": 40.0, "ema": 40.0}
    assert results["selection"]["ema"]["val/top1"] == pytest.approx(0.25)


def _revcol_eval(*args: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "eval", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_revcol_eval_refuses_bad_input_before_starting_ray(skewed, tmp_path: Path) -> None:
    weights = _export(tmp_path / "w.safetensors", 1)
    missing = _revcol_eval(str(tmp_path / "nope.safetensors"), "--data", skewed["test"])
    assert missing.returncode == 2 and "nope.safetensors" in missing.stderr and "not found" in missing.stderr
    shards = _revcol_eval(weights, "--data", str(tmp_path / "no-shards"))
    assert shards.returncode == 2 and "no-shards" in shards.stderr
    mismatch = _revcol_eval(weights, "--data", skewed["test"], "--model", "revcol_small")
    assert mismatch.returncode == 2 and "'revcol_small'" in mismatch.stderr
    assert "Started a local Ray instance" not in missing.stderr + shards.stderr + mismatch.stderr


@pytest.mark.slow
def test_revcol_eval_local_weights_with_mlflow(skewed, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _export(tmp_path / "w.safetensors", 1)
    proc = _revcol_eval("w.safetensors", "--data", skewed["test"], "--batch-size", "16",  # relative to the cwd
                        "--image-size", "32", "--tracking-uri", tracking, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["model"] == "revcol_test" and summary["world_size"] == 1  # the model from the export's metadata
    assert summary["metrics"]["val/top1"] == pytest.approx(0.75) and summary["metrics"]["val/samples"] == 40
    run = MlflowClient(tracking).get_run(summary["run_id"])
    assert run.data.metrics["val/top1"] == pytest.approx(0.75) and run.data.params["model"] == "revcol_test"


@pytest.mark.slow
def test_revcol_eval_official_checkpoint_on_s3(skewed, s3_server, s3_bucket, s3_env, tmp_path: Path) -> None:
    """A checkpoint in the release's layout (``{"model": state_dict}``, ``module.`` prefixes) read from S3."""
    path = tmp_path / "revcol_test_1k.pth"
    torch.save({"model": {f"module.{k}": v for k, v in _constant_state(0).items()}, "epoch": 3}, path)
    s3_server.client().upload_file(str(path), s3_bucket, "ckpt/revcol_test_1k.pth")
    weights = f"s3://{s3_bucket}/ckpt/revcol_test_1k.pth"
    proc = _revcol_eval(weights, "--data", skewed["test"], "--model", "revcol_test", "--workers", "2",
                        "--batch-size", "16", "--image-size", "32", "--json", env={**s3_env, "MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["metrics"]["val/top1"] == pytest.approx(0.25) and summary["metrics"]["val/samples"] == 40
    assert summary["world_size"] == 2 and summary["run_id"] is None
