"""The streaming input: WebDataset shards → Ray Data decode/augment tasks → Ray Train workers.

Shards are those written by :func:`pipeline.data.shards.write_shards` (a local folder or ``s3://`` prefix holding
``shard-NNNNNN.tar`` and ``manifest.json``). A Ray Data task reads a few whole shards one after the other (boto3
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
    train_ds = build_train_dataset(stage.data, model_name=stage.model.name, s3_cfg=recipe.s3,
                                   data_cpus=recipe.scaling.data_cpus)
    val_ds = build_eval_dataset(stage.data, model_name=stage.model.name, s3_cfg=recipe.s3,
                                num_splits=recipe.scaling.num_workers, data_cpus=recipe.scaling.data_cpus)
    datasets = {"train": train_ds, "val": val_ds}
    TorchTrainer(train_func, datasets=datasets, dataset_config=train_data_config(datasets), ...).fit()

:func:`train_data_config` splits ``val`` too (the eval stream is padded for ``num_splits`` consumers) and keeps
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

Bad input (truncated tar, undecodable image, missing or non-integer label, missing shard) is skipped and counted
per kind (:func:`skipped_counts`), with one warning per kind. When the skipped samples of an epoch exceed
``DataConfig.max_skipped_frac`` of it, the stream stops with :class:`DataSkipError` naming the shards. Eval never
drops rows: a bad sample becomes a row with ``valid=False``, and padding rows (``valid=False``) make every rank's
row count a multiple of the batch size, so all ranks run the same number of forward passes (ZeRO-3).

S3: endpoint and credentials from the recipe's ``s3`` section or the AWS variables (:mod:`pipeline.s3`); they reach
the decode tasks as task arguments, never in logs.

CPU-only trainers: the ``uint8`` → float conversion of a batch allocates a fresh 10-80 MB tensor; with
``THP_MEM_ALLOC_ENABLE=1`` in the trainer's environment (read by torch at start) it costs about a third.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import math
import tarfile
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataConfig, S3Config
from pipeline.data.transforms import (
    ImageConfig,
    build_eval_transform,
    build_train_transform,
    mix_seed,
    normalize_batch,
    resolve_image_config,
    sample_erase_box,
    seed_sample,
)

__all__ = [
    "DataSkipError",
    "ShardRef",
    "ShardSet",
    "StreamPosition",
    "build_eval_dataset",
    "build_train_dataset",
    "check_inputs",
    "iter_eval_batches",
    "iter_train_batches",
    "resolve_shards",
    "skipped_counts",
    "train_data_config",
]

logger = logging.getLogger(__name__)

_CONTROL_KEY = "revcol.stream_control"
"""Key of the control actor's handle in the dataset's ``DataContext`` configs."""
_BLOCK_BYTES = 8 * 1024 * 1024
"""Target size of one emitted block of decoded rows."""
_MAX_BLOCK_ROWS = 256
_SAMPLES_PER_TASK = 1500
"""Samples a decode task aims at, several seconds of decoding (see ``_slots_per_task``)."""
_POSITION_VERSION = 1
_IMAGE_FIELDS = ("jpg", "jpeg", "png")

# Kinds of skipped input (keys of the skip counters).
SKIP_MISSING_SHARD = "missing shard"
SKIP_UNREADABLE_SHARD = "unreadable shard"
SKIP_TRUNCATED = "truncated tar"
SKIP_NO_IMAGE = "missing image"
SKIP_BAD_IMAGE = "undecodable image"
SKIP_NO_LABEL = "missing label"
SKIP_BAD_LABEL = "bad label"
SKIP_TRANSFORM = "transform failed"


class DataSkipError(RuntimeError):
    """More input was skipped than ``DataConfig.max_skipped_frac`` allows; the message names the shards."""


# ------------------------------------------------------------------------------------------------------ shard lists


@dataclass(frozen=True)
class ShardRef:
    """One shard of a stream.

    Args:
        index: Position in the stream's shard list (the ``shard`` column of every row).
        name: File name (``shard-000000.tar``).
        url: Local path or ``s3://`` URL.
        samples: Samples in the shard, per the manifest.
        bytes: Size per the manifest.
        sha256: Digest per the manifest.
    """

    index: int
    name: str
    url: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardSet:
    """The shards of one data spec (``data.train`` or ``data.val``), resolved through their manifests.

    Args:
        shards: The shards, in manifest order.
        classes: Class names (index → name).
        num_samples: Total samples.
        fingerprint: Digest of the shard names and contents; a stored position only applies to the same one.
    """

    shards: tuple[ShardRef, ...]
    classes: tuple[str, ...]
    num_samples: int
    fingerprint: str

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


def _parent(url: str) -> tuple[str, str]:
    """Splits ``dir/name`` (local or ``s3://``) into (dir, name)."""
    head, _, tail = url.rstrip("/").rpartition("/")
    if not head or (url.startswith("s3://") and head == "s3:/"):
        raise ValueError(f"{url!r} has no parent folder")
    return head, tail


def resolve_shards(spec: str | Sequence[str], *, s3_cfg: S3Config | None = None) -> ShardSet:
    """Resolves a data spec into its shards through ``manifest.json``.

    Args:
        spec: A manifest (``.../manifest.json``), a folder or ``s3://`` prefix holding one, or a list of shard
            files (``.../shard-000003.tar``, each listed in the manifest next to it) or of the former.
        s3_cfg: S3 settings; unset fields come from the AWS variables.

    Returns:
        The resolved shards (manifest order; a list keeps its order).

    Raises:
        FileNotFoundError: a manifest is missing.
        ValueError: a spec item is not a manifest, folder or listed shard; manifests disagree on the classes.
        pipeline.s3.S3AccessError: S3 cannot be used (unreachable endpoint, bad credentials, missing bucket).
    """
    from pipeline.data.shards import MANIFEST_NAME, read_manifest

    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("data spec is empty (expected a manifest, a folder/prefix or a list of shards)")
    manifests: dict[str, dict[str, Any]] = {}

    def manifest_of(folder: str) -> dict[str, Any]:
        if folder not in manifests:
            folder_spec = folder if folder.startswith("s3://") else str(Path(folder).expanduser())
            manifest = read_manifest(folder_spec, s3_config=s3_cfg)
            if not isinstance(manifest.get("shards"), list) or not isinstance(manifest.get("classes"), list):
                raise ValueError(f"{_join(folder, MANIFEST_NAME)} is not a shards manifest (no 'shards'/'classes')")
            manifests[folder] = manifest
        return manifests[folder]

    picked: list[tuple[str, dict[str, Any]]] = []  # (folder, record)
    classes: list[str] | None = None
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"data spec item {item!r} is not a path or s3:// URL")
        url = item if item.startswith("s3://") else str(Path(item).expanduser().resolve())
        if url.endswith(".tar"):
            folder, name = _parent(url)
            records = {r["name"]: r for r in manifest_of(folder)["shards"]}
            if name not in records:
                raise ValueError(f"shard {item!r} is not listed in {_join(folder, MANIFEST_NAME)}")
            chosen = [records[name]]
        else:
            if url.endswith(".json"):
                folder, name = _parent(url)
                if name != MANIFEST_NAME:
                    raise ValueError(f"data spec {item!r}: a manifest must be called {MANIFEST_NAME}")
            else:
                folder = url.rstrip("/")
            chosen = list(manifest_of(folder)["shards"])
        manifest_classes = [str(c) for c in manifest_of(folder)["classes"]]
        if classes is None:
            classes = manifest_classes
        elif classes != manifest_classes:
            raise ValueError(f"data spec {item!r}: its classes differ from the other manifests' of the spec")
        picked.extend((folder, r) for r in chosen)

    shards = tuple(
        ShardRef(
            index=i,
            name=str(r["name"]),
            url=_join(folder, str(r["name"])),
            samples=int(r["samples"]),
            bytes=int(r["bytes"]),
            sha256=str(r["sha256"]),
        )
        for i, (folder, r) in enumerate(picked)
    )
    digest = hashlib.sha256(json.dumps([[s.name, s.sha256, s.samples] for s in shards]).encode()).hexdigest()
    return ShardSet(
        shards=shards,
        classes=tuple(classes or ()),
        num_samples=sum(s.samples for s in shards),
        fingerprint=digest[:32],
    )


