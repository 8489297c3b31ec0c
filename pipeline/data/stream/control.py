"""The control actor of a stream: the pass's epoch and consumed samples, the shard order, the skip counters."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pipeline.data.stream.position import StreamPosition, epoch_order
from pipeline.data.stream.shard_set import ShardSet
from pipeline.data.stream.skips import skip_budget

__all__ = ["CONTROL_KEY", "ShardPlan", "StreamControl", "control_of", "skipped_counts"]

logger = logging.getLogger(__name__)

CONTROL_KEY = "revcol.stream_control"
"""Key of the control actor's handle in the dataset's ``DataContext`` configs."""


@dataclass(frozen=True)
class ShardPlan:
    """What a decode task reads for one slot of a pass: the only per-shard facts a task receives.

    Args:
        epoch: The pass's epoch.
        shard: The shard's index in the stream.
        url: Where it is.
        name: Its file name (for messages).
        samples: Samples in it, per the manifest.
        source: Its source in a mixture (the index of its label map); 0 for a single source.
        consumed: Its samples consumed in this epoch as ``np.packbits`` bytes; None when none is.
    """

    epoch: int
    shard: int
    url: str
    name: str
    samples: int
    source: int
    consumed: bytes | None


class StreamControl:
    """Shared state of one stream (a Ray actor, zero CPUs): the stream's shards, the current pass's epoch and
    consumed samples, the per-epoch shard order, and the skip counters with their threshold."""

    def __init__(self, info: dict[str, Any], shards: ShardSet, *, epoch: int) -> None:
        self._info = info
        self._shards = shards
        self._epoch = epoch
        self._consumed = StreamPosition()
        self._by_kind: Counter[str] = Counter()
        self._by_shard: dict[str, Counter[str]] = {}
        self._per_epoch: Counter[int] = Counter()
        self._shards_per_epoch: dict[int, dict[str, Counter[str]]] = {}
        self._warned: set[str] = set()
        self._fatal: str | None = None
        self._splits = 1

    def info(self) -> dict[str, Any]:
        return {**self._info, "epoch": self._epoch}

    def begin_pass(self, epoch: int, position: dict[str, Any]) -> None:
        """Starts a pass of ``epoch`` that skips what ``position`` (a :meth:`StreamPosition.state_dict`) consumed."""
        self._epoch = int(epoch)
        self._consumed = StreamPosition.from_state_dict(position)

    def begin_eval(self, splits: int) -> None:
        """Starts a pass of an eval stream read by ``splits`` consumers (the worker group's size, which an elastic
        run changes from one restart to the next): the padding slot pads for that many."""
        self._splits = int(splits)

    def padding_rows(self) -> int:
        """Padding rows that make the eval stream's rows a multiple of ``consumers x batch_size``, so an equal split
        gives every consumer the same number of full batches and drops no sample."""
        return -self._info["total"] % (self._splits * self._info["batch_size"])

    def plan(self, slot: int) -> ShardPlan:
        """The shard read in ``slot`` of the current pass (the epoch's shard order, or the stream's when unshuffled)."""
        epoch, shard, mixture = self._epoch, int(slot), self._shards.mixture
        if self._info["shuffle_shards"]:
            shard = int(epoch_order(self._info["seed"], epoch, self._shards.num_shards, mixture)[shard])
        samples = int(self._shards.samples[shard])
        return ShardPlan(epoch=epoch, shard=shard, url=self._shards.url(shard), name=self._shards.name(shard),
                         samples=samples, source=0 if mixture is None else int(mixture.source_of(shard)),
                         consumed=self._consumed.packed_consumed(shard, samples))

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
        budget = skip_budget(self._info["total"], self._info["max_skipped_frac"])
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


def control_of(source: Any) -> Any:
    """The control actor of a stream: from a Dataset, a DataIterator (``get_dataset_shard``) or a split iterator."""
    context = source.context if hasattr(source, "context") and not callable(source.context) else None
    if context is None and hasattr(source, "get_context"):
        context = source.get_context()
    control = context.get_config(CONTROL_KEY) if context is not None else None
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

    return ray.get(control_of(source).stats.remote())
