"""The training stage on real components: a local Ray cluster (2 Ray Train workers), DeepSpeed engines, a real
MLflow server and the real S3 server as checkpoint storage."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, load_file
from mlflow.tracking import MlflowClient

import revcol
from pipeline.audit import recorded_samples
from pipeline.config import DataConfig, parse_recipe
from pipeline.data.stream.position import epoch_order
from pipeline.data.stream.shard_set import resolve_split
from pipeline.services import MLflowServer
from pipeline.tracking import start_run
from pipeline.train.launch import fit_stage, run_name
from pipeline.train.run_folder import fetch_checkpoint, latest_checkpoint, rank_files_name
from pipeline.train.weights import model_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    import ray

    ray.init(num_cpus=4, include_dashboard=False, _temp_dir=str(tmp_path_factory.mktemp("ray")),
             log_to_driver=True, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def digits(ray_cluster, tmp_path_factory):
    """Digits as shards (train/test splits) and their streams, as a stage builds them."""
    from pipeline.data.shards import write_shards
    from pipeline.data.stream import build_eval_dataset, build_train_dataset

    root = tmp_path_factory.mktemp("digits")
    counts = {split: write_shards("digits", str(root / split), shard_size=200, split=split, progress=False)["num_samples"]
              for split in ("train", "test")}
    data = DataConfig(train=str(root / "train"), val=str(root / "test"), batch_size=32, image_size=32,
                      auto_augment=None, random_erasing=0.0, shuffle_buffer=64)

    def datasets(train_cfg: DataConfig):
        return {"train": build_train_dataset(train_cfg, model_name="revcol_test", data_cpus=1.0),
                "val": build_eval_dataset(data, model_name="revcol_test", batch_size=32, data_cpus=1.0)}

    return {"data": data.model_dump(), "datasets": datasets, "train_samples": counts["train"]}


def _recipe(digits, storage: str, *, name: str, workers: int = 2, **stage):
    base = {
        "kind": "pretrain",
        "data": digits["data"],
        "model": {"name": "revcol_test", "intersup": True, "drop_path_rate": 0.1},
        "optim": {"base_lr": 0.03, "epochs": 1, "warmup_epochs": 0.2, "min_lr": 1e-4},
        "checkpoint": {"interval_steps": 5, "keep": 2},
    }
    for key, value in stage.items():
        base[key] = {**base.get(key, {}), **value}
    return parse_recipe({"name": name, "storage_path": storage,
                         "scaling": {"num_workers": workers, "cpus_per_worker": 0.5}, "stages": [base]})


def _fit(recipe, digits, **kwargs):
    stage = recipe.stages[0]
    kwargs.setdefault("log_every", 5)
    return fit_stage(recipe, stage, datasets=digits["datasets"](stage.data),
                     train_samples=resolve_split(stage.data, "train").num_samples, num_classes=10, **kwargs)


def _s3_objects(s3_server, bucket, prefix=""):
    client = s3_server.client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_zero3_stage_with_mlflow_server_and_s3_storage(digits, mlflow_server, s3_server, s3_bucket, s3_env, tmp_path):
    secret = s3_env["AWS_SECRET_ACCESS_KEY"]
    recipe = _recipe(digits, f"s3://{s3_bucket}/runs", name="zero3", deepspeed={"zero_stage": 3},
                     regularize={"ema_decay": 0.9, "mixup": 0.8, "cutmix": 1.0})
    recipe = recipe.model_copy(update={"s3": recipe.s3.model_copy(update={"secret_access_key": secret})})
    run_id = start_run(mlflow_server.tracking_uri, recipe.name, run_name="pretrain",
                       params=recipe.model_dump(mode="json"), tags={"revcol.stage": "pretrain"})
    result = _fit(recipe, digits, run_id=run_id, tracking_uri=mlflow_server.tracking_uri)
    assert result.error is None
    assert result.metrics["val/top1"] > 0.3  # ten classes, one epoch with mixup: well above chance (0.1)
    assert {f"val/top1_col{k}" for k in range(4)} <= set(result.metrics)

    client = MlflowClient(mlflow_server.tracking_uri)
    run = client.get_run(run_id)
    for key in ("train/loss", "train/lr", "train/grad_norm", "train/samples_per_s", "data/stall_frac", "val/top1"):
        assert key in run.data.metrics, key
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert steps == sorted(set(steps)) and len(steps) >= 3
    # no credentials in params/tags/artifacts
    blob = json.dumps({**run.data.params, **run.data.tags})
    assert secret not in blob and "s3.secret_access_key" in run.data.params

    keys = _s3_objects(s3_server, s3_bucket, f"runs/{run_name(recipe, recipe.stages[0])}/")
    exports = [k for k in keys if k.endswith("export/model.safetensors")]
    assert exports and any(k.endswith("trainer_state.json") for k in keys)
    assert any("zero_pp_rank_1" in k for k in keys)  # both ranks' ZeRO-3 shards made it into the checkpoint
    folders = {k.split("/")[2] for k in keys if k.count("/") > 2}
    assert len({f for f in folders if f.startswith("checkpoint_")}) == 2  # checkpoint.keep
    best = f"best_step{result.metrics['step']:09d}"  # one validation, at the end: the last checkpoint is the best
    assert {f for f in folders if f.startswith("best_")} == {best}
    assert any(k.split("/")[2] == best and "zero_pp_rank_1" in k for k in keys)
    body = s3_server.client().get_object(Bucket=s3_bucket, Key=exports[-1])["Body"].read()
    model = revcol.create_model("revcol_test", num_classes=10, intersup=True)
    model.load_state_dict(load(body))  # consolidated, loadable without DeepSpeed
    spec = model_spec(f"s3://{s3_bucket}/{exports[-1]}")  # the export records its model (header only, from S3)
    assert (spec.name, spec.num_classes, spec.intersup) == ("revcol_test", 10, True)
    body = s3_server.client().get_object(Bucket=s3_bucket, Key=exports[-1].replace("model.", "ema."))["Body"].read()
    ema = load(body)
    assert set(ema) == set(model.state_dict()) - {k for k, _ in model.named_buffers()}

    # a resuming rank fetches its own ZeRO-3 shards and the common files, not the other rank's nor the export
    latest = latest_checkpoint(recipe, recipe.stages[0])
    for rank in (0, 1):
        fetched = _files(fetch_checkpoint(latest, tmp_path / f"rank{rank}", rank=rank, world_size=2, s3=recipe.s3))
        owners = {int(m.group(1)) for n in fetched if (m := re.search(r"(?:rng_rank|zero_pp_rank_)(\d+)", n))}
        assert owners == {rank}, fetched  # nothing of the other rank's
        shards = {n.rsplit("mp_rank_00_", 1)[-1] for n in fetched if f"zero_pp_rank_{rank}_" in n}
        assert shards == {"model_states.pt", "optim_states.pt"}, fetched
        assert {"trainer_state.json", "ema.safetensors", rank_files_name(rank)} <= fetched
        assert not any(n.startswith("export/") for n in fetched)
    # on another world size: the consolidated weights only
    fetched = _files(fetch_checkpoint(latest, tmp_path / "world1", rank=0, world_size=1, s3=recipe.s3))
    assert fetched == {"trainer_state.json", "ema.safetensors", "export/model.safetensors"}


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_resume_onto_fewer_workers(digits, tmp_path, capfd):
    """Resuming a 2-worker ZeRO-2 run on 1 worker restores the checkpoint's weights exactly (consolidated) and
    starts the optimizer state afresh (ZeRO's optimizer shards are tied to the world size), as
    ``pipeline.train.checkpoint`` documents. The resumed steps run at a learning rate of 1e-20, which moves no
    weight by more than ~1e-19 in 4 AdamW steps (each moves a weight by lr * |m / sqrt(v)|, a few lr at most), so
    the resumed run's final weights are the restored ones to 1e-15; a weight restored wrongly (the fresh
    initialization, another checkpoint, a shard of it) differs by far more than 1e-6."""
    storage = str(tmp_path / "runs")
    first = _fit(_recipe(digits, storage, name="reshard", optim={"max_steps": 10}, deepspeed={"zero_stage": 2}), digits)
    assert first.error is None and first.metrics["step"] == 10
    saved = load_file(f"{first.checkpoint.path}/export/model.safetensors")
    # same run name, one worker, longer: resumes from step 10 with consolidated weights
    frozen = {"max_steps": 14, "base_lr": 1e-20, "min_lr": 0.0, "warmup_lr": 0.0, "warmup_epochs": 0,
              "schedule": "constant"}
    recipe = _recipe(digits, storage, name="reshard", workers=1, optim=frozen, deepspeed={"zero_stage": 2})
    second = _fit(recipe, digits)
    assert second.error is None and second.metrics["step"] == 14
    logs = "".join(capfd.readouterr())
    assert "rank 0 resumed at step 10" in logs
    assert "was written by 2 workers, resuming on 1: loading consolidated weights, optimizer state starts afresh" in logs
    state = json.loads(open(f"{second.checkpoint.path}/trainer_state.json").read())
    assert state["world_size"] == 1 and state["step"] == 14

    restored = load_file(f"{second.checkpoint.path}/export/model.safetensors")
    assert set(restored) == set(saved)
    worst = max((restored[k] - v).abs().max().item() for k, v in saved.items())
    assert worst <= 1e-15, worst
    # ...and its AdamW state is the fresh one of the 4 resumed steps, not the 2-worker run's (14 would mean a shard
    # of the old state was loaded onto a world it does not fit)
    assert _adam_steps(second.checkpoint.path) == {4}


def test_resume_on_one_worker_keeps_the_schedule(digits, tmp_path):
    """Progress is counted in samples: a 2-worker run stopped in its warmup and resumed on 1 worker continues the
    LR schedule at the same point of training (the LR over the batch scaling is one function of samples seen
    across both runs) and ends after the samples the 2-worker run would have trained. The schedule is flat after
    warmup because ``max_steps`` (the stop) also sets the first run's cosine horizon."""
    from pipeline.train.optim import build_scheduler

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(tracking, "schedule", run_name="pretrain")
    optim = {"epochs": 2, "warmup_epochs": 0.5, "base_lr": 0.03, "warmup_lr": 1e-4, "schedule": "constant"}
    storage = str(tmp_path / "runs")
    first = _fit(_recipe(digits, storage, name="schedule", optim={**optim, "max_steps": 6}), digits,
                 run_id=run_id, tracking_uri=tracking, log_every=1)
    assert first.error is None and first.metrics["step"] == 6
    recipe = _recipe(digits, storage, name="schedule", workers=1, optim=optim)
    second = _fit(recipe, digits, run_id=run_id, tracking_uri=tracking, log_every=1)
    assert second.error is None
    per_epoch = digits["train_samples"] // 64 * 64  # what one pass of 2 workers × 32 trains
    state = json.loads(open(f"{second.checkpoint.path}/trainer_state.json").read())
    assert state["samples"] == 2 * per_epoch and state["step"] == 6 + (2 * per_epoch - 6 * 64) // 32

    reference = build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim["base_lr"]),
                                recipe.stages[0].optim, total_samples=2 * per_epoch,
                                warmup_samples=round(0.5 * per_epoch), lr_factor=1.0)
    history = {m.step: m.value for m in MlflowClient(tracking).get_metric_history(run_id, "train/lr")}
    assert sorted(history) == list(range(1, state["step"] + 1))
    for step, lr in history.items():
        batch, samples = (64, step * 64) if step <= 6 else (32, 6 * 64 + (step - 6) * 32)
        reference.step_update(samples)
        expected = reference.optimizer.param_groups[0]["lr"] * batch / 1024  # the recipe's batch scaling
        assert lr == pytest.approx(expected, rel=1e-6), (step, lr, expected)


