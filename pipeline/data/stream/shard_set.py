"""The shards of a data spec, resolved through their manifests, and the preflight check run before any trainer."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import DataConfig, S3Config
from pipeline.data.stream.mixture import MixtureOrder, label_maps
from pipeline.data.stream.skips import DataSkipError, skip_budget

__all__ = ["ShardRef", "ShardSet", "check_inputs", "resolve_shards", "resolve_split"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardRef:
    """One shard of a stream.

    Args:
        index: Position in the stream's shard list (the ``shard`` column of every row).
        name: File name (``shard-000000.tar``).
        url: Local path or ``s3://`` URL.
        samples: Samples in the shard, per the manifest.
        bytes: Size per the manifest.
    """

    index: int
    name: str
    url: str
    samples: int
    bytes: int


@dataclass(frozen=True, eq=False)
class ShardSet:
    """The shards of one data spec (``data.train`` or ``data.val``), resolved through their manifests, as arrays:
    shard ``i`` of the stream is file ``shard_name(number[i])`` in ``folders[folder[i]]``. Nothing here is a
    Python object per shard, so a 2 M-shard set is a few tens of MB and ships to an actor as such.

    Args:
        folders: The folders or ``s3://`` prefixes of the spec's manifests, in order of first use.
        folder: ``(N,)`` int32, each shard's folder (index into ``folders``).
        number: ``(N,)`` int64, each shard's number in its folder's manifest.
        samples: ``(N,)`` int64, samples per shard, per the manifests.
        bytes: ``(N,)`` int64, size of each shard, per the manifests.
        classes: Class names (index → name).
        num_samples: Total samples (a mixture: of one epoch, as its draws expect them).
        fingerprint: Digest of the shard names, digests and sample counts (a mixture: of its sources' and its
            draws); a stored position only applies to the same one.
        mixture: A mixture's sampler (its shards are every copy of every source's, see
            :mod:`pipeline.data.stream.mixture`); None for one source.
        sources: A mixture's source names.
        label_maps: A mixture's label map per source (its class index → the stage's); empty for one source.
    """

    folders: tuple[str, ...]
    folder: np.ndarray
    number: np.ndarray
    samples: np.ndarray
    bytes: np.ndarray
    classes: tuple[str, ...]
    num_samples: int
    fingerprint: str
    mixture: MixtureOrder | None = None
    sources: tuple[str, ...] = ()
    label_maps: tuple[np.ndarray, ...] = ()

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def num_shards(self) -> int:
        """Number of shards."""
        return int(self.samples.size)

    @property
    def num_slots(self) -> int:
        """Shards one epoch reads: all of them, or a mixture's draws."""
        return self.num_shards if self.mixture is None else self.mixture.num_slots

    def name(self, shard: int) -> str:
        """File name of shard ``shard``."""
        from pipeline.data.shards import shard_name

        return shard_name(int(self.number[shard]))

    def url(self, shard: int) -> str:
        """Local path or ``s3://`` URL of shard ``shard``."""
        return storage.join(self.folders[int(self.folder[shard])], self.name(shard))

    def ref(self, shard: int) -> ShardRef:
        """Shard ``shard`` as one object."""
        return ShardRef(index=int(shard), name=self.name(shard), url=self.url(shard),
                        samples=int(self.samples[shard]), bytes=int(self.bytes[shard]))


