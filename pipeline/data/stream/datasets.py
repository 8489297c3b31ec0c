"""Driver side: the Ray Data datasets of a stage's train and eval streams, and the ``DataConfig`` that splits them."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from typing import Any

from pipeline import storage
from pipeline.audit import record_node
from pipeline.config import DataConfig, S3Config
from pipeline.data.stream.control import CONTROL_KEY, StreamControl
from pipeline.data.stream.decode import TaskSpec, eval_task, train_task
from pipeline.data.stream.position import StreamPosition
from pipeline.data.stream.shard_set import ShardSet, resolve_split
from pipeline.data.transforms import ImageConfig, resolve_image_config

__all__ = ["build_eval_dataset", "build_train_dataset", "train_data_config"]

logger = logging.getLogger(__name__)

_BLOCK_BYTES = 8 * 1024 * 1024
"""Target size of one emitted block of decoded rows."""
_MAX_BLOCK_ROWS = 256
_SAMPLES_PER_TASK = 1500
"""Samples a decode task aims at, several seconds of decoding (see ``_slots_per_task``)."""


def _rows_per_block(size: int) -> int:
    return int(max(1, min(_MAX_BLOCK_ROWS, _BLOCK_BYTES // (3 * size * size))))


def _task_resources(data_cpus: float) -> tuple[int, float]:
    """(concurrent tasks, CPUs per task) for a CPU budget: whole CPUs per task, a fraction below one."""
    if data_cpus <= 0:
        raise ValueError(f"data_cpus must be > 0, got {data_cpus}")
    tasks = max(1, math.ceil(data_cpus - 1e-9))
    return tasks, data_cpus / tasks


def _build(
    *,
    split: str,
    data_cfg: DataConfig,
    model_name: str | None,
    image_config: ImageConfig | None,
    s3_cfg: S3Config | None,
    data_cpus: float,
    extra_info: dict[str, Any],
    epoch: int,
) -> tuple[Any, ShardSet, ImageConfig, TaskSpec, Any]:
    import ray

    image = resolve_image_config(data_cfg, model_name=model_name, image_config=image_config)
    shard_set = resolve_split(data_cfg, split, s3_cfg=s3_cfg)
    if not shard_set.num_shards:
        raise ValueError(f"data.{split}: no shards in {getattr(data_cfg, split)!r}")
    needs_s3 = any(storage.is_s3_url(folder) for folder in shard_set.folders)
    task_spec = TaskSpec(
        split=split,
        num_shards=shard_set.num_shards,
        num_classes=shard_set.num_classes,
        label_maps=shard_set.label_maps,
        seed=data_cfg.seed,
        image=image,
        data_cfg=data_cfg,
        erase_prob=data_cfg.random_erasing,
        rows_per_block=_rows_per_block(image.size),
        s3_cfg=storage.resolve_s3_config(s3_cfg) if needs_s3 else None,
    )
    info = {
        "split": split,
        "dataset": shard_set.fingerprint,
        "seed": data_cfg.seed,
        "shard_samples": shard_set.samples,
        "mixture": shard_set.mixture,
        "total": shard_set.num_samples,
        "max_skipped_frac": data_cfg.max_skipped_frac,
        "mean": list(image.mean),
        "std": list(image.std),
        "size": image.size,
        **extra_info,
    }
    # On the driver's node (the head under `ray job submit`), not wherever the scheduler puts a zero-CPU actor: the
    # state is not restartable, and on a node that goes away every worker restarted after it would fail.
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    driver_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    control = ray.remote(num_cpus=0, max_restarts=0)(StreamControl).options(
        scheduling_strategy=driver_node
    ).remote(info, shard_set, epoch=epoch)
    return control, shard_set, image, task_spec, info


def _slots_per_task(num_slots: int, samples_per_slot: float, tasks: int) -> int:
    """Shards per decode task: enough samples that the ~0.2 s between one task and the next on a worker (Ray
    Data's scheduling loop) stays small against the task's work, and still at least 4 tasks per concurrent task
    slot, so the end of an epoch does not wait on one long task."""
    wanted = math.ceil(_SAMPLES_PER_TASK / max(samples_per_slot, 1.0))
    return max(1, min(wanted, num_slots // (4 * tasks)))


def _recording_node(fn: Any, folder: str, split: str) -> Any:
    """``fn``, first appending the node it runs on to the audit trail (``data.trace_dir``)."""

    @functools.wraps(fn)
    def decode(batch: dict[str, Any], **kwargs: Any) -> Any:
        record_node(folder, "decode", split=split)
        yield from fn(batch, **kwargs)

    return decode


def _finish_dataset(num_slots: int, fn: Any, task_spec: TaskSpec, control: Any, *, samples_per_shard: float,
                    data_cpus: float, deterministic: bool, label_selector: dict[str, str] | None) -> Any:
    """The stream over slots ``0 .. num_slots - 1`` (column ``id``; a lazy range, nothing per slot is built here),
    ``fn`` decoding a block of slots per task, on the nodes ``label_selector`` selects (any node when None)."""
    import ray

    tasks, cpus = _task_resources(data_cpus)
    per_task = _slots_per_task(num_slots, samples_per_shard, tasks)
    if task_spec.data_cfg.trace_dir is not None:
        fn = _recording_node(fn, task_spec.data_cfg.trace_dir, task_spec.split)
    ds = ray.data.range(num_slots, override_num_blocks=math.ceil(num_slots / per_task)).map_batches(
        fn,
        batch_size=per_task,
        fn_kwargs={"spec": task_spec, "control": control},
        compute=ray.data.TaskPoolStrategy(size=tasks),
        num_cpus=cpus,
        label_selector=label_selector,  # the data nodes (pipeline.placement); None: anywhere
    )
    ds.context.set_config(CONTROL_KEY, control)
    ds.context.execution_options.preserve_order = deterministic
    # Each emitted group of rows leaves the task as its own block right away (Ray would otherwise gather a whole
    # shard into one block before anything reaches the trainers).
    row_bytes = 3 * task_spec.image.size**2
    ds.context.target_max_block_size = max(1 << 16, int(0.75 * row_bytes * task_spec.rows_per_block))
    return ds


def build_train_dataset(
    data_cfg: DataConfig,
    *,
    model_name: str | None = None,
    image_config: ImageConfig | None = None,
    epoch: int = 0,
    position: StreamPosition | Mapping[str, Any] | None = None,
    s3_cfg: S3Config | None = None,
    data_cpus: float = 1.0,
    label_selector: dict[str, str] | None = None,
) -> Any:
    """Builds the training stream of ``data_cfg.train`` as a Ray Dataset (lazy; nothing is read yet).

    Each pass over the dataset (each epoch) reads the shards in the order seeded by ``(seed, epoch)`` and skips the
    samples the pass's position has consumed. :func:`iter_train_batches` sets epoch and position before every pass;
    ``epoch`` and ``position`` here only give the first pass's when the dataset is iterated directly.

    Rows: ``image`` uint8 ``(3, S, S)`` (cropped, flipped, RandAugmented), ``label`` int64, ``shard`` int32,
    ``index`` int32, ``epoch`` int32, ``source`` int16 (a mixture's source; 0 for one source), ``erase`` int16
    ``(4,)`` (random-erasing box, applied by :func:`iter_train_batches`).

    Args:
        data_cfg: The stage's ``data`` section (shards, seed, augmentation, image size, skip threshold).
        model_name: A RevCol variant whose cfg gives the preprocessing (size, mean/std, interpolation).
        image_config: Explicit preprocessing instead of ``model_name``.
        epoch: First epoch.
        position: Where the first pass starts (a merged checkpoint position); its epoch wins over ``epoch``.
        s3_cfg: The recipe's ``s3`` section (unset fields from the AWS variables).
        data_cpus: CPU budget of the decode tasks (``ScalingConfig.data_cpus``): ``ceil(data_cpus)`` concurrent
            tasks sharing it.
        label_selector: Labels of the nodes the decode tasks run on (``Placement.data_selector``); None: anywhere.

    Returns:
        The ``ray.data.Dataset``; hand it to ``TorchTrainer(datasets={"train": ...})``.

    Raises:
        ValueError: ``data.train`` unset, bad arguments, a position of another dataset.
        pipeline.storage.S3AccessError: S3 cannot be used.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    start = StreamPosition(epoch=epoch)
    if position is not None:
        start = position if isinstance(position, StreamPosition) else StreamPosition.from_state_dict(position)
    # The fingerprint is only known after resolving; bind and check below.
    control, shard_set, image, task_spec, info = _build(
        split="train", data_cfg=data_cfg, model_name=model_name, image_config=image_config,
        s3_cfg=s3_cfg, data_cpus=data_cpus,
        extra_info={"shuffle_shards": True, "erase_prob": data_cfg.random_erasing,
                    "shuffle_buffer": data_cfg.shuffle_buffer, "kind": "train"},
        epoch=epoch,
    )
    if position is not None:
        import ray

        start.bind(dataset=shard_set.fingerprint, seed=data_cfg.seed, shard_samples=shard_set.samples, epoch=epoch,
                   mixture=shard_set.mixture)
        ray.get(control.begin_pass.remote(start.epoch, start.state_dict()))
    logger.info(
        "train stream: %d shard(s) an epoch, %d samples, %d px, %s decode task(s) x %.2f CPU",
        shard_set.num_slots, shard_set.num_samples, image.size, *_task_resources(data_cpus),
    )
    return _finish_dataset(shard_set.num_slots, train_task, task_spec, control,
                           samples_per_shard=shard_set.num_samples / shard_set.num_slots, data_cpus=data_cpus,
                           deterministic=data_cfg.deterministic, label_selector=label_selector)


def build_eval_dataset(
    data_cfg: DataConfig,
    *,
    batch_size: int | None = None,
    model_name: str | None = None,
    image_config: ImageConfig | None = None,
    s3_cfg: S3Config | None = None,
    data_cpus: float = 1.0,
    label_selector: dict[str, str] | None = None,
) -> Any:
    """Builds the eval stream of ``data_cfg.val``: every sample exactly once, in manifest order, plus padding.

    The dataset holds one row per sample of the manifest (bad ones with ``valid=False``) and padding rows
    (``valid=False``, ``shard=-1``) up to a multiple of ``consumers * batch_size``, so an equal split gives every
    rank the same number of full batches. The number of consumers is not fixed here: :func:`iter_eval_batches`
    tells the stream at the start of each pass how many ways it is split (an elastic run's worker group changes
    size from one restart to the next).

    Rows: ``image`` uint8 ``(3, S, S)`` (resize + centre crop), ``label`` int64 (-1 when invalid), ``valid``
    bool, ``shard`` int32, ``index`` int32.

    Args:
        data_cfg: The stage's ``data`` section.
        batch_size: Eval batch per worker (default ``data_cfg.batch_size``).
        model_name: A RevCol variant whose cfg gives the preprocessing.
        image_config: Explicit preprocessing instead of ``model_name``.
        s3_cfg: The recipe's ``s3`` section.
        data_cpus: CPU budget of the decode tasks.
        label_selector: Labels of the nodes the decode tasks run on; None: anywhere.

    Returns:
        The ``ray.data.Dataset``.

    Raises:
        ValueError: ``data.val`` unset or bad arguments.
        pipeline.storage.S3AccessError: S3 cannot be used.
    """
    batch = data_cfg.batch_size if batch_size is None else batch_size
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch}")
    control, shard_set, image, task_spec, info = _build(
        split="val", data_cfg=data_cfg, model_name=model_name, image_config=image_config,
        s3_cfg=s3_cfg, data_cpus=data_cpus,
        extra_info={"shuffle_shards": False, "batch_size": batch, "kind": "eval"},
        epoch=0,
    )
    logger.info("eval stream: %d shard(s), %d samples, padded per pass to a multiple of consumers x %d",
                shard_set.num_shards, shard_set.num_samples, batch)
    # the last slot holds the padding rows (none when the pass's split needs none)
    return _finish_dataset(shard_set.num_shards + 1, eval_task, task_spec, control,
                           samples_per_shard=shard_set.num_samples / shard_set.num_shards, data_cpus=data_cpus,
                           deterministic=True, label_selector=label_selector)


def train_data_config(datasets: Mapping[str, Any]) -> Any:
    """The ``ray.train.DataConfig`` for these streams: every one split across the workers, each keeping its own
    ordering setting (Ray Train otherwise replaces a dataset's execution options with the driver's defaults, which
    drops ``preserve_order`` and with it the reproducible order).

    Args:
        datasets: The ``datasets`` given to ``TorchTrainer`` (streams of this module; others keep the defaults).

    Returns:
        A ``ray.train.DataConfig``.
    """
    import copy

    import ray.data
    import ray.train

    options = {}
    for name, ds in datasets.items():
        opts = copy.deepcopy(ray.data.DataContext.get_current().execution_options)  # Train's defaults
        opts.preserve_order = bool(ds.context.execution_options.preserve_order)
        options[name] = opts
    return ray.train.DataConfig(datasets_to_split="all", execution_options=options)