def _existing_sizes(shard_set: ShardSet, s3_cfg: S3Config | None) -> dict[str, int | None]:
    """Stored size of every shard (None when missing): one S3 listing per prefix, or a stat per local file."""
    from pipeline.s3 import make_client, split_s3_url

    sizes: dict[str, int | None] = {}
    listed: dict[str, dict[str, int]] = {}
    for ref in shard_set.shards:
        if ref.url.startswith("s3://"):
            folder, name = _parent(ref.url)
            if folder not in listed:
                bucket, prefix = split_s3_url(folder + "/")
                client = make_client(s3_cfg)
                found: dict[str, int] = {}
                for page in client.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix, Delimiter="/"
                ):
                    for obj in page.get("Contents", []):
                        found[obj["Key"][len(prefix) :]] = int(obj["Size"])
                listed[folder] = found
            sizes[ref.url] = listed[folder].get(name)
        else:
            path = Path(ref.url)
            sizes[ref.url] = path.stat().st_size if path.is_file() else None
    return sizes


def check_inputs(
    data_cfg: DataConfig, s3_cfg: S3Config | None = None, *, splits: Sequence[str] = ("train", "val")
) -> dict[str, ShardSet]:
    """Checks, before any trainer starts, that the stage's shards can be read.

    S3 problems fail fast with a clear message (the endpoint unreachable: a TCP probe of a few seconds, no
    retries; credentials rejected; bucket missing). Missing shards are named in a warning; when their samples
    exceed ``data_cfg.max_skipped_frac`` the check fails naming them. Shards smaller than the manifest says are
    warned about (their lost samples are counted while streaming).

    Args:
        data_cfg: The stage's ``data`` section.
        s3_cfg: The recipe's ``s3`` section (unset fields from the AWS variables).
        splits: Which specs to check (``train``, ``val``); unset ones are ignored.

    Returns:
        The resolved shards per split.

    Raises:
        pipeline.s3.S3AccessError: S3 cannot be used.
        FileNotFoundError: a manifest is missing.
        DataSkipError: missing shards hold more samples than allowed.
    """
    resolved: dict[str, ShardSet] = {}
    for split in splits:
        if split not in ("train", "val"):
            raise ValueError(f"splits: unknown split {split!r} (allowed: 'train', 'val')")
        spec = getattr(data_cfg, split)
        if spec is None:
            continue
        shard_set = resolve_shards(spec, s3_cfg=s3_cfg)
        sizes = _existing_sizes(shard_set, s3_cfg)
        missing = [r for r in shard_set.shards if sizes[r.url] is None]
        short = [r for r in shard_set.shards if sizes[r.url] is not None and sizes[r.url] < r.bytes]
        if short:
            logger.warning(
                "data.%s: %d shard(s) smaller than their manifest records (truncated?): %s",
                split, len(short), ", ".join(r.url for r in short[:5]) + (" ..." if len(short) > 5 else ""),
            )
        if missing:
            lost = sum(r.samples for r in missing)
            names = ", ".join(r.url for r in missing[:10]) + (" ..." if len(missing) > 10 else "")
            allowed = _skip_budget(shard_set.num_samples, data_cfg.max_skipped_frac)
            if lost > allowed:
                raise DataSkipError(
                    f"data.{split}: {len(missing)} missing shard(s) hold {lost} of {shard_set.num_samples} samples, "
                    f"more than data.max_skipped_frac={data_cfg.max_skipped_frac} allows ({allowed}): {names}"
                )
            logger.warning("data.%s: %d shard(s) missing (%d samples will be skipped): %s", split, len(missing),
                           lost, names)
        logger.info("data.%s: %d shard(s), %d samples, %d classes", split, len(shard_set.shards),
                    shard_set.num_samples, shard_set.num_classes)
        resolved[split] = shard_set
    return resolved


def _skip_budget(total: int, frac: float) -> int:
    return int(math.floor(total * frac + 1e-9))


# ------------------------------------------------------------------------------------------------------- position


def _pack(bits: np.ndarray) -> str:
    return base64.b64encode(np.packbits(bits.astype(np.bool_)).tobytes()).decode("ascii")


def _unpack(text: str, size: int) -> np.ndarray:
    raw = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8)
    bits = np.unpackbits(raw)[:size].astype(np.bool_)
    if bits.size != size:
        raise ValueError(f"consumed bitmap holds {bits.size} bits, expected {size}")
    return bits


