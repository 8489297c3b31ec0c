"""``revcol shards write | verify``: image folders and bundled datasets to WebDataset shards, and back.

Modules: ``sources`` (image folders, the bundled digits, image encoding, split partitions), ``manifest`` (the
destination and its ``manifest.json``), ``writer`` (:func:`write_shards`), ``verify`` (:func:`verify_shards`).

Layout at a destination (a local folder or ``s3://bucket/prefix``)::

    shard-000000.tar   shard-000001.tar   ...   shards.parquet   manifest.json

Each shard is a WebDataset tar written with ``webdataset.TarWriter``; a sample ``KEY`` (eight digits, its position
in the written order) is ``KEY.jpg`` or ``KEY.png`` (an RGB image), ``KEY.cls`` (the integer label as text) and
``KEY.json`` (metadata: class name, original file, original format/mode/size). ``manifest.json`` is a small header
(the class names (index -> name), the counts, the seed, the source, the fingerprint and the name, size and sha256
of ``shards.parquet``); ``shards.parquet`` has a row per shard (samples, bytes, sha256, source range, skipped
files), read as columns, so a corpus of millions of shards needs no giant JSON. See :func:`write_shards` for the
full schema. Manifests of version 1 (every shard listed inside ``manifest.json``) are still read everywhere, and
rerunning the write that made one rewrites it as version 2.

Guarantees:

* Deterministic: the same source, split, seed and shard settings give byte-identical shards (inputs sorted, one
  seeded shuffle, fixed tar metadata: mtime 0, uid/gid 0, user/group ``revcol``, mode 0444, ustar).
* Resumable: each shard is written under a temporary name and renamed (or uploaded) when complete, then recorded in
  ``manifest.partial.json`` (the records inline, as in version 1), which is saved after the first shard, at most
  every 30 s after that and when the write stops on an error (a write killed outright redoes at most 30 s of
  shards); ``shards.parquet`` and then ``manifest.json`` are written once every shard is. Rerunning the same
  command checks the recorded shards (sha256 of local files; size and the uploaded sha256 metadata for S3 objects),
  keeps the good ones, rewrites damaged ones and continues.
* Safe: a destination holding a different dataset (another fingerprint of source + split + seed + shard settings)
  is never overwritten without ``force``.

Images: JPEG files already in RGB are stored unchanged; every other image is converted to RGB (alpha composited
over white, CMYK/grayscale/palette/16-bit converted) and stored as JPEG (quality 95) when it was a JPEG, else as
PNG (lossless). Files without an image extension are ignored; image files that cannot be decoded are skipped, with
one warning per kind of problem and its count. ``digits`` is scikit-learn's bundled 8x8 digits (1797 images, values
0..16 scaled to 0..255), stored as RGB PNGs at their native 8x8 size.

Splits: ``split="test", splits={"pretrain": 0.6, "finetune": 0.2, "test": 0.2}`` writes only the ``test`` part of
a deterministic, stratified partition of the source: within each class, items are ordered by
``sha256(f"{split_seed}:{item id}")`` and cut at the rounded cumulative fractions. The partition depends only on
the source, the fractions and ``split_seed`` (never on ``seed``), so writing each split with the same ``splits`` and
``split_seed`` gives disjoint sets that together cover the source.
"""

from pipeline.data.shards.manifest import (
    FORMAT_VERSION,
    INDEX_NAME,
    MANIFEST_NAME,
    MANIFEST_VERSION,
    PARTIAL_MANIFEST_NAME,
    read_manifest,
    read_records,
    shard_name,
)
from pipeline.data.shards.sources import DEFAULT_SPLITS, parse_splits
from pipeline.data.shards.verify import verify_shards
from pipeline.data.shards.writer import ShardsExistError, write_shards

__all__ = [
    "DEFAULT_SPLITS",
    "FORMAT_VERSION",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "PARTIAL_MANIFEST_NAME",
    "ShardsExistError",
    "parse_splits",
    "read_manifest",
    "read_records",
    "shard_name",
    "verify_shards",
    "write_shards",
]