def _adam_state(checkpoint: str) -> dict[int, dict[str, torch.Tensor]]:
    """Rank 0's AdamW state (per parameter, or per flat group under ZeRO: step, exp_avg, exp_avg_sq) in a
    checkpoint: ZeRO keeps it in each rank's optimizer shard, ZeRO-0 with the model states."""
    from pipeline.train.checkpoint import DS_TAG

    folder = Path(checkpoint) / "deepspeed" / DS_TAG
    shard = folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    # DeepSpeed pickles its loss scaler and config objects into these files (it loads them so too): our own files
    if shard.exists():
        return torch.load(shard, weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
    return torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["optimizer"]["state"]


def _adam_steps(checkpoint: str) -> set[int]:
    return {int(group["step"]) for group in _adam_state(checkpoint).values()}


@pytest.mark.parametrize("workers, shuffle_buffer, mid_epoch", [
    pytest.param(2, 64, False, id="2-workers-stop-at-epoch-end"),
    pytest.param(1, 0, True, id="1-worker-no-shuffle-buffer-stop-mid-epoch"),
])
def test_resumed_run_matches_an_uninterrupted_one(digits, tmp_path, capfd, workers, shuffle_buffer, mid_epoch):
    """A run stopped (``max_steps``) and resubmitted reaches the same loss at step N, and the same weights, as one
    that ran straight through. The LR schedule is flat after warmup so that both runs' schedules agree (cosine's
    horizon depends on ``max_steps``). Mid-epoch this holds only for one worker without a shuffle buffer: the
    resumed pass reads the epoch's remaining samples, which 2 workers split and a shuffle buffer mixes otherwise
    than the uninterrupted pass did."""
    per_epoch = digits["train_samples"] // (workers * 32)
    stop = 10 if mid_epoch else per_epoch
    step_n = stop + 5 - stop % 5  # the first checkpoint (interval 5) after the stop

    def recipe(name, max_steps):
        return _recipe(digits, str(tmp_path / "runs"), name=name, workers=workers,
                       data={"shuffle_buffer": shuffle_buffer},
                       optim={"epochs": 3, "max_steps": max_steps, "schedule": "constant"})

    straight = _fit(recipe("straight", step_n + 1), digits)
    stopped = _fit(recipe("resumed", stop), digits)
    assert stopped.metrics["step"] == stop
    resumed = _fit(recipe("resumed", step_n + 1), digits)
    assert f"rank 0 resumed at step {stop}" in "".join(capfd.readouterr())

    def loss_at(result, step):
        return next(m["train/loss"] for _, m in result.best_checkpoints if m["step"] == step)

    assert loss_at(resumed, step_n) == pytest.approx(loss_at(straight, step_n), rel=1e-6, abs=1e-7)
    weights = [load_file(f"{r.checkpoint.path}/export/model.safetensors") for r in (straight, resumed)]
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, msg=key)
    if workers == 2:  # each rank draws its own randomness (drop-path masks) and resumes its own RNG states
        states = [torch.load(f"{straight.checkpoint.path}/rng_rank{r}.pt", weights_only=True)["torch"] for r in (0, 1)]
        assert not torch.equal(*states)
    # the resumed run continued the checkpoint's AdamW state (a fresh one would count fewer steps and differ)
    adam = [_adam_state(r.checkpoint.path) for r in (straight, resumed)]
    assert adam[0].keys() == adam[1].keys() and _adam_steps(resumed.checkpoint.path) == {step_n + 1}
    for group, state in adam[0].items():
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(adam[1][group][name], state[name], msg=f"group {group} {name}")


