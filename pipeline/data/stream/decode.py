"""The decode tasks: read whole shards, group their members into samples, decode, augment, emit uint8 blocks."""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.config import DataConfig, S3Config
from pipeline.data.stream.control import ShardPlan
from pipeline.data.stream.skips import (
    SKIP_BAD_IMAGE,
    SKIP_BAD_LABEL,
    SKIP_MISSING_SHARD,
    SKIP_NO_IMAGE,
    SKIP_NO_LABEL,
    SKIP_TRANSFORM,
    SKIP_TRUNCATED,
    SKIP_UNREADABLE_SHARD,
    DataSkipError,
    Unavailable,
)
from pipeline.data.tar import parse_samples
from pipeline.data.transforms import (
    ImageConfig,
    build_eval_transform,
    build_train_transform,
    mix_seed,
    sample_erase_box,
    seed_sample,
)

__all__ = ["TaskSpec", "eval_task", "read_shard", "train_task"]

_IMAGE_FIELDS = ("jpg", "jpeg", "png")


def read_shard(url: str, s3_cfg: S3Config | None) -> bytes:
    """The whole shard, through :mod:`pipeline.storage` (S3 reads retried per request and around the body).

    Raises:
        Unavailable: the shard is missing or unreadable (its skip kind says which).
    """
    try:
        return storage.read_bytes(url, s3=s3_cfg)
    except FileNotFoundError:
        raise Unavailable(SKIP_MISSING_SHARD, url) from None
    except OSError as err:  # denied, or failing after every retry
        raise Unavailable(SKIP_UNREADABLE_SHARD, str(err) if url in str(err) else f"{url}: {err}") from None


def _decode_image(fields: dict[str, bytes]) -> Any:
    from PIL import Image

    raw = next((fields[ext] for ext in _IMAGE_FIELDS if ext in fields), None)
    if raw is None:
        raise Unavailable(SKIP_NO_IMAGE, f"fields {sorted(k for k in fields if k != '__key__')}")
    try:
        image = Image.open(io.BytesIO(raw))
        image.load()
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as err:  # noqa: BLE001 - any decoder failure makes the sample bad
        raise Unavailable(SKIP_BAD_IMAGE, f"{err.__class__.__name__}: {err}") from None


def _parse_label(fields: dict[str, bytes], num_classes: int) -> int:
    raw = fields.get("cls")
    if raw is None:
        raise Unavailable(SKIP_NO_LABEL, "no .cls field")
    try:
        label = int(raw.decode("utf-8").strip())
    except (UnicodeDecodeError, ValueError):
        raise Unavailable(SKIP_BAD_LABEL, f".cls is not an integer: {raw[:20]!r}") from None
    if not 0 <= label < num_classes:
        raise Unavailable(SKIP_BAD_LABEL, f"label {label} outside [0, {num_classes})")
    return label


@dataclass(frozen=True)
class TaskSpec:
    """What every decode task of a stream needs, shipped once per task; its size does not grow with the corpus
    (each task learns its shards from the control actor's :class:`ShardPlan`). Holds no secrets in its repr.

    Eval streams: the slot numbered ``num_shards`` emits the padding rows (as many as the control actor's
    ``padding_rows()`` says for the pass's consumers).
    ``label_maps`` (mixtures): per source (:attr:`ShardPlan.source`), its class index → the stage's label; empty:
    labels as the shards store them (``num_classes`` of them), so a single source's spec does not grow with its
    classes.
    """

    split: str
    num_shards: int
    num_classes: int
    label_maps: tuple[np.ndarray, ...]
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


def _finish_shard(control: Any, plan: ShardPlan, counts: Counter[str], examples: dict[str, str]) -> None:
    import ray

    if not counts:
        return
    fatal = ray.get(control.report.remote(plan.epoch, plan.name, dict(counts), examples))
    if fatal is not None:
        raise DataSkipError(fatal)


def _stage_label(fields: dict[str, bytes], spec: TaskSpec, source: int) -> int:
    """The sample's class in the stage's label set: its ``.cls`` index, through its source's label map if any."""
    if not spec.label_maps:
        return _parse_label(fields, spec.num_classes)
    label_map = spec.label_maps[source]
    return int(label_map[_parse_label(fields, label_map.size)])