class StreamPosition:
    """Which samples of the current epoch a rank (or, merged, the whole job) has consumed.

    A position is *bound* to a stream the first time :func:`iter_train_batches` uses it (it learns the dataset
    fingerprint, the seed and the shard sizes, and the build epoch when it has none). A batch counts as consumed
    once :func:`iter_train_batches` has handed it out; save ``state_dict()`` after the step that used it.

    Args:
        epoch: Epoch to start at (default: the epoch the dataset was built for).
    """

    def __init__(self, *, epoch: int | None = None) -> None:
        if epoch is not None and epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch: int | None = epoch
        self.seed: int | None = None
        self.dataset: str | None = None
        self.shard_samples: tuple[int, ...] | None = None
        self._consumed: dict[int, np.ndarray] = {}

    # -- binding and marking

    @property
    def bound(self) -> bool:
        """Whether the position knows its dataset (after the first pass or a loaded state)."""
        return self.dataset is not None

    def bind(self, *, dataset: str, seed: int, shard_samples: Sequence[int], epoch: int) -> None:
        """Attaches the position to a stream (done by :func:`iter_train_batches`).

        Args:
            dataset: The stream's fingerprint.
            seed: The stream's seed.
            shard_samples: Samples per shard.
            epoch: Epoch to use when the position has none.

        Raises:
            ValueError: the position belongs to another dataset or seed.
        """
        samples = tuple(int(n) for n in shard_samples)
        if self.dataset is None:
            self.dataset, self.seed, self.shard_samples = dataset, int(seed), samples
        elif self.dataset != dataset or self.shard_samples != samples:
            raise ValueError(
                f"this position belongs to dataset {self.dataset} ({len(self.shard_samples or ())} shards), "
                f"the stream reads dataset {dataset} ({len(samples)} shards); start from a fresh StreamPosition"
            )
        elif self.seed != int(seed):
            raise ValueError(f"this position was recorded with data.seed={self.seed}, the stream uses seed={seed}")
        if self.epoch is None:
            self.epoch = int(epoch)

    def _bits(self, shard: int) -> np.ndarray:
        bits = self._consumed.get(shard)
        if bits is None:
            assert self.shard_samples is not None
            if not 0 <= shard < len(self.shard_samples):
                raise ValueError(f"shard index {shard} outside the stream's {len(self.shard_samples)} shards")
            bits = self._consumed[shard] = np.zeros(self.shard_samples[shard], dtype=np.bool_)
        return bits

    def mark(self, batch: Mapping[str, Any]) -> int:
        """Records the rows of ``batch`` as consumed.

        Args:
            batch: A batch with ``shard``, ``index`` and ``epoch`` (arrays/tensors or, for ``epoch``, an int).

        Returns:
            The number of rows newly marked.

        Raises:
            ValueError: the position is unbound, or the batch belongs to another epoch.
        """
        if not self.bound:
            raise ValueError("StreamPosition.mark: the position is not bound to a stream yet")
        shards = _as_numpy(batch["shard"]).astype(np.int64).ravel()
        indices = _as_numpy(batch["index"]).astype(np.int64).ravel()
        epochs = np.unique(_as_numpy(batch["epoch"]).ravel()) if "epoch" in batch else np.array([self.epoch])
        if epochs.size and (epochs.size > 1 or int(epochs[0]) != self.epoch):
            raise ValueError(f"batch rows of epoch(s) {epochs.tolist()} marked on a position at epoch {self.epoch}")
        newly = 0
        for shard in np.unique(shards):
            bits = self._bits(int(shard))
            idx = indices[shards == shard]
            if idx.size and (idx.min() < 0 or idx.max() >= bits.size):
                raise ValueError(f"sample index outside shard {int(shard)} ({bits.size} samples): {idx.tolist()}")
            newly += int(np.count_nonzero(~bits[idx]))
            bits[idx] = True
        return newly

    def is_consumed(self, shard: int, index: int) -> bool:
        """Tells whether sample ``index`` of shard ``shard`` is consumed in the current epoch."""
        bits = self._consumed.get(int(shard))
        return bool(bits is not None and bits[int(index)])

    @property
    def num_consumed(self) -> int:
        """Samples consumed in the current epoch."""
        return int(sum(np.count_nonzero(b) for b in self._consumed.values()))

    def next_epoch(self) -> None:
        """Moves to the start of the next epoch (nothing consumed)."""
        if self.epoch is None:
            raise ValueError("StreamPosition.next_epoch: the position has no epoch yet")
        self.epoch += 1
        self._consumed.clear()

    def consumed_bitmaps(self) -> dict[int, np.ndarray]:
        """The consumed samples per shard index (copies; shards with nothing consumed are left out)."""
        return {s: b.copy() for s, b in sorted(self._consumed.items()) if b.any()}

    # -- state

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serializable snapshot for checkpoints.

        Returns:
            ``{"version", "epoch", "seed", "dataset", "shard_samples", "consumed": {shard: base64 bitmap}}``.
        """
        return {
            "version": _POSITION_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "dataset": self.dataset,
            "shard_samples": list(self.shard_samples) if self.shard_samples is not None else None,
            "consumed": {str(s): _pack(b) for s, b in self.consumed_bitmaps().items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replaces this position with a stored one.

        Args:
            state: From :meth:`state_dict` (of one rank or merged).

        Raises:
            ValueError: naming what is wrong with ``state``.
        """
        if not isinstance(state, Mapping) or state.get("version") != _POSITION_VERSION:
            got = state.get("version") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"not a stream position state (version {got!r}, expected {_POSITION_VERSION})")
        samples = state.get("shard_samples")
        epoch = state.get("epoch")
        self.epoch = None if epoch is None else int(epoch)
        self.seed = None if state.get("seed") is None else int(state["seed"])
        self.dataset = state.get("dataset")
        self.shard_samples = None if samples is None else tuple(int(n) for n in samples)
        self._consumed = {}
        consumed = state.get("consumed") or {}
        if consumed and self.shard_samples is None:
            raise ValueError("stream position state has consumed samples but no shard_samples")
        for key, text in consumed.items():
            shard = int(key)
            if self.shard_samples is None or not 0 <= shard < len(self.shard_samples):
                raise ValueError(f"stream position state names shard {shard}, outside the dataset")
            self._consumed[shard] = _unpack(text, self.shard_samples[shard])

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> StreamPosition:
        """Builds a position from :meth:`state_dict` output.

        Args:
            state: A stored state.

        Returns:
            The position.
        """
        position = cls()
        position.load_state_dict(state)
        return position

    def merge(self, others: Iterable[StreamPosition | Mapping[str, Any]]) -> StreamPosition:
        """Unions other ranks' consumed samples into this position (in place).

        Positions of a later epoch win over earlier ones (a rank that finished the epoch has moved on).

        Args:
            others: Positions or their state dicts.

        Returns:
            self.

        Raises:
            ValueError: the positions belong to different datasets or seeds.
        """
        for other in others:
            if not isinstance(other, StreamPosition):
                other = StreamPosition.from_state_dict(other)
            if not other.bound:
                continue
            if not self.bound:
                self.load_state_dict(other.state_dict())
                continue
            if other.dataset != self.dataset or other.seed != self.seed:
                raise ValueError(
                    f"cannot merge positions of different streams: dataset {other.dataset} seed {other.seed} vs "
                    f"dataset {self.dataset} seed {self.seed}"
                )
            if other.epoch is None or (self.epoch is not None and other.epoch < self.epoch):
                continue
            if self.epoch is None or other.epoch > self.epoch:
                self.epoch, self._consumed = other.epoch, {}
            for shard, bits in other._consumed.items():
                mine = self._bits(shard)
                mine |= bits
        return self

    @classmethod
    def merged(cls, states: Iterable[StreamPosition | Mapping[str, Any]]) -> StreamPosition:
        """The union of several ranks' positions (what a checkpoint stores).

        Args:
            states: Positions or state dicts, one per rank.

        Returns:
            A new merged position.
        """
        return cls().merge(states)

    def __repr__(self) -> str:
        return f"StreamPosition(epoch={self.epoch}, consumed={self.num_consumed}, dataset={self.dataset})"


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