def test_mlflow_outage_buffers_and_delivers(digits, s3_server, tmp_path, capfd):
    server = MLflowServer(s3_server, tmp_path / "mlflow", bucket="outage").start()
    port = server.port
    run_id = start_run(server.tracking_uri, "outage", run_name="pretrain")
    recipe = _recipe(digits, str(tmp_path / "runs"), name="outage", optim={"epochs": 3})
    box = {}
    thread = threading.Thread(target=lambda: box.update(result=_fit(recipe, digits, run_id=run_id,
                                                                     tracking_uri=server.tracking_uri)))
    thread.start()
    client = MlflowClient(server.tracking_uri)
    deadline = time.time() + 300
    while time.time() < deadline and not client.get_metric_history(run_id, "train/loss"):
        time.sleep(1)
    server.stop()  # the tracking server goes away mid-run
    time.sleep(15)
    server = MLflowServer(s3_server, tmp_path / "mlflow", bucket="outage", port=port).start()
    thread.join(timeout=600)
    server_uri = server.tracking_uri
    try:
        assert box["result"].error is None
        history = [m.step for m in MlflowClient(server_uri).get_metric_history(run_id, "train/loss")]
        assert history == sorted(set(history)), history  # no step twice
        total = box["result"].metrics["step"]
        assert history[-1] == total and set(range(5, total + 1, 5)) <= set(history)  # nothing lost
        logs = "".join(capfd.readouterr())
        assert "MLflow tracking unreachable" in logs and "reachable again" in logs  # the outage really happened
    finally:
        server.stop()


