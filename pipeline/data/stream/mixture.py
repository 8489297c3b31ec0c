"""The sampler of a weighted multi-source mixture: which shards of which source each epoch reads, and in what order.

A mixture (``data.train`` as a list of sources) has a virtual epoch of ``data.epoch_samples`` samples shared out
by weight. A source's share is drawn in whole shards (``draws``: its share over its mean shard size, at least one),
so every epoch reads the same number of slots and a source's part of it is right to within one shard. Within a
source the shards are drawn from a fresh permutation per epoch; with ``data.replacement`` a share larger than the
source takes further permutations after the first (every shard once before any twice), without it such a share is
an error. The drawn shards of all sources are then interleaved by one more permutation, so each source is spread
over the whole epoch. Everything is seeded by ``(seed, epoch)``.

Samples are identified the way a single source's are, ``(shard, index)``, unique within an epoch: the stream's
shard list holds each source's shards ``copies`` times (copy ``c`` of a source's shard ``j`` is a shard of its
own), so a shard read twice in an epoch is two shards to :class:`~pipeline.data.stream.position.StreamPosition`,
each with its own augmentation seeds. The epoch's order is a permutation of that whole list whose first
``num_slots`` entries are the drawn shards (the rest are not read in that epoch): the position's ranges of
consumed slots then work unchanged, and a pass consumed in order is one range.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.data.transforms import mix_seed

__all__ = ["MixtureOrder", "label_maps"]

_SOURCE_SALT = 0x50C5
_INTERLEAVE_SALT = 0x1E4F


@dataclass(frozen=True)
class MixtureOrder:
    """How a mixture's epochs read its sources; small (three numbers per source), it travels in positions.

    Args:
        sizes: Shards of each source (in ``data.train`` order).
        draws: Shards of each source one epoch reads.
        copies: Times each source's shards appear in the stream's shard list (1 without replacement).
    """

    sizes: tuple[int, ...]
    draws: tuple[int, ...]
    copies: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.sizes) == len(self.draws) == len(self.copies) or not self.sizes:
            raise ValueError(f"a mixture needs sizes, draws and copies per source, got {self}")
        for size, draws, copies in zip(self.sizes, self.draws, self.copies, strict=True):
            if size < 1 or draws < 1 or copies < 1 or draws > size * copies:
                raise ValueError(f"mixture source of {size} shard(s) cannot be drawn {draws} times from {copies} "
                                 f"cop{'y' if copies == 1 else 'ies'}")

    @classmethod
    def plan(cls, *, shard_samples: Sequence[np.ndarray], weights: Sequence[float], epoch_samples: int,
             replacement: bool, names: Sequence[str]) -> MixtureOrder:
        """The draws of each source for an epoch of ``epoch_samples`` samples split by ``weights``.

        Args:
            shard_samples: Per source, the samples of each of its shards.
            weights: Per source, its weight (> 0; normalized here).
            epoch_samples: Samples of one epoch.
            replacement: Whether a source may be read more than once per epoch.
            names: Source names (for messages).

        Raises:
            ValueError: without replacement, a source's share exceeds its shards (naming it).
        """
        total = float(sum(weights))
        sizes, draws, copies = [], [], []
        for name, samples, weight in zip(names, shard_samples, weights, strict=True):
            share = epoch_samples * weight / total
            count = max(1, round(share / (float(np.sum(samples)) / samples.size)))
            if count > samples.size and not replacement:
                raise ValueError(
                    f"data.train source {name!r}: its share of data.epoch_samples={epoch_samples} (weight {weight} of "
                    f"{total:g}) is {share:.0f} samples, {count} of its {samples.size} shards ({int(np.sum(samples))} "
                    "samples); set data.replacement: true to repeat it, or lower its weight or data.epoch_samples"
                )
            sizes.append(int(samples.size))
            draws.append(int(count))
            copies.append(math.ceil(count / samples.size))
        return cls(sizes=tuple(sizes), draws=tuple(draws), copies=tuple(copies))

    @property
    def num_shards(self) -> int:
        """Shards in the stream's list (every copy of every source's shards)."""
        return int(sum(s * c for s, c in zip(self.sizes, self.copies, strict=True)))

    @property
    def num_slots(self) -> int:
        """Shards one epoch reads."""
        return int(sum(self.draws))

    def starts(self) -> np.ndarray:
        """``(sources + 1,)`` int64: source ``s`` holds the stream's shards ``starts[s]:starts[s + 1]``."""
        return np.r_[0, np.cumsum([s * c for s, c in zip(self.sizes, self.copies, strict=True)])].astype(np.int64)

    def source_of(self, shards: np.ndarray | int) -> np.ndarray:
        """The source of each of the stream's ``shards``."""
        return np.searchsorted(self.starts(), shards, side="right") - 1

    def order_and_slots(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(order, slot of each shard) of an epoch: ``order[:num_slots]`` are the shards it reads, in reading order.

        Read-only arrays, cached per (mixture, seed, epoch).
        """
        return _order_and_slots(self, int(seed), int(epoch))

    def state(self) -> dict[str, list[int]]:
        return {"sizes": list(self.sizes), "draws": list(self.draws), "copies": list(self.copies)}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> MixtureOrder:
        try:
            return cls(**{key: tuple(int(v) for v in state[key]) for key in ("sizes", "draws", "copies")})
        except (KeyError, TypeError) as err:
            raise ValueError(f"stream position state: bad mixture {state!r}: {err}") from None


@functools.lru_cache(maxsize=4)
def _order_and_slots(mixture: MixtureOrder, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    starts = mixture.starts()
    drawn = []
    for source, (size, draws, copies) in enumerate(zip(mixture.sizes, mixture.draws, mixture.copies, strict=True)):
        rng = np.random.default_rng(mix_seed(seed, epoch, source, _SOURCE_SALT))
        # copy c of the source's shards is read in its c-th permutation: every shard once before any twice
        picked = np.concatenate([rng.permutation(size) + c * size for c in range(copies)])[:draws]
        drawn.append(picked + starts[source])
    reads = np.concatenate(drawn)
    reads = reads[np.random.default_rng(mix_seed(seed, epoch, _INTERLEAVE_SALT)).permutation(reads.size)]
    unread = np.ones(mixture.num_shards, dtype=np.bool_)
    unread[reads] = False
    order = np.r_[reads, np.flatnonzero(unread)].astype(np.int64)
    slots = np.empty_like(order)
    slots[order] = np.arange(order.size, dtype=np.int64)
    order.flags.writeable = slots.flags.writeable = False
    return order, slots


def label_maps(
    source_classes: Sequence[Sequence[str]], renames: Sequence[Mapping[str, str]], names: Sequence[str],
    classes: Sequence[str] | None,
) -> tuple[tuple[str, ...], tuple[np.ndarray, ...]]:
    """Maps each source's classes into the stage's label set, by name.

    A source's class keeps its manifest name unless the source's ``classes`` renames it; the stage's label set is
    ``data.classes`` when given, else every (renamed) class in order of first appearance.

    Args:
        source_classes: Per source, its manifest's class names (index → name).
        renames: Per source, its ``classes`` mapping (manifest name → stage name).
        names: Source names (for messages).
        classes: The stage's label set (``data.classes``), or None.

    Returns:
        (the stage's class names, per source an int64 array: its class index → the stage's).

    Raises:
        ValueError: a rename names a class the source lacks, or a class is not in ``data.classes``.
    """
    mapped: list[list[str]] = []
    for name, own, rename in zip(names, source_classes, renames, strict=True):
        unknown = sorted(set(rename) - set(own))
        if unknown:
            raise ValueError(f"data.train source {name!r}: classes renames {unknown}, not among its manifest's "
                             f"classes {list(own)[:20]}")
        mapped.append([rename.get(c, c) for c in own])
    stage = tuple(classes) if classes is not None else tuple(dict.fromkeys(c for m in mapped for c in m))
    index = {c: i for i, c in enumerate(stage)}
    maps = []
    for name, own in zip(names, mapped, strict=True):
        missing = [c for c in own if c not in index]
        if missing:
            raise ValueError(f"data.train source {name!r}: class(es) {missing[:20]} are not in data.classes "
                             "(rename them with the source's classes mapping)")
        maps.append(np.array([index[c] for c in own], dtype=np.int64))
    return stage, tuple(maps)
