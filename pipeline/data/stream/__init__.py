"""The streaming input: WebDataset shards → Ray Data decode/augment tasks → Ray Train workers.

One module per stage of the stream: ``shard_set`` (resolve a data spec through its manifests; the preflight
check), ``mixture`` (a weighted mixture of sources: which shards each epoch draws), ``position`` (what has been
consumed), ``control`` (the stream's control actor), ``decode`` (the decode
tasks; tar reading is :mod:`pipeline.data.tar`, shared with the shard verifier), ``datasets`` (the Ray Data
builders, driver side), ``batches`` (torch batches, worker side), ``skips`` (bad-input accounting).

Shards are those written by :func:`pipeline.data.shards.write_shards` (a local folder or ``s3://`` prefix holding
``shard-NNNNNN.tar``, ``manifest.json`` and, since manifest version 2, ``shards.parquet``). The driver resolves a
spec into a :class:`ShardSet` of arrays (no object per shard); the stream is a lazy range of slots, and a decode
task learns each of its shards (URL, name, size, consumed samples) from the control actor's :class:`ShardPlan`
when it starts it, so what a task receives does not grow with the corpus. A Ray Data task reads a few whole shards
one after the other (boto3
for S3, with retries and backoff), groups their tar members into samples, decodes and augments them and emits
``uint8`` rows in blocks of tens of samples, so Ray's per-row machinery is never on the per-sample path (Ray's
stock ``read_webdataset`` pays per-sample costs, ray-project/ray#65350; ``benchmarks/input_pipeline.py`` measures
both). Decode tasks have their own CPU budget (``ScalingConfig.data_cpus``), apart from the trainers' CPUs. Each
Ray Train worker reads its part of the stream (Ray Train's ``streaming_split(n, equal=True)``) and turns it into
torch batches: normalization and the random-erasing noise run there, on the trainer's device (as timm's
``PrefetchLoader`` does).

Driver side::

    from pipeline.data.stream import build_eval_dataset, build_train_dataset, check_inputs, train_data_config

    check_inputs(stage.data, recipe.s3)          # fails fast: unreachable S3, bad credentials, missing shards
    placement = resolve_placement(recipe.scaling)   # pipeline.placement: the data nodes, the CPU budget
    train_ds = build_train_dataset(stage.data, model_name=stage.model.name, s3_cfg=recipe.s3,
                                   data_cpus=placement.data_cpus, label_selector=placement.data_selector)
    val_ds = build_eval_dataset(stage.data, model_name=stage.model.name, s3_cfg=recipe.s3,
                                data_cpus=placement.data_cpus, label_selector=placement.data_selector)
    datasets = {"train": train_ds, "val": val_ds}
    TorchTrainer(train_func, datasets=datasets, dataset_config=train_data_config(datasets), ...).fit()

:func:`train_data_config` splits ``val`` too (each eval pass is padded for the consumers that read it) and keeps
``preserve_order`` (Ray Train's default ``DataConfig`` replaces each dataset's execution options).

Leave CPUs to the decode tasks: trainers that take every CPU starve them (fractional ``cpus_per_worker`` on small
machines).

Worker side (``train_func``)::

    from pipeline.data.stream import StreamPosition, iter_eval_batches, iter_train_batches, skipped_counts

    shard = ray.train.get_dataset_shard("train")
    position = StreamPosition()                      # or StreamPosition.from_state_dict(ckpt["data"])
    while position.epoch is None or position.epoch < epochs:
        for batch in iter_train_batches(shard, batch_size=B, position=position, device=device):
            loss = engine(batch["image"]) ...        # image (B, 3, H, W) float32, label (B,) int64
            if step % interval == 0:                 # every rank: gather, merge, save (rank 0)
                states = all_gather_object(position.state_dict())
                ckpt["data"] = StreamPosition.merged(states).state_dict()
                metrics["data/skipped"] = skipped_counts(shard)["total"]
    for batch in iter_eval_batches(ray.train.get_dataset_shard("val"), device=device):
        logits = engine(batch["image"]); correct += (logits.argmax(1) == batch["label"])[batch["valid"]].sum()

Order and reproducibility: per epoch the shard order is a permutation seeded by ``(seed, epoch)``, the samples of
each shard are shuffled by ``(seed, epoch, shard)``, every sample's augmentation is seeded by
``(seed, epoch, shard, index)`` and rows go through the recipe's shuffle buffer (seeded by ``(seed, epoch, rank)``).
With ``DataConfig.deterministic`` (Ray Data ``preserve_order``) the per-rank batch sequence is a pure function of
``(seed, epoch, number of workers)``. The equal split gives every rank the same number of rows, so the same number
of batches: no rank waits at the end of an epoch.

Position: every row carries ``shard`` (index into the manifest's shard list), ``index`` (sample number inside the
shard's tar) and ``epoch``. :class:`StreamPosition` records the rows a rank has been handed (one bitmap per shard);
rank states merge by union into the global position that a checkpoint stores. A pass started from a position skips
the consumed samples of its epoch, so after a restart nothing is lost and at most what was consumed since the
checkpoint is repeated, with any number of workers. The epoch and the consumed set of each pass travel through a
small control actor owned by the dataset: :func:`iter_train_batches` publishes its position there before a pass and
the decode tasks read it when they start a shard, so a Ray Train worker-group restart resumes correctly without
rebuilding the dataset.

Mixtures: ``data.train`` as a list of weighted sources reads, per epoch, ``data.epoch_samples`` samples drawn from
them in whole shards by weight (seeded by ``(seed, epoch)``; :mod:`pipeline.data.stream.mixture`), each source's
labels mapped into the stage's label set by class name; rows carry their ``source``. The position's guarantees
hold unchanged (a shard a source repeats within an epoch is a shard of its own).

Bad input (truncated tar, undecodable image, missing or non-integer label, missing shard) is skipped and counted
per kind (:func:`skipped_counts`), with one warning per kind. When the skipped samples of an epoch exceed
``DataConfig.max_skipped_frac`` of it, the stream stops with :class:`DataSkipError` naming the shards. Eval never
drops rows: a bad sample becomes a row with ``valid=False``, and padding rows (``valid=False``) make every rank's
row count a multiple of the batch size, so all ranks run the same number of forward passes (ZeRO-3).

S3: endpoint and credentials from the recipe's ``s3`` section or the AWS variables (:mod:`pipeline.storage`);
they reach the decode tasks as task arguments, never in logs.

CPU-only trainers: the ``uint8`` → float conversion of a batch allocates a fresh 10-80 MB tensor; with
``THP_MEM_ALLOC_ENABLE=1`` in the trainer's environment (read by torch at start) it costs about a third.
"""

from __future__ import annotations

from pipeline.data.stream.batches import iter_eval_batches, iter_train_batches
from pipeline.data.stream.control import ShardPlan, skipped_counts
from pipeline.data.stream.datasets import build_eval_dataset, build_train_dataset, train_data_config
from pipeline.data.stream.mixture import MixtureOrder
from pipeline.data.stream.position import StreamPosition
from pipeline.data.stream.shard_set import ShardRef, ShardSet, check_inputs, resolve_shards, resolve_split
from pipeline.data.stream.skips import DataSkipError

__all__ = [
    "DataSkipError",
    "MixtureOrder",
    "ShardPlan",
    "ShardRef",
    "ShardSet",
    "StreamPosition",
    "build_eval_dataset",
    "build_train_dataset",
    "check_inputs",
    "iter_eval_batches",
    "iter_train_batches",
    "resolve_shards",
    "resolve_split",
    "skipped_counts",
    "train_data_config",
]
