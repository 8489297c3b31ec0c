"""``revcol shards write | verify``: image folders and bundled datasets to WebDataset shards, and back.

Layout at a destination (a local folder or ``s3://bucket/prefix``)::

    shard-000000.tar   shard-000001.tar   ...   manifest.json

Each shard is a WebDataset tar written with ``webdataset.TarWriter``; a sample ``KEY`` (eight digits, its position
in the written order) is ``KEY.jpg`` or ``KEY.png`` (an RGB image), ``KEY.cls`` (the integer label as text) and
``KEY.json`` (metadata: class name, original file, original format/mode/size). ``manifest.json`` lists every shard
(name, samples, bytes, sha256), the class names (index -> name), the counts, the seed and the source; see
:func:`write_shards` for the full schema.

Guarantees:

* Deterministic: the same source, split, seed and shard settings give byte-identical shards (inputs sorted, one
  seeded shuffle, fixed tar metadata: mtime 0, uid/gid 0, user/group ``revcol``, mode 0444, ustar).
* Resumable: each shard is written under a temporary name and renamed (or uploaded) when complete, then recorded in
  ``manifest.partial.json``. Rerunning the same command checks the recorded shards (sha256 of local files; size and
  the uploaded sha256 metadata for S3 objects), keeps the good ones, rewrites damaged ones and continues.
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

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pipeline import __version__
from pipeline.config import S3Config

__all__ = [
    "DEFAULT_SPLITS",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "PARTIAL_MANIFEST_NAME",
    "ShardsExistError",
    "parse_splits",
    "read_manifest",
    "shard_name",
    "verify_shards",
    "write_shards",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the shard layout and manifest schema."""
MANIFEST_NAME = "manifest.json"
PARTIAL_MANIFEST_NAME = "manifest.partial.json"
DEFAULT_SPLITS: dict[str, float] = {"train": 0.8, "test": 0.2}
"""Fractions used when ``split`` is given without ``splits``."""

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
"""File extensions read as images from an image folder (case-insensitive); other files are ignored."""
SAMPLE_IMAGE_EXTENSIONS = ("jpg", "png")
"""Image fields a sample may carry."""

_JPEG_QUALITY = 95
_ENCODING = f"rgb;keep-rgb-jpeg;jpeg-q{_JPEG_QUALITY};png;alpha-over-white"
"""Changes whenever the image encoding changes: part of the fingerprint."""
_TAR_MTIME = 0.0
_TAR_USER = "revcol"
_TAR_MODE = 0o444
_SHARD_RE = re.compile(r"^shard-\d{6,}\.tar$")
_TMP_SUFFIX = ".tmp"
_BLOCK = 512
_MULTIPART_THRESHOLD = 64 * 1024 * 1024


class ShardsExistError(ValueError):
    """The destination holds a different dataset; writing needs ``force``."""


def shard_name(index: int) -> str:
    """Returns the file name of shard ``index`` (``shard-000000.tar``).

    Args:
        index: Zero-based shard number.

    Returns:
        The name.
    """
    return f"shard-{index:06d}.tar"