def test_tracker_saves_undelivered_metrics_into_a_folder_it_makes(tmp_path):
    """What MLflow never took by the end goes to a JSONL file; its folder is made only then (the training loop
    passes one that does not exist, so that a killed worker leaves nothing behind)."""
    from pipeline.services import free_port
    from pipeline.tracking import MLflowTracker

    folder = tmp_path / "not-made-yet"
    tracker = MLflowTracker(f"http://127.0.0.1:{free_port()}", "0123abcd", fallback_dir=folder)  # nothing listens
    tracker.log_metrics({"train/loss": 1.5}, step=5)
    tracker.log_metrics({"train/loss": 1.25}, step=10)
    assert not folder.exists()
    assert tracker.close(timeout=0) is False
    rows = [json.loads(line) for line in tracker.fallback_path.read_text().splitlines()]
    assert tracker.fallback_path.parent == folder
    assert [(r["key"], r["value"], r["step"]) for r in rows] == [("train/loss", 1.5, 5), ("train/loss", 1.25, 10)]


def _train_worker_pids() -> list[int]:
    """PIDs of the Ray Train worker processes of this test's own Ray cluster (descendants of this process)."""
    import os

    import psutil

    found = []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def _kill_a_worker_after(trace: Path, rows: int) -> tuple[threading.Thread, dict[str, int]]:
    """A started thread that SIGKILLs one Ray Train worker once the audit trail holds ``rows`` trained samples;
    the dict gets the killed ``pid``."""
    import os
    import signal

    killed: dict[str, int] = {}

    def kill() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            lines = sum(map(len, recorded_samples(trace).values()))
            if lines >= rows:
                pids = _train_worker_pids()
                if pids:
                    os.kill(pids[-1], signal.SIGKILL)
                    killed["pid"] = pids[-1]
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill)
    killer.start()
    return killer, killed


