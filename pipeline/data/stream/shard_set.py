"""The shards of a data spec, resolved through their manifests, and the preflight check run before any trainer."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.config import DataConfig, S3Config
from pipeline.data.stream.skips import DataSkipError, skip_budget

__all__ = ["ShardRef", "ShardSet", "check_inputs", "resolve_shards"]

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
        pipeline.storage.S3AccessError: S3 cannot be used (unreachable endpoint, bad credentials, missing bucket).
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
                raise ValueError(f"{storage.join(folder, MANIFEST_NAME)} is not a shards manifest (no 'shards'/'classes')")
            manifests[folder] = manifest
        return manifests[folder]

    picked: list[tuple[str, dict[str, Any]]] = []  # (folder, record)
    classes: list[str] | None = None
    for item in items:
        if not isinstance(item, str) or not item:
            raise ValueError(f"data spec item {item!r} is not a path or s3:// URL")
        url = item if item.startswith("s3://") else str(Path(item).expanduser().resolve())
        if url.endswith(".tar"):
            folder, name = storage.parent(url)
            records = {r["name"]: r for r in manifest_of(folder)["shards"]}
            if name not in records:
                raise ValueError(f"shard {item!r} is not listed in {storage.join(folder, MANIFEST_NAME)}")
            chosen = [records[name]]
        else:
            if url.endswith(".json"):
                folder, name = storage.parent(url)
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
            url=storage.join(folder, str(r["name"])),
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
    """Stored size of every shard (None when missing): one listing per folder or prefix."""
    listed: dict[str, dict[str, int | None]] = {}
    sizes: dict[str, int | None] = {}
    for ref in shard_set.shards:
        folder, name = storage.parent(ref.url)
        if folder not in listed:
            listed[folder] = {e.name: e.size for e in storage.list_dir(folder, s3=s3_cfg) if not e.is_dir}
        sizes[ref.url] = listed[folder].get(name)
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
            allowed = skip_budget(shard_set.num_samples, data_cfg.max_skipped_frac)
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