def resolve_shards(spec: str | Sequence[str], *, s3_cfg: S3Config | None = None) -> ShardSet:
    """Resolves a data spec into its shards through their manifests (either manifest version).

    Args:
        spec: A manifest (``.../manifest.json``), a folder or ``s3://`` prefix holding one, or a list of shard
            files (``.../shard-000003.tar``, each listed in the manifest next to it) or of the former.
        s3_cfg: S3 settings; unset fields come from the AWS variables.

    Returns:
        The resolved shards (manifest order; a list keeps its order).

    Raises:
        FileNotFoundError: a manifest or its shard index is missing.
        ValueError: a spec item is not a manifest, folder or listed shard; manifests disagree on the classes; a
            manifest or its index is malformed.
        pipeline.storage.S3AccessError: S3 cannot be used (unreachable endpoint, bad credentials, missing bucket).
    """
    from pipeline.data.shards import MANIFEST_NAME
    from pipeline.data.shards.manifest import (
        Destination,
        ShardIndex,
        read_destination_manifest,
        read_index,
        shard_number,
        shards_fingerprint,
    )

    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("data spec is empty (expected a manifest, a folder/prefix or a list of shards)")
    folders: dict[str, int] = {}
    opened: list[tuple[Destination, dict[str, Any]]] = []
    indexes: list[ShardIndex] = []  # without the digests, which only an uncached fingerprint needs
    classes_of: list[list[str]] = []

    def folder_of(folder: str) -> int:
        if folder not in folders:
            store = Destination(folder if folder.startswith("s3://") else str(Path(folder).expanduser()),
                                s3_config=s3_cfg)
            manifest = read_destination_manifest(store)
            if not isinstance(manifest.get("classes"), list):
                raise ValueError(f"{storage.join(folder, MANIFEST_NAME)} is not a shards manifest (no 'classes')")
            opened.append((store, manifest))
            indexes.append(read_index(store, manifest, sha256=False))
            classes_of.append([str(c) for c in manifest["classes"]])
            folders[folder] = len(folders)
        return folders[folder]

    picked: list[tuple[int, np.ndarray | None]] = []  # (folder id, shard numbers in it; None: all of them)
    classes: list[str] | None = None
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"data spec item {item!r} is not a path or s3:// URL")
        url = item if item.startswith("s3://") else str(Path(item).expanduser().resolve())
        if url.endswith(".tar"):
            folder, name = storage.parent(url)
            fid = folder_of(folder)
            number = shard_number(name)
            if number is None or number >= len(indexes[fid]):
                raise ValueError(f"shard {item!r} is not listed in {storage.join(folder, MANIFEST_NAME)}")
            numbers = np.array([number], dtype=np.int64)
        else:
            if url.endswith(".json"):
                folder, name = storage.parent(url)
                if name != MANIFEST_NAME:
                    raise ValueError(f"data spec {item!r}: a manifest must be called {MANIFEST_NAME}")
            else:
                folder = url.rstrip("/")
            fid = folder_of(folder)
            numbers = None
        if classes is None:
            classes = classes_of[fid]
        elif classes != classes_of[fid]:
            raise ValueError(f"data spec {item!r}: its classes differ from the other manifests' of the spec")
        picked.append((fid, numbers))

    folder_ids = [f for f, _ in picked]
    numbers = [np.arange(len(indexes[f]), dtype=np.int64) if n is None else n for f, n in picked]
    recorded = opened[folder_ids[0]][1].get("shards_fingerprint")
    if len(picked) == 1 and picked[0][1] is None and isinstance(recorded, str):
        fingerprint = recorded  # one whole corpus: its writer recorded the digest of all its shards
    else:
        digests = {f: read_index(*opened[f]).sha256 for f in dict.fromkeys(folder_ids)}
        fingerprint = shards_fingerprint(
            (n, digests[f][n], indexes[f].samples[n]) for f, n in zip(folder_ids, numbers, strict=True)  # type: ignore[index]
        )
    samples = np.concatenate([indexes[f].samples[n] for f, n in zip(folder_ids, numbers, strict=True)])
    return ShardSet(
        folders=tuple(folders),
        folder=np.concatenate([np.full(n.size, f, dtype=np.int32) for f, n in zip(folder_ids, numbers, strict=True)]),
        number=np.concatenate(numbers),
        samples=samples,
        bytes=np.concatenate([indexes[f].bytes[n] for f, n in zip(folder_ids, numbers, strict=True)]),
        classes=tuple(classes or ()),
        num_samples=int(samples.sum()),
        fingerprint=fingerprint,
    )


def resolve_split(data_cfg: DataConfig, split: str, *, s3_cfg: S3Config | None = None) -> ShardSet:
    """The shards of ``data.train`` or ``data.val``: :func:`resolve_shards` of the spec, or a mixture's shards.

    Raises:
        ValueError: the split is unset, or (besides :func:`resolve_shards`' errors) a mixture's label maps or
            draws are impossible (naming the source).
    """
    if split not in ("train", "val"):
        raise ValueError(f"unknown split {split!r} (allowed: 'train', 'val')")
    spec = getattr(data_cfg, split)
    if spec is None:
        raise ValueError(f"data.{split} is not set")
    if split == "val" or not data_cfg.sources:
        return resolve_shards(spec, s3_cfg=s3_cfg)
    return _resolve_mixture(data_cfg, s3_cfg)