def parse_splits(spec: str | Mapping[str, float]) -> dict[str, float]:
    """Parses and checks split fractions: ``"pretrain=0.6,finetune=0.2,test=0.2"`` or a mapping.

    Args:
        spec: The fractions; names are letters, digits, ``_``, ``-``; fractions are positive and sum to 1.

    Returns:
        Name -> fraction, in the given order.

    Raises:
        ValueError: naming the bad part.
    """
    if isinstance(spec, str):
        fractions: dict[str, float] = {}
        for part in spec.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep:
                raise ValueError(f"splits {spec!r}: {part!r} is not NAME=FRACTION")
            try:
                fractions[name.strip()] = float(value)
            except ValueError:
                raise ValueError(f"splits {spec!r}: fraction {value!r} of {name.strip()!r} is not a number") from None
    else:
        fractions = {str(k): float(v) for k, v in spec.items()}
    if not fractions:
        raise ValueError("splits: no split given")
    for name, frac in fractions.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"splits: split name {name!r} may only hold letters, digits, '_', '-'")
        if not (0 < frac <= 1) or math.isnan(frac):
            raise ValueError(f"splits: fraction of {name!r} must lie in (0, 1], got {frac}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"splits: fractions must sum to 1, got {total:g} ({fractions})")
    return fractions


# --------------------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Item:
    ident: str
    """Stable identity within the source (digits index, or path relative to the image folder)."""
    label: int


@dataclass(frozen=True)
class _Encoded:
    ext: str
    data: bytes
    meta: dict[str, Any]


class _Unreadable(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class _Source:
    kind: str
    classes: list[str]
    items: list[_Item]
    digest: str

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, item: _Item) -> _Encoded:
        raise NotImplementedError


class _DigitsSource(_Source):
    kind = "digits"

    def __init__(self) -> None:
        import numpy as np
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
        labels = bunch.target.astype(np.int64)
        self._pixels = pixels
        self.classes = [str(int(c)) for c in bunch.target_names]
        self.items = [_Item(ident=f"{i:04d}", label=int(labels[i])) for i in range(len(labels))]
        self.digest = hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": "sklearn.datasets.load_digits", "items": len(self.items)}

    def encode(self, item: _Item) -> _Encoded:
        from PIL import Image

        gray = Image.fromarray(self._pixels[int(item.ident)], mode="L")
        data = _png_bytes(gray.convert("RGB"))
        meta = {"source": f"digits:{item.ident}", "orig_format": "sklearn", "orig_mode": "L", "orig_size": [8, 8]}
        return _Encoded("png", data, meta)


class _ImageFolderSource(_Source):
    kind = "image_folder"

    def __init__(self, root: Path) -> None:
        if not root.exists():
            raise FileNotFoundError(f"source {str(root)!r} is neither 'digits' nor an existing folder")
        if not root.is_dir():
            raise ValueError(f"source {str(root)!r} is not a folder (expected one subfolder per class)")
        self.root = root.resolve()
        class_dirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ValueError(f"source folder {str(root)!r} has no class subfolders (expected one subfolder per class)")
        loose = [p.name for p in self.root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if loose:
            logger.warning(
                "source %s: ignoring %d image file(s) outside the class subfolders (e.g. %r)", root, len(loose),
                sorted(loose)[0],
            )
        self.classes = [p.name for p in class_dirs]
        items: list[_Item] = []
        listing = hashlib.sha256()
        ignored: list[str] = []
        empty: list[str] = []
        for label, class_dir in enumerate(class_dirs):
            found = 0
            for path in sorted(class_dir.rglob("*")):
                rel = path.relative_to(self.root)
                if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                    continue
                if path.suffix.lower() not in IMAGE_EXTENSIONS:
                    ignored.append(rel.as_posix())
                    continue
                items.append(_Item(ident=rel.as_posix(), label=label))
                listing.update(f"{rel.as_posix()}\0{label}\0{path.stat().st_size}\n".encode())
                found += 1
            if not found:
                empty.append(class_dir.name)
        if empty:
            raise ValueError(
                f"source folder {str(root)!r}: class folder(s) without image files: {', '.join(map(repr, empty))} "
                f"(image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        if ignored:
            logger.info("source %s: ignored %d non-image file(s) (e.g. %r)", root, len(ignored), ignored[0])
        self.items = items
        self.digest = listing.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.root), "items": len(self.items)}

    def encode(self, item: _Item) -> _Encoded:
        return _encode_image_file(self.root / item.ident, item.ident)


def _open_source(source: str) -> _Source:
    if source == "digits":
        return _DigitsSource()
    return _ImageFolderSource(Path(source).expanduser())


def _png_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _jpeg_bytes(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=_JPEG_QUALITY)
    return buf.getvalue()


def _to_rgb(image: Any) -> Any:
    """Converts any PIL mode to RGB (alpha over white, CMYK/YCbCr/palette converted, high bit depths scaled)."""
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") else max(float(arr.max(initial=0.0)), 255.0)
        return Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _encode_image_file(path: Path, ident: str) -> _Encoded:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        raw = path.read_bytes()
    except OSError as err:
        raise _Unreadable("unreadable file", f"{ident}: {err.strerror or err}") from None
    if not raw:
        raise _Unreadable("empty file", ident)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            image.load()  # full decode: truncated or corrupt data fails here
            fmt = image.format or "unknown"
            orig_mode, orig_size = image.mode, list(image.size)
            orientation = image.getexif().get(0x0112, 1)
            if fmt == "JPEG" and orig_mode == "RGB" and orientation in (0, 1):
                data, ext = raw, "jpg"
            else:
                rgb = _to_rgb(ImageOps.exif_transpose(image) if orientation not in (0, 1) else image)
                data, ext = (_jpeg_bytes(rgb), "jpg") if fmt == "JPEG" else (_png_bytes(rgb), "png")
    except UnidentifiedImageError:
        raise _Unreadable("not a recognisable image", ident) from None
    except Image.DecompressionBombError as err:
        raise _Unreadable("image too large", f"{ident}: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise _Unreadable("truncated or corrupt image", f"{ident}: {err}") from None
    meta = {"source": ident, "orig_format": fmt, "orig_mode": orig_mode, "orig_size": orig_size}
    return _Encoded(ext, data, meta)


def _select_split(
    items: list[_Item], *, split: str | None, splits: dict[str, float] | None, split_seed: int
) -> list[_Item]:
    if split is None or splits is None:
        return list(items)
    names = list(splits)
    index = names.index(split)
    by_class: dict[int, list[_Item]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    cumulative = [sum(splits[n] for n in names[: j + 1]) for j in range(len(names))]
    chosen: list[_Item] = []
    for label in sorted(by_class):
        members = sorted(
            by_class[label], key=lambda it: (hashlib.sha256(f"{split_seed}:{it.ident}".encode()).hexdigest(), it.ident)
        )
        n = len(members)
        bounds = [0] + [math.floor(n * c + 0.5) for c in cumulative[:-1]] + [n]
        chosen.extend(members[bounds[index] : bounds[index + 1]])
    return chosen


# ----------------------------------------------------------------------------------------------------------- stores


class _Store:
    """A destination: a local folder or an S3 prefix. Names are plain file names directly under it."""

    url: str

    def where(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}"

    def read_bytes(self, name: str) -> bytes | None:
        raise NotImplementedError

    def write_bytes(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def put_file(self, local: Path, name: str, *, sha256: str) -> None:
        raise NotImplementedError

    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def matches(self, name: str, *, size: int, sha256: str) -> bool:
        """Cheap check that a stored shard is the recorded one."""
        raise NotImplementedError

    def open_read(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def list_names(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Checks (and for folders creates) the destination before writing."""
        raise NotImplementedError

    def scratch_dir(self) -> Path:
        """Folder for shards being written."""
        raise NotImplementedError

    def cleanup_scratch(self) -> None:
        pass


class _LocalStore(_Store):
    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = str(path)

    def prepare(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"destination {self.url!r} exists and is not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        for leftover in self.path.glob(f".*{_TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)  # a shard or manifest interrupted mid-write

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        tmp = self.path / f".{name}{_TMP_SUFFIX}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path / name)

    def put_file(self, local: Path, name: str, *, sha256: str) -> None:
        os.replace(local, self.path / name)

    def size(self, name: str) -> int | None:
        try:
            return (self.path / name).stat().st_size
        except FileNotFoundError:
            return None

    def matches(self, name: str, *, size: int, sha256: str) -> bool:
        if self.size(name) != size:
            return False
        digest = hashlib.sha256()
        with open(self.path / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest() == sha256

    def open_read(self, name: str) -> IO[bytes]:
        return open(self.path / name, "rb")  # noqa: SIM115 - the caller closes it

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def list_names(self) -> list[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.name for p in self.path.iterdir() if p.is_file())

    def scratch_dir(self) -> Path:
        return self.path  # temporary names in the destination itself: the final rename is atomic


class _S3Store(_Store):
    def __init__(self, url: str, *, s3_config: S3Config | None) -> None:
        from pipeline.s3 import make_client, split_s3_url

        self.url = url.rstrip("/")
        self.bucket, key = split_s3_url(url)
        self.prefix = key.strip("/") + "/" if key.strip("/") else ""
        self.client = make_client(s3_config)
        self._scratch: Path | None = None

    def prepare(self) -> None:
        from pipeline.s3 import check_access

        check_access(self.client, self.bucket)

    def _key(self, name: str) -> str:
        return self.prefix + name

    def read_bytes(self, name: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=self._key(name), Body=data)

    def put_file(self, local: Path, name: str, *, sha256: str) -> None:
        from boto3.s3.transfer import TransferConfig

        transfer = TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD, multipart_chunksize=_MULTIPART_THRESHOLD)
        self.client.upload_file(
            str(local),
            self.bucket,
            self._key(name),
            ExtraArgs={"Metadata": {"sha256": sha256}, "ContentType": "application/x-tar"},
            Config=transfer,
        )
        local.unlink()

    def _head(self, name: str) -> dict[str, Any] | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(name))
        except ClientError as err:
            if err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise

    def size(self, name: str) -> int | None:
        head = self._head(name)
        return None if head is None else int(head["ContentLength"])

    def matches(self, name: str, *, size: int, sha256: str) -> bool:
        head = self._head(name)
        return (
            head is not None
            and int(head["ContentLength"]) == size
            and head.get("Metadata", {}).get("sha256") == sha256
        )

    def open_read(self, name: str) -> IO[bytes]:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(name))["Body"]

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(name))

    def list_names(self) -> list[str]:
        names: list[str] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"):
            names.extend(obj["Key"][len(self.prefix) :] for obj in page.get("Contents", []))
        return sorted(names)

    def scratch_dir(self) -> Path:
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="revcol-shards-"))
        return self._scratch

    def cleanup_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None


def _open_store(dest: str, *, s3_config: S3Config | None) -> _LocalStore | _S3Store:
    from pipeline.s3 import is_s3_url

    if is_s3_url(dest):
        return _S3Store(dest, s3_config=s3_config)
    return _LocalStore(Path(dest).expanduser())


def _load_json(store: _Store, name: str) -> dict[str, Any] | None:
    data = store.read_bytes(name)
    if data is None:
        return None
    try:
        obj = json.loads(data)
    except ValueError as err:
        raise ValueError(f"{store.where(name)} is not valid JSON ({err}); remove it or write with --force") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{store.where(name)} is not a shards manifest (not a JSON object)")
    return obj


def _dump_json(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def read_manifest(dest: str, *, s3_config: S3Config | None = None) -> dict[str, Any]:
    """Reads ``manifest.json`` of a shards destination.

    Args:
        dest: A folder or ``s3://bucket/prefix``.
        s3_config: S3 settings (default: the AWS variables).

    Returns:
        The manifest (schema in :func:`write_shards`).

    Raises:
        FileNotFoundError: there is no ``manifest.json`` (the message says when a write is unfinished).
        pipeline.s3.S3AccessError: the S3 destination cannot be used.
    """
    return _read_manifest(_open_store(dest, s3_config=s3_config))


def _read_manifest(store: _Store) -> dict[str, Any]:
    if isinstance(store, _S3Store):
        store.prepare()  # clear errors for an unreachable endpoint, bad credentials, a missing bucket
    manifest = _load_json(store, MANIFEST_NAME)
    if manifest is None:
        if store.read_bytes(PARTIAL_MANIFEST_NAME) is not None:
            raise FileNotFoundError(
                f"{store.where(MANIFEST_NAME)} does not exist: the write there is unfinished "
                f"({PARTIAL_MANIFEST_NAME} found); rerun the same 'revcol shards write' to resume it"
            )
        raise FileNotFoundError(f"no shards manifest at {store.where(MANIFEST_NAME)}")
    return manifest


# ---------------------------------------------------------------------------------------------------------- writing


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what passes through to ``target``."""

    def __init__(self, target: IO[bytes]) -> None:
        super().__init__()
        self.target = target
        self.digest = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.target.write(view)
        self.digest.update(view)
        self.count += len(view)
        return len(view)


def _member_bytes(payload: int) -> int:
    return _BLOCK + -(-payload // _BLOCK) * _BLOCK


class _ShardWriter:
    """One shard being written to a temporary file with ``webdataset.TarWriter``."""

    def __init__(self, index: int, tmp_path: Path, *, start: int) -> None:
        from webdataset import TarWriter

        self.index = index
        self.name = shard_name(index)
        self.tmp_path = tmp_path
        self.start = start
        self.samples = 0
        self.payload = 0  # tar bytes of the members so far (headers + padded data)
        self.skipped: Counter[str] = Counter()
        self._file = open(tmp_path, "wb")  # noqa: SIM115 - closed in finish()/abort()
        self._hasher = _HashingWriter(self._file)
        self._tar = TarWriter(
            self._hasher,
            user=_TAR_USER,
            group=_TAR_USER,
            mode=_TAR_MODE,
            mtime=_TAR_MTIME,
            encoder=False,
            compress=False,
        )

    def write(self, key: str, sample: dict[str, bytes]) -> None:
        self._tar.write({"__key__": key, **sample})
        self.samples += 1
        self.payload += sum(_member_bytes(len(v)) for v in sample.values())

    def finish(self, *, stop: int) -> dict[str, Any]:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        record: dict[str, Any] = {
            "name": self.name,
            "samples": self.samples,
            "bytes": self._hasher.count,
            "sha256": self._hasher.digest.hexdigest(),
            "source_range": [self.start, stop],
        }
        if self.skipped:
            record["skipped"] = dict(sorted(self.skipped.items()))
        return record

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


def _sample_fields(encoded: _Encoded, *, label: int, class_name: str) -> dict[str, bytes]:
    meta = {"label": label, "class": class_name, **encoded.meta}
    return {
        encoded.ext: encoded.data,
        "cls": str(label).encode(),
        "json": json.dumps(meta, sort_keys=True, separators=(",", ":")).encode(),
    }


def write_shards(
    source: str,
    dest: str,
    *,
    shard_size: int = 1000,
    shard_bytes: int | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    split: str | None = None,
    splits: str | Mapping[str, float] | None = None,
    split_seed: int = 0,
    s3_config: S3Config | None = None,
    on_shard: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Writes ``source`` as WebDataset shards plus ``manifest.json`` to ``dest``; resumes an interrupted write.

    Args:
        source: An image-folder path (one subfolder per class; class index = position in sorted order) or
            ``digits`` (scikit-learn's bundled digits).
        dest: A local folder or ``s3://bucket/prefix`` (S3 settings from ``s3_config`` or the AWS variables).
        shard_size: Most samples per shard.
        shard_bytes: Most bytes per shard (tar members plus end-of-archive blocks; a shard always holds at least
            one sample); None for no byte cap.
        seed: Seed of the sample order (one shuffle of the sorted inputs).
        force: Replace a different dataset found at ``dest``.
        progress: Show a tqdm progress bar on stderr.
        split: Write only this part of a deterministic stratified partition of the source (see module docs).
        splits: The partition's fractions (``"a=0.8,b=0.2"`` or a mapping); default :data:`DEFAULT_SPLITS`.
            Only used with ``split``.
        split_seed: Seed of the partition (independent of ``seed``).
        s3_config: S3 settings; unset fields come from the AWS variables.
        on_shard: Called with each shard's manifest record once the shard is stored. An exception it raises
            stops the write; calling again with the same arguments resumes it.

    Returns:
        The manifest, also stored as ``manifest.json``::

            {"format_version": 1, "complete": true, "fingerprint": "<sha256 of the settings below + source>",
             "source": {"kind": "digits" | "image_folder", "spec": "<SOURCE as given>", "path": "<folder>",
                        "items": <images found>, "split": {"name", "fractions", "seed"} | null},
             "seed": 0, "shard_size": 1000, "shard_bytes": null, "encoding": "<image encoding policy>",
             "classes": ["name of class 0", ...], "num_classes": 10, "num_samples": 1797,
             "skipped": {"<kind of unreadable file>": count},
             "shards": [{"name": "shard-000000.tar", "samples": 1000, "bytes": 1361920, "sha256": "<hex>",
                         "source_range": [0, 1000], "skipped": {...} (only if any)}, ...],
             "sample_fields": {"jpg|png": "...", "cls": "...", "json": "..."}, "created_by": "revcol-pipeline X"}

    Raises:
        FileNotFoundError: ``source`` is neither ``digits`` nor an existing folder.
        ValueError: bad arguments or source (named in the message); :class:`ShardsExistError` when ``dest``
            holds a different dataset and ``force`` is not set.
        pipeline.s3.S3AccessError: the S3 destination cannot be used.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if shard_bytes is not None and shard_bytes < 1:
        raise ValueError(f"shard_bytes must be >= 1 (or None), got {shard_bytes}")
    split_fractions: dict[str, float] | None = None
    if split is not None:
        split_fractions = parse_splits(splits if splits is not None else DEFAULT_SPLITS)
        if split not in split_fractions:
            raise ValueError(f"split {split!r} is not one of the splits {list(split_fractions)} (set splits)")
    elif splits is not None:
        raise ValueError(f"splits={splits!r} given without split (name the part to write)")

    src = _open_source(source)
    items = _select_split(src.items, split=split, splits=split_fractions, split_seed=split_seed)
    if not items:
        raise ValueError(f"split {split!r} of source {source!r} is empty (fractions {split_fractions})")
    items.sort(key=lambda it: (it.label, it.ident))
    random.Random(seed).shuffle(items)

    split_info = None if split is None else {"name": split, "fractions": split_fractions, "seed": split_seed}
    settings = {
        "format_version": FORMAT_VERSION,
        "source": {"kind": src.kind, "digest": src.digest, "split": split_info},
        "seed": seed,
        "shard_size": shard_size,
        "shard_bytes": shard_bytes,
        "encoding": _ENCODING,
    }
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    header: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "source": {**src.describe(), "spec": source, "split": split_info},
        "seed": seed,
        "shard_size": shard_size,
        "shard_bytes": shard_bytes,
        "encoding": _ENCODING,
        "classes": list(src.classes),
        "num_classes": len(src.classes),
        "sample_fields": {
            "jpg|png": "RGB image",
            "cls": "integer class index as text",
            "json": "metadata: label, class, source, orig_format, orig_mode, orig_size",
        },
        "created_by": f"revcol-pipeline {__version__}",
    }

    store = _open_store(dest, s3_config=s3_config)
    store.prepare()
    try:
        records = _reconcile_destination(store, fingerprint=fingerprint, force=force, source=source)
        manifest = _write_all(
            store, src, items, header, records, shard_size=shard_size, shard_bytes=shard_bytes,
            progress=progress, on_shard=on_shard,
        )
    finally:
        store.cleanup_scratch()
    return manifest


def _reconcile_destination(store: _Store, *, fingerprint: str, force: bool, source: str) -> list[dict[str, Any]]:
    """Decides what to keep at the destination; returns the shard records of a resumable earlier write."""
    existing = _load_json(store, MANIFEST_NAME) or _load_json(store, PARTIAL_MANIFEST_NAME)
    names = store.list_names()
    stray_shards = [n for n in names if _SHARD_RE.match(n)]
    if existing is not None and existing.get("fingerprint") == fingerprint:
        records = list(existing.get("shards", []))
        if existing.get("complete"):
            logger.info("%s: already holds this dataset; checking its %d shard(s)", store.url, len(records))
        else:
            logger.info("%s: resuming an interrupted write (%d shard(s) done)", store.url, len(records))
        return records
    if existing is None and not stray_shards:
        return []
    if not force:
        if existing is not None:
            old = existing.get("source", {})
            what = (
                f"a different dataset (source {old.get('spec', old.get('kind'))!r}, seed {existing.get('seed')}, "
                f"shard_size {existing.get('shard_size')}, split {(old.get('split') or {}).get('name')})"
            )
        else:
            what = f"{len(stray_shards)} shard file(s) without a manifest"
        raise ShardsExistError(
            f"destination {store.url!r} already holds {what}; not overwriting it with {source!r} "
            "(use --force / force=True to replace it, or choose another destination)"
        )
    logger.warning("%s: --force: removing the dataset there (%d shard file(s))", store.url, len(stray_shards))
    store.delete(MANIFEST_NAME)  # first, so an interrupted cleanup never leaves a manifest naming missing shards
    store.delete(PARTIAL_MANIFEST_NAME)
    for name in stray_shards:
        store.delete(name)
    return []


def _write_all(
    store: _Store,
    src: _Source,
    items: list[_Item],
    header: dict[str, Any],
    previous: list[dict[str, Any]],
    *,
    shard_size: int,
    shard_bytes: int | None,
    progress: bool,
    on_shard: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from tqdm import tqdm

    records: list[dict[str, Any]] = []
    position = 0
    for expected_index, record in enumerate(previous):
        start, stop = (int(v) for v in record["source_range"])
        if record.get("name") != shard_name(expected_index) or start != position or stop > len(items):
            raise ValueError(
                f"{store.where(PARTIAL_MANIFEST_NAME)}: inconsistent shard record {record.get('name')!r}; "
                "write with --force to start over"
            )
        position = stop
        records.append(record)

    skipped_examples: dict[str, str] = {}
    scratch = store.scratch_dir()
    bar = tqdm(total=len(items), unit="img", desc=f"shards -> {store.url}", file=sys.stderr, disable=not progress)
    try:
        # Shards recorded earlier: keep the good ones, rewrite damaged ones from their recorded range.
        for i, record in enumerate(records):
            if store.matches(record["name"], size=int(record["bytes"]), sha256=record["sha256"]):
                logger.debug("%s: kept", store.where(record["name"]))
            else:
                logger.warning("%s: missing or damaged; rewriting it", store.where(record["name"]))
                start, stop = record["source_range"]
                redo = _write_range(
                    store, src, items, i, start, scratch, shard_size=shard_size, shard_bytes=shard_bytes,
                    limit=stop, examples=skipped_examples,
                )
                if redo["sha256"] != record["sha256"] or redo["source_range"] != record["source_range"]:
                    raise ValueError(
                        f"{store.where(record['name'])}: rewriting it gave different bytes than recorded (the source "
                        "changed since the interrupted write?); write with --force to start over"
                    )
            bar.update(int(record["source_range"][1]) - int(record["source_range"][0]))

        index = len(records)
        while position < len(items):
            record = _write_range(
                store, src, items, index, position, scratch, shard_size=shard_size, shard_bytes=shard_bytes,
                limit=len(items), examples=skipped_examples, bar=bar,
            )
            if record["samples"] == 0:  # only unreadable files were left: account for them in the last shard
                if not records:
                    break
                last = records[-1]
                last["source_range"][1] = record["source_range"][1]
                merged = Counter(last.get("skipped", {})) + Counter(record.get("skipped", {}))
                last["skipped"] = dict(sorted(merged.items()))
                position = record["source_range"][1]
                break
            records.append(record)
            position = record["source_range"][1]
            index += 1
            store.write_bytes(PARTIAL_MANIFEST_NAME, _dump_json({**header, "complete": False, "shards": records}))
            if on_shard is not None:
                on_shard(dict(record))
    finally:
        bar.close()

    skipped: Counter[str] = Counter()
    for record in records:
        skipped.update(record.get("skipped", {}))
    for kind, count in sorted(skipped.items()):
        example = skipped_examples.get(kind)
        logger.warning(
            "skipped %d image file(s): %s%s", count, kind, f" (e.g. {example})" if example else ""
        )
    num_samples = sum(int(r["samples"]) for r in records)
    if num_samples == 0:
        raise ValueError(f"source {header['source']['spec']!r}: no readable images (skipped: {dict(skipped)})")
    manifest = {
        **header,
        "complete": True,
        "num_samples": num_samples,
        "skipped": dict(sorted(skipped.items())),
        "shards": records,
    }
    store.write_bytes(MANIFEST_NAME, _dump_json(manifest))
    store.delete(PARTIAL_MANIFEST_NAME)
    logger.info("%s: %d samples in %d shard(s), %d class(es)", store.url, num_samples, len(records), len(src.classes))
    return manifest


def _write_range(
    store: _Store,
    src: _Source,
    items: list[_Item],
    index: int,
    start: int,
    scratch: Path,
    *,
    shard_size: int,
    shard_bytes: int | None,
    limit: int,
    examples: dict[str, str],
    bar: Any = None,
) -> dict[str, Any]:
    """Writes shard ``index`` from ``items[start:]``, stopping when it holds ``shard_size`` samples, before a
    sample that would exceed ``shard_bytes``, or at ``limit``; stores it and returns its record (``samples`` 0 and
    nothing stored when only unreadable items were left)."""
    writer = _ShardWriter(index, scratch / f".{shard_name(index)}{_TMP_SUFFIX}", start=start)
    position = start
    try:
        while position < limit and writer.samples < shard_size:
            item = items[position]
            try:
                encoded = src.encode(item)
            except _Unreadable as err:
                examples.setdefault(err.kind, err.detail)
                logger.debug("skipping %s", err)
                writer.skipped[err.kind] += 1
                position += 1
                if bar is not None:
                    bar.update(1)
                continue
            fields = _sample_fields(encoded, label=item.label, class_name=src.classes[item.label])
            size = sum(_member_bytes(len(v)) for v in fields.values())
            if shard_bytes is not None and writer.samples > 0 and writer.payload + size + 2 * _BLOCK > shard_bytes:
                break  # this item opens the next shard
            writer.write(f"{position:08d}", fields)
            position += 1
            if bar is not None:
                bar.update(1)
        record = writer.finish(stop=position)
    except BaseException:
        writer.abort()
        raise
    if record["samples"] == 0:
        writer.tmp_path.unlink(missing_ok=True)
        return record
    store.put_file(writer.tmp_path, record["name"], sha256=record["sha256"])
    return record


# -------------------------------------------------------------------------------------------------------- verifying


class _HashingReader(io.RawIOBase):
    """A read-only file that hashes and counts what is read from ``source``."""

    def __init__(self, source: IO[bytes]) -> None:
        super().__init__()
        self.source = source
        self.digest = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.source.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.digest.update(data)
        self.count += n
        return n

    def drain(self) -> None:
        while chunk := self.source.read(1 << 20):
            self.digest.update(chunk)
            self.count += len(chunk)


_KEY_RE = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")


def _iter_samples(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Groups consecutive tar members into samples by key (``KEY.ext``: the name up to the first dot of the
    file name), as WebDataset readers do."""
    key: str | None = None
    fields: dict[str, bytes] = {}
    for member in tar:
        if not member.isfile():
            continue
        match = _KEY_RE.match(member.name)
        prefix, ext = (match.group(1), match.group(2)) if match else (member.name, "")
        handle = tar.extractfile(member)
        data = handle.read() if handle is not None else b""
        if prefix != key:
            if key is not None:
                yield key, fields
            key, fields = prefix, {}
        fields[ext] = data
    if key is not None:
        yield key, fields


def _check_sample(key: str, fields: dict[str, bytes], num_classes: int) -> str | None:
    """Returns what is wrong with one sample, or None."""
    from PIL import Image

    images = [ext for ext in fields if ext.lower() in SAMPLE_IMAGE_EXTENSIONS]
    if len(images) != 1:
        return f"sample {key!r}: expected one image field ({'/'.join(SAMPLE_IMAGE_EXTENSIONS)}), got {sorted(fields)}"
    try:
        with Image.open(io.BytesIO(fields[images[0]])) as image:
            image.load()
    except Exception as err:  # noqa: BLE001 - any decoder failure makes the sample bad
        return f"sample {key!r}: image does not decode ({err.__class__.__name__}: {err})"
    if "cls" not in fields:
        return f"sample {key!r}: no .cls label"
    try:
        label = int(fields["cls"].decode().strip())
    except (UnicodeDecodeError, ValueError):
        return f"sample {key!r}: .cls is not an integer ({fields['cls'][:20]!r})"
    if not 0 <= label < num_classes:
        return f"sample {key!r}: label {label} outside [0, {num_classes})"
    if "json" in fields:
        try:
            json.loads(fields["json"])
        except ValueError:
            return f"sample {key!r}: .json metadata is not valid JSON"
    return None


def _verify_one(store: _Store, record: dict[str, Any], num_classes: int) -> tuple[str | None, int]:
    """Checks one shard; returns (problem or None, samples read)."""
    name = record["name"]
    expected_bytes, expected_samples = int(record["bytes"]), int(record["samples"])
    size = store.size(name)
    if size is None:
        return "missing", 0
    problems: list[str] = []
    if size < expected_bytes:
        problems.append(f"truncated: {size} of {expected_bytes} bytes")
    elif size > expected_bytes:
        problems.append(f"size mismatch: {size} bytes, manifest says {expected_bytes}")
    samples = 0
    bad: list[str] = []
    stream = store.open_read(name)
    reader = _HashingReader(stream)
    try:
        try:
            with tarfile.open(fileobj=io.BufferedReader(reader, 1 << 16), mode="r|") as tar:
                for key, fields in _iter_samples(tar):
                    samples += 1
                    problem = _check_sample(key, fields, num_classes)
                    if problem is not None:
                        bad.append(problem)
        except (tarfile.TarError, EOFError, OSError) as err:
            if not problems:
                problems.append(f"unreadable tar after {samples} sample(s): {err}")
            else:
                problems[-1] += f" (tar unreadable after {samples} sample(s))"
        reader.drain()
    finally:
        stream.close()
    if bad:
        problems.append(f"{len(bad)} undecodable sample(s): {bad[0]}" + (" ..." if len(bad) > 1 else ""))
    if samples != expected_samples and not any(p.startswith(("truncated", "unreadable")) for p in problems):
        problems.append(f"{samples} samples, manifest says {expected_samples}")
    if size == expected_bytes and reader.digest.hexdigest() != record["sha256"]:
        problems.append("sha256 mismatch: content differs from the manifest")
    return ("; ".join(problems) or None), samples


def verify_shards(dest: str, *, progress: bool = True, s3_config: S3Config | None = None) -> dict[str, Any]:
    """Re-reads every shard at ``dest`` and checks it against ``manifest.json``.

    Each shard must exist, have the recorded size, sample count and sha256, and every sample must hold one image
    that decodes and an integer label within the class count.

    Args:
        dest: A folder or ``s3://bucket/prefix`` holding ``manifest.json``.
        progress: Show a tqdm progress bar on stderr.
        s3_config: S3 settings; unset fields come from the AWS variables.

    Returns:
        A report: ``ok`` (bool), ``ok_shards`` (int), ``bad_shards`` (shard name -> problem), ``num_shards``,
        ``num_samples`` (per the manifest), ``samples_read``, ``extra_files`` (shard-like files the manifest does
        not list), ``dest``.

    Raises:
        FileNotFoundError: no ``manifest.json`` at ``dest``.
        ValueError: the manifest is not valid.
    """
    from tqdm import tqdm

    store = _open_store(dest, s3_config=s3_config)
    manifest = _read_manifest(store)
    shards = manifest.get("shards")
    num_classes = manifest.get("num_classes")
    if not isinstance(shards, list) or not isinstance(num_classes, int):
        raise ValueError(f"{store.where(MANIFEST_NAME)} is not a shards manifest (no 'shards' list / 'num_classes')")
    bad: dict[str, str] = {}
    samples_read = 0
    for record in tqdm(shards, unit="shard", desc=f"verify {store.url}", file=sys.stderr, disable=not progress):
        problem, samples = _verify_one(store, record, num_classes)
        samples_read += samples
        if problem is not None:
            bad[record["name"]] = problem
            logger.warning("%s: %s", store.where(record["name"]), problem)
    listed = {r["name"] for r in shards}
    extra = [n for n in store.list_names() if _SHARD_RE.match(n) and n not in listed]
    if extra:
        logger.warning("%s: shard file(s) not in the manifest: %s", store.url, ", ".join(extra))
    return {
        "ok": not bad,
        "dest": store.url,
        "num_shards": len(shards),
        "ok_shards": len(shards) - len(bad),
        "bad_shards": bad,
        "num_samples": manifest.get("num_samples"),
        "samples_read": samples_read,
        "extra_files": extra,
    }