# --------------------------------------------------------------------------------------------------- control actor


class _StreamControl:
    """Shared state of one stream (a Ray actor, zero CPUs): the current pass's epoch and consumed samples, the
    per-epoch shard order, and the skip counters with their threshold."""

    def __init__(self, info: dict[str, Any], *, epoch: int, consumed: dict[int, bytes]) -> None:
        self._info = info
        self._epoch = epoch
        self._consumed = consumed
        self._orders: dict[int, np.ndarray] = {}
        self._by_kind: Counter[str] = Counter()
        self._by_shard: dict[str, Counter[str]] = {}
        self._per_epoch: Counter[int] = Counter()
        self._shards_per_epoch: dict[int, dict[str, Counter[str]]] = {}
        self._warned: set[str] = set()
        self._fatal: str | None = None

    def info(self) -> dict[str, Any]:
        return {**self._info, "epoch": self._epoch}

    def begin_pass(self, epoch: int, consumed: dict[int, bytes]) -> None:
        self._epoch = int(epoch)
        self._consumed = dict(consumed)

    def plan(self, slot: int) -> tuple[int, int, bytes | None]:
        """(epoch, shard index, packed consumed bits of that shard or None) for the shard read in ``slot``."""
        epoch = self._epoch
        if self._info["shuffle_shards"]:
            order = self._orders.get(epoch)
            if order is None:
                rng = np.random.default_rng(mix_seed(self._info["seed"], epoch, 0x5A4D))
                order = self._orders[epoch] = rng.permutation(len(self._info["shard_samples"]))
                self._orders = {epoch: order}
            shard = int(order[slot])
        else:
            shard = int(slot)
        return epoch, shard, self._consumed.get(shard)

    def report(self, epoch: int, shard_name: str, counts: dict[str, int], examples: dict[str, str]) -> str | None:
        """Adds a shard's skip counts; returns the error message when the epoch is over its budget."""
        for kind, count in counts.items():
            if count <= 0:
                continue
            self._by_kind[kind] += count
            self._by_shard.setdefault(shard_name, Counter())[kind] += count
            self._shards_per_epoch.setdefault(epoch, {}).setdefault(shard_name, Counter())[kind] += count
            self._per_epoch[epoch] += count
            if kind not in self._warned:
                self._warned.add(kind)
                logger.warning(
                    "%s stream: skipping samples: %s (first in %s: %s); further ones are only counted "
                    "(see skipped_counts)", self._info["split"], kind, shard_name, examples.get(kind, "-"),
                )
        budget = _skip_budget(self._info["total"], self._info["max_skipped_frac"])
        if self._per_epoch[epoch] > budget and self._fatal is None:
            shards = self._shards_per_epoch.get(epoch, {})
            named = "; ".join(
                f"{name}: " + ", ".join(f"{k} x{n}" for k, n in sorted(c.items()))
                for name, c in sorted(shards.items(), key=lambda kv: -sum(kv[1].values()))[:20]
            )
            self._fatal = (
                f"{self._info['split']} stream: {self._per_epoch[epoch]} of {self._info['total']} samples of epoch "
                f"{epoch} skipped, more than data.max_skipped_frac={self._info['max_skipped_frac']} allows "
                f"({budget}); bad shards: {named}"
            )
            logger.error("%s", self._fatal)
        return self._fatal

    def fatal(self) -> str | None:
        return self._fatal

    def stats(self) -> dict[str, Any]:
        return {
            "total": int(sum(self._by_kind.values())),
            "by_kind": dict(sorted(self._by_kind.items())),
            "by_shard": {k: dict(v) for k, v in sorted(self._by_shard.items())},
            "by_epoch": {int(e): int(n) for e, n in sorted(self._per_epoch.items())},
        }


def _control_of(source: Any) -> Any:
    """The control actor of a stream: from a Dataset, a DataIterator (``get_dataset_shard``) or a split iterator."""
    context = source.context if hasattr(source, "context") and not callable(source.context) else None
    if context is None and hasattr(source, "get_context"):
        context = source.get_context()
    control = context.get_config(_CONTROL_KEY) if context is not None else None
    if control is None:
        raise ValueError(
            f"{type(source).__name__} is not a stream built by build_train_dataset/build_eval_dataset "
            "(no control actor in its DataContext)"
        )
    return control


def skipped_counts(source: Any) -> dict[str, Any]:
    """Skip counters of a stream, for logging (``data/skipped``).

    Args:
        source: The dataset, or a worker's iterator of it (``ray.train.get_dataset_shard(...)``).

    Returns:
        ``{"total": int, "by_kind": {kind: n}, "by_shard": {shard name: {kind: n}}, "by_epoch": {epoch: n}}``,
        counted over the whole run (a resumed pass counts its bad samples again).
    """
    import ray

    return ray.get(_control_of(source).stats.remote())


# ---------------------------------------------------------------------------------------------- reading in tasks

_CLIENTS: dict[str, Any] = {}


def _s3_client(s3_cfg: S3Config) -> Any:
    from pipeline.s3 import make_client

    key = hashlib.sha256(s3_cfg.model_dump_json().encode()).hexdigest()
    client = _CLIENTS.get(key)
    if client is None:
        client = _CLIENTS[key] = make_client(s3_cfg, environ={})
    return client


