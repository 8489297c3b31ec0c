"""Worker side: a Ray Train worker's part of the stream as torch batches, normalized (and erased) on its device."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np

from pipeline.data.stream.control import control_of
from pipeline.data.stream.position import StreamPosition
from pipeline.data.stream.skips import DataSkipError
from pipeline.data.transforms import mix_seed, normalize_batch

__all__ = ["iter_eval_batches", "iter_train_batches"]

logger = logging.getLogger(__name__)


def _tensor(array: np.ndarray) -> Any:
    import torch

    with warnings.catch_warnings():  # Ray hands out read-only arrays; every use below copies
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _to_device(array: np.ndarray, device: Any) -> Any:
    """``array`` on ``device``; to a GPU through pinned memory, so that the copy is asynchronous."""
    tensor = _tensor(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _rank_of(source: Any) -> int:
    split = getattr(source, "_output_split_idx", None)
    if isinstance(split, int):
        return split
    try:
        import ray.train

        return int(ray.train.get_context().get_world_rank())
    except Exception:  # noqa: BLE001 - not inside Ray Train
        return 0


def _train_world_size() -> int:
    try:
        import ray.train

        return int(ray.train.get_context().get_world_size())
    except Exception:  # noqa: BLE001 - not inside Ray Train
        return 1


def _close(iterator: Any) -> None:
    close = getattr(iterator, "close", None)
    if close is not None:
        close()


def _raise_skip_error(control: Any, err: BaseException) -> None:
    """Re-raises a failed pass as DataSkipError when the stream stopped for skipped input."""
    import ray

    try:
        fatal = ray.get(control.fatal.remote(), timeout=30)
    except Exception:  # noqa: BLE001 - the original error is the better report
        fatal = None
    if fatal is not None:
        raise DataSkipError(fatal) from err


@contextlib.contextmanager
def _pass_guard(control: Any, iterator: Any) -> Iterator[None]:
    """Around one pass: a failure caused by too much skipped input surfaces as DataSkipError, and the Ray
    iterator is closed on any exit (an early exit stops Ray's executor now, not at garbage collection)."""
    try:
        yield
    except DataSkipError:
        raise
    except Exception as err:
        _raise_skip_error(control, err)
        raise
    finally:
        _close(iterator)


def iter_train_batches(
    source: Any,
    *,
    batch_size: int,
    position: StreamPosition,
    device: Any = None,
    drop_last: bool = True,
    prefetch_batches: int = 2,
    shuffle_buffer: int | None = None,
    rank: int | None = None,
) -> Iterator[dict[str, Any]]:
    """One epoch of training batches for this worker, continuing from ``position``.

    Publishes ``position`` (its epoch and consumed samples) to the stream before the pass, marks every batch in
    it as it is handed out, and moves it to the next epoch when the pass ends. Every rank must start a pass from
    the same position (the merged one loaded from a checkpoint, or the automatic advance), and every rank gets the
    same number of batches.

    Args:
        source: The worker's iterator (``ray.train.get_dataset_shard("train")``), a split iterator, or the dataset.
        batch_size: Batch per worker.
        position: This rank's position; fresh (``StreamPosition()``) or loaded from a checkpoint.
        device: torch device for the batch (normalization and erasing run there); default CPU.
        drop_last: Drop the last partial batch (every rank's last batch is partial the same way otherwise).
        prefetch_batches: Batches Ray prepares ahead in background threads.
        shuffle_buffer: Rows in the shuffle buffer (default ``data.shuffle_buffer``; 0 for none).
        rank: This worker's rank (seeds the shuffle buffer); default from the split or Ray Train.

    Yields:
        ``{"image": float32 (B, 3, S, S), "label": int64 (B,), "shard": int64 (B,), "index": int64 (B,),
        "source": int64 (B,) (a mixture's source, in ``data.train`` order; 0 for one source), "epoch": int}``.

    Raises:
        DataSkipError: more input was skipped than ``data.max_skipped_frac`` allows.
        ValueError: ``position`` belongs to another dataset or seed.
    """
    import ray
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    control = control_of(source)
    info = ray.get(control.info.remote())
    if info.get("kind") != "train":
        raise ValueError("iter_train_batches needs a stream from build_train_dataset (got an eval stream)")
    position.bind(dataset=info["dataset"], seed=info["seed"], shard_samples=info["shard_samples"],
                  epoch=info["epoch"], mixture=info["mixture"])
    epoch = int(position.epoch)  # type: ignore[arg-type]
    ray.get(control.begin_pass.remote(epoch, position.state_dict()))
    rank = _rank_of(source) if rank is None else rank
    buffer = info["shuffle_buffer"] if shuffle_buffer is None else shuffle_buffer
    dev = torch.device(device) if device is not None else torch.device("cpu")
    generator = torch.Generator(device=dev)
    iterator = iter(source.iter_batches(
        batch_size=batch_size,
        batch_format="numpy",
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=buffer or None,
        local_shuffle_seed=(mix_seed(info["seed"], epoch, rank, 0xB0F) % 2**32) if buffer else None,
    ))
    with _pass_guard(control, iterator):
        for rows in iterator:
            images = _to_device(rows["image"], dev)
            generator.manual_seed(mix_seed(info["seed"], epoch, int(rows["shard"][0]), int(rows["index"][0])))
            batch = {
                "image": normalize_batch(images, mean=tuple(info["mean"]), std=tuple(info["std"]),
                                         erase=rows["erase"], generator=generator),
                "label": _tensor(rows["label"]).to(dev, dtype=torch.int64),
                "shard": _tensor(rows["shard"]).to(torch.int64),
                "index": _tensor(rows["index"]).to(torch.int64),
                "source": _tensor(rows["source"]).to(torch.int64),
                "epoch": epoch,
            }
            position.mark(rows)
            yield batch
    position.next_epoch()


def iter_eval_batches(
    source: Any,
    *,
    batch_size: int | None = None,
    device: Any = None,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, Any]]:
    """The eval batches of this worker: full batches, the same number on every rank, padding masked.

    Args:
        source: The worker's iterator (``ray.train.get_dataset_shard("val")``), a split iterator, or the dataset.
        batch_size: Must match the dataset's (default: the dataset's).
        device: torch device for the batch; default CPU.
        prefetch_batches: Batches Ray prepares ahead.

    Yields:
        ``{"image": float32 (B, 3, S, S), "label": int64 (B,) (-1 where invalid), "valid": bool (B,),
        "shard": int64 (B,), "index": int64 (B,)}``; count only rows with ``valid``.

    Raises:
        DataSkipError: more input was bad than ``data.max_skipped_frac`` allows.
        ValueError: ``batch_size`` differs from the dataset's.
    """
    import ray
    import torch

    control = control_of(source)
    info = ray.get(control.info.remote())
    if info.get("kind") != "eval":
        raise ValueError("iter_eval_batches needs a stream from build_eval_dataset (got a train stream)")
    splits = source.world_size() if hasattr(source, "world_size") else None
    if splits is None and hasattr(source, "get_context") and _train_world_size() > 1:
        logger.warning(
            "the eval stream reaches this Ray Train worker unsplit: every rank evaluates every sample; give "
            "TorchTrainer dataset_config=train_data_config(datasets) to split it"
        )
    # Before the pass starts (Ray Data's split starts it once every consumer has asked): the padding is sized for
    # this many consumers.
    ray.get(control.begin_eval.remote(splits or 1))
    if batch_size is not None and batch_size != info["batch_size"]:
        raise ValueError(
            f"batch_size={batch_size} differs from the eval dataset's {info['batch_size']} "
            "(its padding is sized for that; rebuild it with build_eval_dataset(batch_size=...))"
        )
    dev = torch.device(device) if device is not None else torch.device("cpu")
    iterator = iter(source.iter_batches(batch_size=info["batch_size"], batch_format="numpy",
                                        prefetch_batches=prefetch_batches))
    with _pass_guard(control, iterator):
        for rows in iterator:
            images = _to_device(rows["image"], dev)
            yield {
                "image": normalize_batch(images, mean=tuple(info["mean"]), std=tuple(info["std"])),
                "label": _tensor(rows["label"]).to(dev, dtype=torch.int64),
                "valid": _tensor(rows["valid"]).to(dev),
                "shard": _tensor(rows["shard"]).to(torch.int64),
                "index": _tensor(rows["index"]).to(torch.int64),
            }