def _trained(trace: Path) -> Counter[tuple[int, int, int]]:
    """How often each ``(epoch, shard, index)`` was trained on, from the audit trail of every worker process."""
    return Counter(line for lines in recorded_samples(trace).values() for line in lines)


def _assert_resumed_without_loss(seen: Counter[tuple[int, int, int]], *, trained: int, interval: int) -> None:
    """Epoch 0 of a 2-worker, batch-32 run killed once: ``trained`` distinct samples of it were trained (the
    resumed pass trains every sample the checkpoint had not), and at most one checkpoint interval (+ batches in
    flight) twice."""
    epoch0 = {(shard, index) for (epoch, shard, index) in seen if epoch == 0}
    assert len(epoch0) >= trained
    repeats = sum(n - 1 for n in seen.values())
    assert 0 < repeats <= interval * 2 * 32 + 2 * 2 * 32


def test_sigkill_of_a_worker_resumes_without_losing_samples(digits, tmp_path):
    trace = tmp_path / "trace"
    recipe = _recipe(digits, str(tmp_path / "runs"), name="killed", data={"trace_dir": str(trace)},
                     optim={"epochs": 1}, checkpoint={"interval_steps": 5})
    recipe = recipe.model_copy(update={"scaling": recipe.scaling.model_copy(update={"max_failures": 1})})
    killer, killed = _kill_a_worker_after(trace, rows=2 * 32 * 8)  # both ranks past step 8: a checkpoint behind
    result = _fit(recipe, digits)
    killer.join()
    assert "pid" in killed, "the worker was never killed"
    assert result.error is None and result.metrics["step"] == digits["train_samples"] // (2 * 32)
    assert len(list(trace.glob("*.txt"))) >= 3  # two workers, then at least one restarted one
    trained = digits["train_samples"] // (2 * 32) * 2 * 32  # equal split, full batches
    _assert_resumed_without_loss(_trained(trace), trained=trained, interval=5)


