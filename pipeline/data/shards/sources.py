"""Where shards come from: an image folder or scikit-learn's bundled digits, each image encoded for a shard,
and the deterministic stratified split partition of a source."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_SPLITS", "ENCODING", "IMAGE_EXTENSIONS", "Encoded", "Item", "Source", "Unreadable", "open_source",
           "parse_splits", "select_split"]

logger = logging.getLogger(__name__)

DEFAULT_SPLITS: dict[str, float] = {"train": 0.8, "test": 0.2}
"""Fractions used when ``split`` is given without ``splits``."""

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
"""File extensions read as images from an image folder (case-insensitive); other files are ignored."""

_JPEG_QUALITY = 95
ENCODING = f"rgb;keep-rgb-jpeg;jpeg-q{_JPEG_QUALITY};png;alpha-over-white"
"""Changes whenever the image encoding changes: part of the fingerprint."""


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


@dataclass(frozen=True)
class Item:
    ident: str
    """Stable identity within the source (digits index, or path relative to the image folder)."""
    label: int


@dataclass(frozen=True)
class Encoded:
    ext: str
    data: bytes
    meta: dict[str, Any]


class Unreadable(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class Source:
    kind: str
    classes: list[str]
    items: list[Item]
    digest: str

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def encode(self, item: Item) -> Encoded:
        raise NotImplementedError


class _DigitsSource(Source):
    kind = "digits"

    def __init__(self) -> None:
        import numpy as np
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)  # (1797, 8, 8)
        labels = bunch.target.astype(np.int64)
        self._pixels = pixels
        self.classes = [str(int(c)) for c in bunch.target_names]
        self.items = [Item(ident=f"{i:04d}", label=int(labels[i])) for i in range(len(labels))]
        self.digest = hashlib.sha256(pixels.tobytes() + labels.tobytes()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": "sklearn.datasets.load_digits", "items": len(self.items)}

    def encode(self, item: Item) -> Encoded:
        from PIL import Image

        gray = Image.fromarray(self._pixels[int(item.ident)], mode="L")
        data = _png_bytes(gray.convert("RGB"))
        meta = {"source": f"digits:{item.ident}", "orig_format": "sklearn", "orig_mode": "L", "orig_size": [8, 8]}
        return Encoded("png", data, meta)


class _ImageFolderSource(Source):
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
        items: list[Item] = []
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
                items.append(Item(ident=rel.as_posix(), label=label))
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

    def encode(self, item: Item) -> Encoded:
        return _encode_image_file(self.root / item.ident, item.ident)


def open_source(source: str) -> Source:
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


def _encode_image_file(path: Path, ident: str) -> Encoded:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        raw = path.read_bytes()
    except OSError as err:
        raise Unreadable("unreadable file", f"{ident}: {err.strerror or err}") from None
    if not raw:
        raise Unreadable("empty file", ident)
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
        raise Unreadable("not a recognisable image", ident) from None
    except Image.DecompressionBombError as err:
        raise Unreadable("image too large", f"{ident}: {err}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise Unreadable("truncated or corrupt image", f"{ident}: {err}") from None
    meta = {"source": ident, "orig_format": fmt, "orig_mode": orig_mode, "orig_size": orig_size}
    return Encoded(ext, data, meta)


def select_split(
    items: list[Item], *, split: str | None, splits: dict[str, float] | None, split_seed: int
) -> list[Item]:
    if split is None or splits is None:
        return list(items)
    names = list(splits)
    index = names.index(split)
    by_class: dict[int, list[Item]] = {}
    for item in items:
        by_class.setdefault(item.label, []).append(item)
    cumulative = [sum(splits[n] for n in names[: j + 1]) for j in range(len(names))]
    chosen: list[Item] = []
    for label in sorted(by_class):
        members = sorted(
            by_class[label], key=lambda it: (hashlib.sha256(f"{split_seed}:{it.ident}".encode()).hexdigest(), it.ident)
        )
        n = len(members)
        bounds = [0] + [math.floor(n * c + 0.5) for c in cumulative[:-1]] + [n]
        chosen.extend(members[bounds[index] : bounds[index + 1]])
    return chosen