class _Unavailable(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def _read_shard(url: str, s3_cfg: S3Config | None) -> bytes:
    """The whole shard. S3 reads are retried (botocore per request, and here around the body read)."""
    if not url.startswith("s3://"):
        try:
            with open(url, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            raise _Unavailable(SKIP_MISSING_SHARD, url) from None
        except OSError as err:
            raise _Unavailable(SKIP_UNREADABLE_SHARD, f"{url}: {err.strerror or err}") from None

    from botocore.exceptions import BotoCoreError, ClientError

    from pipeline.s3 import split_s3_url

    bucket, key = split_s3_url(url)
    attempts = s3_cfg.max_attempts if s3_cfg is not None else 5
    client = _s3_client(s3_cfg or S3Config())
    last = ""
    for attempt in range(attempts):
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404:
                raise _Unavailable(SKIP_MISSING_SHARD, url) from None
            if status is not None and 400 <= int(status) < 500 and status not in (408, 429):
                raise _Unavailable(SKIP_UNREADABLE_SHARD, f"{url}: {code or status}") from None
            last = f"{code or status}"
        except (BotoCoreError, OSError) as err:  # connection dropped while streaming the body, timeouts
            last = f"{err.__class__.__name__}: {err}"
        if attempt + 1 < attempts:
            time.sleep(min(8.0, 0.2 * 2**attempt))
    raise _Unavailable(SKIP_UNREADABLE_SHARD, f"{url}: {last} (after {attempts} attempts)")


_TAR_BLOCK = 512
_TAR_FILE_TYPES = (b"0", b"\0", b"7")  # regular file (POSIX, old V7), contiguous file
_TAR_OTHER_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, folders, FIFOs: no data of ours


def _tar_files_by_tarfile(data: bytes) -> tuple[list[tuple[str, int, int]], bool]:
    """:func:`_tar_files` through the standard library: every tar dialect (pax, GNU long names, base-256 sizes)
    and its verdict on damaged archives."""
    files: list[tuple[str, int, int]] = []
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
    except (tarfile.TarError, EOFError, OSError):
        return [], True
    with tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, EOFError, OSError):
                return files, True
            if member is None:
                return files, False
            if not member.isfile():
                continue
            end = member.offset_data + member.size
            if end > len(data):
                return files, True
            files.append((member.name, member.offset_data, end))


def _pax_records(block: bytes) -> dict[bytes, bytes]:
    """The ``LENGTH key=value\\n`` records of a pax extended header."""
    records: dict[bytes, bytes] = {}
    while block and block[0] != 0:
        length = int(block[: block.index(b" ")])
        if length < 1:
            raise ValueError(f"pax record length {length}")
        key, _, value = block[block.index(b" ") + 1 : length - 1].partition(b"=")
        records[key] = value
        block = block[length:]
    return records


def _tar_files(data: bytes) -> tuple[list[tuple[str, int, int]], bool]:
    """``(name, start, end)`` of every regular file of a tar held in memory, and whether the tar is damaged.

    Walks the 512-byte ustar headers itself, pax extended headers included (webdataset's writer puts one before
    every member): tarfile costs ~0.14 ms per sample, a twentieth of decoding and augmenting one. Anything else
    (GNU extension headers, global pax headers, base-256 numbers, a bad checksum or record, no end-of-archive
    marker) is left to tarfile, whose answer then stands.
    """
    files: list[tuple[str, int, int]] = []
    offset = 0
    pax: dict[bytes, bytes] = {}  # the extended header of the member that follows it
    while offset + _TAR_BLOCK <= len(data):
        header = data[offset : offset + _TAR_BLOCK]
        if header.count(0) == _TAR_BLOCK:  # end-of-archive marker
            return files, False
        kind = header[156:157]
        if kind not in _TAR_FILE_TYPES + _TAR_OTHER_TYPES + (b"x",) or header[124] & 0x80:
            return _tar_files_by_tarfile(data)
        try:
            size, checksum = int(header[124:136].strip(b" \0") or b"0", 8), int(header[148:156].strip(b" \0"), 8)
            start = offset + _TAR_BLOCK
            if kind == b"x":
                pax = _pax_records(data[start : start + size])
                offset = start + -(-size // _TAR_BLOCK) * _TAR_BLOCK
                continue
            size = int(pax.get(b"size", size))
        except ValueError:
            return _tar_files_by_tarfile(data)
        if checksum != sum(header) - sum(header[148:156]) + 8 * ord(" "):  # the checksum field counts as spaces
            return _tar_files_by_tarfile(data)
        name = header[:100].split(b"\0", 1)[0]
        if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX ustar: a path prefix
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        name = pax.get(b"path", name)
        pax = {}
        if kind in _TAR_FILE_TYPES and not name.endswith(b"/"):  # old V7 tars mark folders by the slash
            if start + size > len(data):
                return _tar_files_by_tarfile(data)
            files.append((name.decode("utf-8", "surrogateescape"), start, start + size))
        offset = start + -(-size // _TAR_BLOCK) * _TAR_BLOCK
    return _tar_files_by_tarfile(data)


def _parse_tar(data: bytes) -> tuple[list[dict[str, bytes]], bool]:
    """Groups a tar's members into samples (consecutive members sharing ``KEY.`` as WebDataset does).

    Returns:
        The samples in tar order (``{"__key__": ..., ext: bytes}``) and whether the tar ended early (truncated
        or corrupt); a sample whose data is cut off is dropped.
    """
    samples: list[dict[str, bytes]] = []
    current: dict[str, bytes] | None = None
    files, broken = _tar_files(data)
    for name, start, end in files:
        base = name.rsplit("/", 1)
        stem, dot, ext = base[-1].partition(".")
        key = (base[0] + "/" + stem) if len(base) == 2 else stem
        if current is None or current["__key__"] != key:
            current = {"__key__": key}  # type: ignore[dict-item]
            samples.append(current)
        current[ext.lower() if dot else ""] = data[start:end]
    return samples, broken


def _decode_image(fields: dict[str, bytes]) -> Any:
    from PIL import Image

    raw = next((fields[ext] for ext in _IMAGE_FIELDS if ext in fields), None)
    if raw is None:
        raise _Unavailable(SKIP_NO_IMAGE, f"fields {sorted(k for k in fields if k != '__key__')}")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any decoder failure makes the sample bad
        raise _Unavailable(SKIP_BAD_IMAGE, f"{err.__class__.__name__}: {err}") from None


def _parse_label(fields: dict[str, bytes], num_classes: int) -> int:
    raw = fields.get("cls")
    if raw is None:
        raise _Unavailable(SKIP_NO_LABEL, "no .cls field")
    try:
        label = int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise _Unavailable(SKIP_BAD_LABEL, f".cls is not an integer: {raw[:20]!r}") from None
    if not 0 <= label < num_classes:
        raise _Unavailable(SKIP_BAD_LABEL, f"label {label} outside [0, {num_classes})")
    return label


@dataclass(frozen=True)
class _TaskSpec:
    """Everything a decode task needs (shipped once per task; holds no secrets in its repr)."""

    split: str
    urls: tuple[str, ...]
    names: tuple[str, ...]
    samples: tuple[int, ...]
    num_classes: int
    seed: int
    image: ImageConfig
    data_cfg: DataConfig
    erase_prob: float
    rows_per_block: int
    s3_cfg: S3Config | None


class _RowBuffer:
    """Accumulates decoded rows and emits them as column blocks (``zeros``: unset fields of a row are 0)."""

    def __init__(self, size: int, columns: dict[str, tuple[tuple[int, ...], Any]], *, zeros: bool = False) -> None:
        self.size = size
        self.columns = columns
        self.zeros = zeros
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        alloc = np.zeros if self.zeros else np.empty
        self.data = {k: alloc((self.size, *shape), dtype=dtype) for k, (shape, dtype) in self.columns.items()}

    def add(self, **row: Any) -> dict[str, np.ndarray] | None:
        for k, v in row.items():
            self.data[k][self.n] = v
        self.n += 1
        return self.flush() if self.n == self.size else None

    def flush(self) -> dict[str, np.ndarray] | None:
        if self.n == 0:
            return None
        out = {k: v[: self.n] for k, v in self.data.items()}
        self._reset()
        return out


def _finish_shard(
    control: Any, spec: _TaskSpec, epoch: int, shard: int, counts: Counter[str], examples: dict[str, str]
) -> None:
    import ray

    if not counts:
        return
    fatal = ray.get(control.report.remote(epoch, spec.names[shard], dict(counts), examples))
    if fatal is not None:
        raise DataSkipError(fatal)


def _train_task(batch: dict[str, np.ndarray], spec: _TaskSpec, control: Any) -> Iterator[dict[str, np.ndarray]]:
    """Decode task of the train stream: one slot of the epoch's shard order per input row."""
    import ray

    size = spec.image.size
    transform = build_train_transform(spec.image, spec.data_cfg, prefetcher=True)
    for slot in batch["slot"]:
        epoch, shard, packed = ray.get(control.plan.remote(int(slot)))
        expected = spec.samples[shard]
        consumed = (
            np.unpackbits(np.frombuffer(packed, dtype=np.uint8))[:expected].astype(bool)
            if packed is not None
            else np.zeros(expected, dtype=bool)
        )
        order = np.random.default_rng(mix_seed(spec.seed, epoch, shard)).permutation(expected)
        todo = [int(i) for i in order if not consumed[i]]
        counts: Counter[str] = Counter()
        examples: dict[str, str] = {}
        if not todo:
            continue
        try:
            samples, broken = _parse_tar(_read_shard(spec.urls[shard], spec.s3_cfg))
        except _Unavailable as err:
            counts[err.kind] += len(todo)
            examples[err.kind] = err.detail
            _finish_shard(control, spec, epoch, shard, counts, examples)
            continue
        if len(samples) > expected:
            samples = samples[:expected]
        rows = _RowBuffer(
            spec.rows_per_block,
            {
                "image": ((3, size, size), np.uint8),
                "label": ((), np.int64),
                "shard": ((), np.int32),
                "index": ((), np.int32),
                "epoch": ((), np.int32),
                "erase": ((4,), np.int16),
            },
        )
        for i in todo:
            if i >= len(samples):
                counts[SKIP_TRUNCATED] += 1
                examples.setdefault(
                    SKIP_TRUNCATED,
                    f"{spec.names[shard]}: {len(samples)} of {expected} samples readable"
                    + (" (tar cut off or corrupt)" if broken else ""),
                )
                continue
            fields = samples[i]
            try:
                label = _parse_label(fields, spec.num_classes)
                image = _decode_image(fields)
            except _Unavailable as err:
                counts[err.kind] += 1
                examples.setdefault(err.kind, f"{spec.names[shard]}:{fields['__key__']}: {err.detail}")
                continue
            rng = seed_sample(mix_seed(spec.seed, epoch, shard, i))
            try:
                pixels = np.asarray(transform(image))  # (3, size, size) uint8
            except Exception as err:  # noqa: BLE001 - counted; a systematic failure trips the threshold
                counts[SKIP_TRANSFORM] += 1
                examples.setdefault(SKIP_TRANSFORM, f"{spec.names[shard]}:{fields['__key__']}: {err!r}")
                continue
            box = sample_erase_box(rng, size, size, prob=spec.erase_prob)
            block = rows.add(image=pixels, label=label, shard=shard, index=i, epoch=epoch, erase=box)
            if block is not None:
                yield block
        block = rows.flush()
        if block is not None:
            yield block
        _finish_shard(control, spec, epoch, shard, counts, examples)


def _eval_task(batch: dict[str, np.ndarray], spec: _TaskSpec, control: Any) -> Iterator[dict[str, np.ndarray]]:
    """Decode task of the eval stream: every sample of a shard in order, bad ones as ``valid=False`` rows; slot
    ``-n`` emits ``n`` padding rows."""
    size = spec.image.size
    transform = build_eval_transform(spec.image, prefetcher=True)
    columns = {
        "image": ((3, size, size), np.uint8),
        "label": ((), np.int64),
        "valid": ((), np.bool_),
        "shard": ((), np.int32),
        "index": ((), np.int32),
    }
    for slot in batch["slot"]:
        slot = int(slot)
        rows = _RowBuffer(spec.rows_per_block, columns, zeros=True)  # invalid rows keep a black image
        if slot < 0:  # padding
            for _ in range(-slot):
                block = rows.add(label=-1, valid=False, shard=-1, index=-1)
                if block is not None:
                    yield block
            block = rows.flush()
            if block is not None:
                yield block
            continue
        shard, expected = slot, spec.samples[slot]
        counts: Counter[str] = Counter()
        examples: dict[str, str] = {}
        try:
            samples, broken = _parse_tar(_read_shard(spec.urls[shard], spec.s3_cfg))
        except _Unavailable as err:
            samples, broken = [], False
            counts[err.kind] += expected
            examples[err.kind] = err.detail
        for i in range(expected):
            pixels, label, valid = None, -1, False
            if i < len(samples):
                fields = samples[i]
                try:
                    label = _parse_label(fields, spec.num_classes)
                    image = _decode_image(fields)
                    try:
                        pixels = np.asarray(transform(image))
                    except Exception as err:  # noqa: BLE001 - counted like a bad image
                        raise _Unavailable(SKIP_TRANSFORM, repr(err)) from None
                    valid = True
                except _Unavailable as err:
                    label, pixels = -1, None
                    counts[err.kind] += 1
                    examples.setdefault(err.kind, f"{spec.names[shard]}:{fields['__key__']}: {err.detail}")
            elif not counts.get(SKIP_MISSING_SHARD) and not counts.get(SKIP_UNREADABLE_SHARD):
                counts[SKIP_TRUNCATED] += 1
                examples.setdefault(SKIP_TRUNCATED, f"{spec.names[shard]}: {len(samples)} of {expected} readable")
            row: dict[str, Any] = {"label": label, "valid": valid, "shard": shard, "index": i}
            if pixels is not None:
                row["image"] = pixels
            block = rows.add(**row)
            if block is not None:
                yield block
        block = rows.flush()
        if block is not None:
            yield block
        _finish_shard(control, spec, 0, shard, counts, examples)


# ---------------------------------------------------------------------------------------------------- builders


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
    spec: str | list[str] | None,
    data_cfg: DataConfig,
    model_name: str | None,
    image_config: ImageConfig | None,
    s3_cfg: S3Config | None,
    data_cpus: float,
    extra_info: dict[str, Any],
    epoch: int,
    consumed: dict[int, bytes],
) -> tuple[Any, ShardSet, ImageConfig, _TaskSpec, Any]:
    import ray

    from pipeline.s3 import resolve_s3_config

    if spec is None:
        raise ValueError(f"data.{split} is not set")
    image = resolve_image_config(data_cfg, model_name=model_name, image_config=image_config)
    shard_set = resolve_shards(spec, s3_cfg=s3_cfg)
    if not shard_set.shards:
        raise ValueError(f"data.{split}: no shards in {spec!r}")
    needs_s3 = any(s.url.startswith("s3://") for s in shard_set.shards)
    task_spec = _TaskSpec(
        split=split,
        urls=tuple(s.url for s in shard_set.shards),
        names=tuple(s.name for s in shard_set.shards),
        samples=tuple(s.samples for s in shard_set.shards),
        num_classes=shard_set.num_classes,
        seed=data_cfg.seed,
        image=image,
        data_cfg=data_cfg,
        erase_prob=data_cfg.random_erasing,
        rows_per_block=_rows_per_block(image.size),
        s3_cfg=resolve_s3_config(s3_cfg) if needs_s3 else None,
    )
    info = {
        "split": split,
        "dataset": shard_set.fingerprint,
        "seed": data_cfg.seed,
        "shard_samples": list(task_spec.samples),
        "total": shard_set.num_samples,
        "max_skipped_frac": data_cfg.max_skipped_frac,
        "mean": list(image.mean),
        "std": list(image.std),
        "size": image.size,
        **extra_info,
    }
    control = ray.remote(num_cpus=0, max_restarts=0)(_StreamControl).remote(info, epoch=epoch, consumed=consumed)
    return control, shard_set, image, task_spec, info


def _slots_per_task(num_slots: int, samples_per_slot: float, tasks: int) -> int:
    """Shards per decode task: enough samples that the ~0.2 s between one task and the next on a worker (Ray
    Data's scheduling loop) stays small against the task's work, and still at least 4 tasks per concurrent task
    slot, so the end of an epoch does not wait on one long task."""
    wanted = math.ceil(_SAMPLES_PER_TASK / max(samples_per_slot, 1.0))
    return max(1, min(wanted, num_slots // (4 * tasks)))


def _finish_dataset(items: list[dict[str, int]], fn: Any, task_spec: _TaskSpec, control: Any, *, data_cpus: float,
                    deterministic: bool) -> Any:
    import ray

    tasks, cpus = _task_resources(data_cpus)
    per_task = _slots_per_task(len(items), sum(task_spec.samples) / len(task_spec.samples), tasks)
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_task)).map_batches(
        fn,
        batch_size=per_task,
        fn_kwargs={"spec": task_spec, "control": control},
        compute=ray.data.TaskPoolStrategy(size=tasks),
        num_cpus=cpus,
    )
    ds.context.set_config(_CONTROL_KEY, control)
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
) -> Any:
    """Builds the training stream of ``data_cfg.train`` as a Ray Dataset (lazy; nothing is read yet).

    Each pass over the dataset (each epoch) reads the shards in the order seeded by ``(seed, epoch)`` and skips the
    samples the pass's position has consumed. :func:`iter_train_batches` sets epoch and position before every pass;
    ``epoch`` and ``position`` here only give the first pass's when the dataset is iterated directly.

    Rows: ``image`` uint8 ``(3, S, S)`` (cropped, flipped, RandAugmented), ``label`` int64, ``shard`` int32,
    ``index`` int32, ``epoch`` int32, ``erase`` int16 ``(4,)`` (random-erasing box, applied by
    :func:`iter_train_batches`).

    Args:
        data_cfg: The stage's ``data`` section (shards, seed, augmentation, image size, skip threshold).
        model_name: A RevCol variant whose cfg gives the preprocessing (size, mean/std, interpolation).
        image_config: Explicit preprocessing instead of ``model_name``.
        epoch: First epoch.
        position: Where the first pass starts (a merged checkpoint position); its epoch wins over ``epoch``.
        s3_cfg: The recipe's ``s3`` section (unset fields from the AWS variables).
        data_cpus: CPU budget of the decode tasks (``ScalingConfig.data_cpus``): ``ceil(data_cpus)`` concurrent
            tasks sharing it.

    Returns:
        The ``ray.data.Dataset``; hand it to ``TorchTrainer(datasets={"train": ...})``.

    Raises:
        ValueError: ``data.train`` unset, bad arguments, a position of another dataset.
        pipeline.s3.S3AccessError: S3 cannot be used.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    start = StreamPosition(epoch=epoch)
    if position is not None:
        start = position if isinstance(position, StreamPosition) else StreamPosition.from_state_dict(position)
    # The fingerprint is only known after resolving; bind and check below.
    control, shard_set, image, task_spec, info = _build(
        split="train", spec=data_cfg.train, data_cfg=data_cfg, model_name=model_name, image_config=image_config,
        s3_cfg=s3_cfg, data_cpus=data_cpus,
        extra_info={"shuffle_shards": True, "erase_prob": data_cfg.random_erasing,
                    "shuffle_buffer": data_cfg.shuffle_buffer, "kind": "train"},
        epoch=epoch, consumed={},
    )
    if position is not None:
        import ray

        start.bind(dataset=shard_set.fingerprint, seed=data_cfg.seed, shard_samples=task_spec.samples, epoch=epoch)
        ray.get(control.begin_pass.remote(start.epoch, _packed(start)))
    items = [{"slot": i} for i in range(len(shard_set.shards))]
    logger.info(
        "train stream: %d shard(s), %d samples, %d px, %s decode task(s) x %.2f CPU",
        len(shard_set.shards), shard_set.num_samples, image.size, *_task_resources(data_cpus),
    )
    return _finish_dataset(items, _train_task, task_spec, control, data_cpus=data_cpus,
                           deterministic=data_cfg.deterministic)


def build_eval_dataset(
    data_cfg: DataConfig,
    *,
    num_splits: int,
    batch_size: int | None = None,
    model_name: str | None = None,
    image_config: ImageConfig | None = None,
    s3_cfg: S3Config | None = None,
    data_cpus: float = 1.0,
) -> Any:
    """Builds the eval stream of ``data_cfg.val``: every sample exactly once, in manifest order, plus padding.

    The dataset holds one row per sample of the manifest (bad ones with ``valid=False``) and padding rows
    (``valid=False``, ``shard=-1``) up to a multiple of ``num_splits * batch_size``, so an equal split gives every
    rank the same number of full batches.

    Rows: ``image`` uint8 ``(3, S, S)`` (resize + centre crop), ``label`` int64 (-1 when invalid), ``valid``
    bool, ``shard`` int32, ``index`` int32.

    Args:
        data_cfg: The stage's ``data`` section.
        num_splits: Number of consumers (Ray Train workers).
        batch_size: Eval batch per worker (default ``data_cfg.batch_size``).
        model_name: A RevCol variant whose cfg gives the preprocessing.
        image_config: Explicit preprocessing instead of ``model_name``.
        s3_cfg: The recipe's ``s3`` section.
        data_cpus: CPU budget of the decode tasks.

    Returns:
        The ``ray.data.Dataset``.

    Raises:
        ValueError: ``data.val`` unset or bad arguments.
        pipeline.s3.S3AccessError: S3 cannot be used.
    """
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    batch = data_cfg.batch_size if batch_size is None else batch_size
    if batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch}")
    control, shard_set, image, task_spec, info = _build(
        split="val", spec=data_cfg.val, data_cfg=data_cfg, model_name=model_name, image_config=image_config,
        s3_cfg=s3_cfg, data_cpus=data_cpus,
        extra_info={"shuffle_shards": False, "batch_size": batch, "num_splits": num_splits, "kind": "eval"},
        epoch=0, consumed={},
    )
    pad = -shard_set.num_samples % (num_splits * batch)
    items = [{"slot": i} for i in range(len(shard_set.shards))] + ([{"slot": -pad}] if pad else [])
    logger.info("eval stream: %d shard(s), %d samples + %d padding rows, %d split(s) x %d", len(shard_set.shards),
                shard_set.num_samples, pad, num_splits, batch)
    return _finish_dataset(items, _eval_task, task_spec, control, data_cpus=data_cpus, deterministic=True)


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


def _packed(position: StreamPosition) -> dict[int, bytes]:
    return {s: np.packbits(b).tobytes() for s, b in position.consumed_bitmaps().items()}


# ------------------------------------------------------------------------------------------------ worker side


def _tensor(array: np.ndarray) -> Any:
    import torch

    with warnings.catch_warnings():  # Ray hands out read-only arrays; every use below copies
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _rank_of(source: Any) -> int:
    split = getattr(source, "_output_split_idx", None)
    if isinstance(split, int):
        return split
    try:
        import ray.train

        return int(ray.train.get_context().get_world_rank())
    except Exception:  # noqa: BLE001 - not inside Ray Train
        return 0


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
        "epoch": int}``.

    Raises:
        DataSkipError: more input was skipped than ``data.max_skipped_frac`` allows.
        ValueError: ``position`` belongs to another dataset or seed.
    """
    import ray
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    control = _control_of(source)
    info = ray.get(control.info.remote())
    if info.get("kind") != "train":
        raise ValueError("iter_train_batches needs a stream from build_train_dataset (got an eval stream)")
    position.bind(dataset=info["dataset"], seed=info["seed"], shard_samples=info["shard_samples"],
                  epoch=info["epoch"])
    epoch = int(position.epoch)  # type: ignore[arg-type]
    ray.get(control.begin_pass.remote(epoch, _packed(position)))
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
            images = _tensor(rows["image"]).to(dev, non_blocking=True)
            generator.manual_seed(mix_seed(info["seed"], epoch, int(rows["shard"][0]), int(rows["index"][0])))
            batch = {
                "image": normalize_batch(images, mean=tuple(info["mean"]), std=tuple(info["std"]),
                                         erase=rows["erase"], generator=generator),
                "label": _tensor(rows["label"]).to(dev, dtype=torch.int64),
                "shard": _tensor(rows["shard"]).to(torch.int64),
                "index": _tensor(rows["index"]).to(torch.int64),
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
        ValueError: ``batch_size`` differs from the dataset's, or the stream is split into another number of
            parts than it was built for.
    """
    import ray
    import torch

    control = _control_of(source)
    info = ray.get(control.info.remote())
    if info.get("kind") != "eval":
        raise ValueError("iter_eval_batches needs a stream from build_eval_dataset (got a train stream)")
    splits = source.world_size() if hasattr(source, "world_size") else None
    if splits is None and info["num_splits"] > 1 and hasattr(source, "get_context"):
        logger.warning(
            "the eval stream (built for %d workers) reaches this worker unsplit: every rank evaluates every sample; "
            "give TorchTrainer dataset_config=train_data_config(datasets) to split it", info["num_splits"],
        )
    if splits is not None and splits != info["num_splits"]:
        raise ValueError(
            f"the eval stream is split {splits} ways but was built for num_splits={info['num_splits']}; an equal "
            "split would drop samples (build it with build_eval_dataset(num_splits=<number of workers>))"
        )
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
            images = _tensor(rows["image"]).to(dev, non_blocking=True)
            yield {
                "image": normalize_batch(images, mean=tuple(info["mean"]), std=tuple(info["std"])),
                "label": _tensor(rows["label"]).to(dev, dtype=torch.int64),
                "valid": _tensor(rows["valid"]).to(dev),
                "shard": _tensor(rows["shard"]).to(torch.int64),
                "index": _tensor(rows["index"]).to(torch.int64),
            }