@pytest.fixture(scope="module")
def rotated_digits(digits, tmp_path_factory):
    """A second source: 200 digits turned a quarter, as an image folder whose classes are named ``r0`` … ``r9``
    (so the mixture renames them), written as 2 shards of 100."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from pipeline.data.shards import write_shards

    root = tmp_path_factory.mktemp("rotated")
    bunch = load_digits()
    for k, (pixels, label) in enumerate(zip(bunch.images[:200], bunch.target[:200], strict=True)):
        folder = root / "images" / f"r{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels[::-1].T * 255 / 16).astype("uint8")).convert("RGB").save(folder / f"{k}.png")
    write_shards(str(root / "images"), str(root / "shards"), shard_size=100, progress=False)
    return str(root / "shards")


def test_mixture_trains_counts_its_sources_and_resumes_after_sigkill(digits, rotated_digits, tmp_path):
    """A stage on a mixture of 600 upright digits (weight 0.7: every one of its 3 shards an epoch) and 200 rotated
    ones (0.3: 3 draws of its 2 shards, so with replacement) trains, logs per-source sample counts that add up to
    ``train/samples`` and follow the epoch's draw, and a worker SIGKILLed mid-epoch resumes without losing a
    sample of it."""
    trace = tmp_path / "trace"
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    upright = [f"{digits['data']['train']}/shard-{k:06d}.tar" for k in range(3)]
    sources = [{"name": "upright", "shards": upright, "weight": 0.7},
               {"name": "rotated", "shards": rotated_digits, "weight": 0.3,
                "classes": {f"r{k}": str(k) for k in range(10)}}]
    recipe = _recipe(digits, str(tmp_path / "runs"), name="mixture", optim={"epochs": 1},
                     data={"train": sources, "epoch_samples": 857, "replacement": True, "trace_dir": str(trace)},
                     checkpoint={"interval_steps": 5})
    recipe = recipe.model_copy(update={"scaling": recipe.scaling.model_copy(update={"max_failures": 1})})
    shards = resolve_split(recipe.stages[0].data, "train")
    assert shards.mixture.draws == (3, 3) and shards.mixture.copies == (1, 2) and shards.num_samples == 900
    assert shards.classes == tuple(str(k) for k in range(10))
    run_id = start_run(tracking, "mixture", run_name="pretrain")
    killer, killed = _kill_a_worker_after(trace, rows=2 * 32 * 8)  # both ranks past step 8: a checkpoint behind
    result = _fit(recipe, digits, run_id=run_id, tracking_uri=tracking)
    killer.join()
    assert "pid" in killed, "the worker was never killed"
    assert result.error is None and result.metrics["step"] == 900 // 64
    assert result.metrics["val/top1"] > 0.2  # it learns the upright test split (chance: 0.1)

    seen = _trained(trace)
    _assert_resumed_without_loss(seen, trained=900 // 64 * 64, interval=5)
    read = epoch_order(0, 0, shards.num_shards, shards.mixture)[: shards.num_slots]
    assert {shard for (_, shard, _) in seen} <= set(read.tolist())  # the epoch's draw, copies as shards of their own
    metrics = MlflowClient(tracking).get_run(run_id).data.metrics  # the latest values: the last step's
    counts = {name: metrics[f"data/source/{name}/samples"] for name in ("upright", "rotated")}
    assert sum(counts.values()) == metrics["train/samples"] == 900 // 64 * 64
    assert counts["upright"] <= 600 and counts["rotated"] <= 300  # the draw, less the 4 rows of the split's drop


GOLDEN = Path(__file__).parent / "golden" / "train_loss.json"
GOLDEN_RTOL = 2e-3
"""Relative tolerance of the golden losses: repeated runs on one machine agree well inside it; the margin is for
another CPU's vector width (another summation order in the convolutions), whose drift grows over the steps, while
a change to training moves a step's loss by about its batch-to-batch noise (~1 % in the reference) or more."""


def test_golden_loss_curve(digits, tmp_path):
    """A fixed, seeded, reduced run (2 workers, ZeRO-2, drop path, the digits shards, 30 steps) reproduces the
    per-step losses committed in ``tests/golden/train_loss.json``. A change that alters training (the model, the
    stream's order or augmentation, the optimizer, the schedule, the seeding) moves them: if it is meant to,
    regenerate the file knowingly with ``REVCOL_UPDATE_GOLDEN=1 pytest tests/test_train.py -k golden`` and say why
    in the commit."""
    import os

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = _recipe(digits, str(tmp_path / "runs"), name="golden", optim={"epochs": 2, "max_steps": 30},
                     deepspeed={"zero_stage": 2}, checkpoint={"interval_steps": 100})
    run_id = start_run(tracking, "golden", run_name="pretrain")
    result = _fit(recipe, digits, run_id=run_id, tracking_uri=tracking, log_every=1)
    assert result.error is None and result.metrics["step"] == 30
    history = sorted((m.step, m.value) for m in MlflowClient(tracking).get_metric_history(run_id, "train/loss"))
    losses = [value for _, value in history]
    assert [step for step, _ in history] == list(range(1, 31))
    if os.environ.get("REVCOL_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"recipe": "tests/test_train.py::test_golden_loss_curve", "train/loss": losses},
                                     indent=1) + "\n")
    golden = json.loads(GOLDEN.read_text())["train/loss"]
    assert losses == pytest.approx(golden, rel=GOLDEN_RTOL), [(a, b) for a, b in zip(losses, golden)]
    assert sum(losses[-5:]) < sum(losses[:5])  # and it learns