def train_task(batch: dict[str, np.ndarray], spec: TaskSpec, control: Any) -> Iterator[dict[str, np.ndarray]]:
    """Decode task of the train stream: one slot of the epoch's shard order per input row."""
    import ray

    size = spec.image.size
    transform = build_train_transform(spec.image, spec.data_cfg, prefetcher=True)
    for slot in batch["id"]:
        plan: ShardPlan = ray.get(control.plan.remote(int(slot)))
        epoch, shard, expected = plan.epoch, plan.shard, plan.samples
        consumed = (
            np.unpackbits(np.frombuffer(plan.consumed, dtype=np.uint8))[:expected].astype(bool)
            if plan.consumed is not None
            else np.zeros(expected, dtype=bool)
        )
        order = np.random.default_rng(mix_seed(spec.seed, epoch, shard)).permutation(expected)
        todo = [int(i) for i in order if not consumed[i]]
        counts: Counter[str] = Counter()
        examples: dict[str, str] = {}
        if not todo:
            continue
        try:
            samples, broken = parse_samples(read_shard(plan.url, spec.s3_cfg))
        except Unavailable as err:
            counts[err.kind] += len(todo)
            examples[err.kind] = err.detail
            _finish_shard(control, plan, counts, examples)
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
                "source": ((), np.int16),
                "erase": ((4,), np.int16),
            },
        )
        for i in todo:
            if i >= len(samples):
                counts[SKIP_TRUNCATED] += 1
                examples.setdefault(
                    SKIP_TRUNCATED,
                    f"{plan.name}: {len(samples)} of {expected} samples readable"
                    + (" (tar cut off or corrupt)" if broken else ""),
                )
                continue
            fields = samples[i]
            try:
                label = _stage_label(fields, spec, plan.source)
                image = _decode_image(fields)
            except Unavailable as err:
                counts[err.kind] += 1
                examples.setdefault(err.kind, f"{plan.name}:{fields['__key__']}: {err.detail}")
                continue
            rng = seed_sample(mix_seed(spec.seed, epoch, shard, i))
            try:
                pixels = np.asarray(transform(image))  # (3, size, size) uint8
            except Exception as err:  # noqa: BLE001 - counted; a systematic failure trips the threshold
                counts[SKIP_TRANSFORM] += 1
                examples.setdefault(SKIP_TRANSFORM, f"{plan.name}:{fields['__key__']}: {err!r}")
                continue
            box = sample_erase_box(rng, size, size, prob=spec.erase_prob)
            block = rows.add(image=pixels, label=label, shard=shard, index=i, epoch=epoch, source=plan.source,
                             erase=box)
            if block is not None:
                yield block
        block = rows.flush()
        if block is not None:
            yield block
        _finish_shard(control, plan, counts, examples)


def eval_task(batch: dict[str, np.ndarray], spec: TaskSpec, control: Any) -> Iterator[dict[str, np.ndarray]]:
    """Decode task of the eval stream: every sample of a shard in order, bad ones as ``valid=False`` rows; slot
    ``spec.num_shards`` emits the padding rows of the pass (``StreamControl.padding_rows``)."""
    import ray

    size = spec.image.size
    transform = build_eval_transform(spec.image, prefetcher=True)
    columns = {
        "image": ((3, size, size), np.uint8),
        "label": ((), np.int64),
        "valid": ((), np.bool_),
        "shard": ((), np.int32),
        "index": ((), np.int32),
    }
    for slot in batch["id"]:
        slot = int(slot)
        rows = _RowBuffer(spec.rows_per_block, columns, zeros=True)  # invalid rows keep a black image
        if slot == spec.num_shards:  # padding
            for _ in range(ray.get(control.padding_rows.remote())):
                block = rows.add(label=-1, valid=False, shard=-1, index=-1)
                if block is not None:
                    yield block
            block = rows.flush()
            if block is not None:
                yield block
            continue
        plan: ShardPlan = ray.get(control.plan.remote(slot))
        shard, expected = plan.shard, plan.samples
        counts: Counter[str] = Counter()
        examples: dict[str, str] = {}
        try:
            samples, _ = parse_samples(read_shard(plan.url, spec.s3_cfg))
        except Unavailable as err:
            samples = []
            counts[err.kind] += expected
            examples[err.kind] = err.detail
        for i in range(expected):
            pixels, label, valid = None, -1, False
            if i < len(samples):
                fields = samples[i]
                try:
                    label = _stage_label(fields, spec, plan.source)
                    image = _decode_image(fields)
                    try:
                        pixels = np.asarray(transform(image))
                    except Exception as err:  # noqa: BLE001 - counted like a bad image
                        raise Unavailable(SKIP_TRANSFORM, repr(err)) from None
                    valid = True
                except Unavailable as err:
                    label, pixels = -1, None
                    counts[err.kind] += 1
                    examples.setdefault(err.kind, f"{plan.name}:{fields['__key__']}: {err.detail}")
            elif not counts.get(SKIP_MISSING_SHARD) and not counts.get(SKIP_UNREADABLE_SHARD):
                counts[SKIP_TRUNCATED] += 1
                examples.setdefault(SKIP_TRUNCATED, f"{plan.name}: {len(samples)} of {expected} readable")
            row: dict[str, Any] = {"label": label, "valid": valid, "shard": shard, "index": i}
            if pixels is not None:
                row["image"] = pixels
            block = rows.add(**row)
            if block is not None:
                yield block
        block = rows.flush()
        if block is not None:
            yield block
        _finish_shard(control, plan, counts, examples)