def _resolve_mixture(data_cfg: DataConfig, s3_cfg: S3Config | None) -> ShardSet:
    """A mixture as one shard list: each source's shards ``copies`` times, in ``data.train`` order."""
    import hashlib
    import json

    sources = data_cfg.sources
    names = [source.name for source in sources]
    sets = [resolve_shards(source.shards, s3_cfg=s3_cfg) for source in sources]
    classes, maps = label_maps([s.classes for s in sets], [source.classes for source in sources], names,
                               data_cfg.classes)
    epoch_samples = data_cfg.epoch_samples or sum(s.num_samples for s in sets)
    mixture = MixtureOrder.plan(shard_samples=[s.samples for s in sets], weights=[source.weight for source in sources],
                                epoch_samples=epoch_samples, replacement=data_cfg.replacement, names=names)
    folders = list(dict.fromkeys(f for s in sets for f in s.folders))
    tiled = {key: [] for key in ("folder", "number", "samples", "bytes")}
    for shard_set, copies in zip(sets, mixture.copies, strict=True):
        folder = np.array([folders.index(f) for f in shard_set.folders], dtype=np.int32)[shard_set.folder]
        for key, array in (("folder", folder), ("number", shard_set.number), ("samples", shard_set.samples),
                           ("bytes", shard_set.bytes)):
            tiled[key].append(np.tile(array, copies))
    expected = sum(d * s.num_samples / s.num_shards for d, s in zip(mixture.draws, sets, strict=True))
    digest = hashlib.sha256(json.dumps({"sources": [s.fingerprint for s in sets], "mixture": mixture.state()},
                                       sort_keys=True).encode()).hexdigest()[:32]
    logger.info("data.train: mixture of %s, %d of %d shard(s) an epoch (~%d samples)",
                ", ".join(f"{n} ({d} shards)" for n, d in zip(names, mixture.draws, strict=True)), mixture.num_slots,
                sum(s.num_shards for s in sets), round(expected))
    return ShardSet(folders=tuple(folders), **{k: np.concatenate(v) for k, v in tiled.items()}, classes=classes,
                    num_samples=round(expected), fingerprint=digest, mixture=mixture, sources=tuple(names),
                    label_maps=maps)


def _existing_sizes(shard_set: ShardSet, s3_cfg: S3Config | None) -> np.ndarray:
    """Stored size of every shard (-1 when missing): one listing per folder or prefix."""
    from pipeline.data.shards import shard_name

    sizes = np.full(shard_set.num_shards, -1, dtype=np.int64)
    for fid, folder in enumerate(shard_set.folders):
        listed = {e.name: e.size for e in storage.list_dir(folder, s3=s3_cfg) if not e.is_dir}
        shards = np.flatnonzero(shard_set.folder == fid)
        sizes[shards] = [listed.get(shard_name(n), -1) for n in shard_set.number[shards].tolist()]
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
        pipeline.storage.S3AccessError: S3 cannot be used.
        FileNotFoundError: a manifest is missing.
        DataSkipError: missing shards hold more samples than allowed.
    """
    resolved: dict[str, ShardSet] = {}
    for split in splits:
        if split not in ("train", "val"):
            raise ValueError(f"splits: unknown split {split!r} (allowed: 'train', 'val')")
        if getattr(data_cfg, split) is None:
            continue
        shard_set = resolve_split(data_cfg, split, s3_cfg=s3_cfg)
        sizes = _existing_sizes(shard_set, s3_cfg)
        missing = np.flatnonzero(sizes < 0)
        short = np.flatnonzero((sizes >= 0) & (sizes < shard_set.bytes))
        if short.size:
            logger.warning(
                "data.%s: %d shard(s) smaller than their manifest records (truncated?): %s",
                split, short.size, ", ".join(shard_set.url(i) for i in short[:5]) + (" ..." if short.size > 5 else ""),
            )
        if missing.size:
            lost = int(shard_set.samples[missing].sum())
            names = ", ".join(shard_set.url(i) for i in missing[:10]) + (" ..." if missing.size > 10 else "")
            allowed = skip_budget(shard_set.num_samples, data_cfg.max_skipped_frac)
            if lost > allowed:
                raise DataSkipError(
                    f"data.{split}: {missing.size} missing shard(s) hold {lost} of {shard_set.num_samples} samples, "
                    f"more than data.max_skipped_frac={data_cfg.max_skipped_frac} allows ({allowed}): {names}"
                )
            logger.warning("data.%s: %d shard(s) missing (%d samples will be skipped): %s", split, missing.size,
                           lost, names)
        logger.info("data.%s: %d shard(s), %d samples, %d classes", split, shard_set.num_shards,
                    shard_set.num_samples, shard_set.num_classes)
        resolved[split] = shard_set
    train, val = resolved.get("train"), resolved.get("val")
    if train is not None and train.mixture is not None and val is not None and val.classes != train.classes:
        raise ValueError(f"data.val: its classes {list(val.classes)[:20]} differ from the mixture's label set "
                         f"{list(train.classes)[:20]} (data.classes, or the sources' classes)")
    return resolved
