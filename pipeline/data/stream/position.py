"""Which samples of the current epoch have been consumed: :class:`StreamPosition`, saved in checkpoints.

A position is sized by what is in flight, not by the corpus: shards consumed to the last sample are kept as
ranges of their places in the epoch's shard order (:func:`shard_order`), so a pass consumed in the stream's own
order is one range whatever the corpus size, and a pass consumed in any other order costs at most one bit per
shard (the state picks whichever encoding is shorter); only shards consumed in part keep a bitmap of their
samples. Shards with samples that were skipped (unreadable) stay partial until the epoch ends.

A mixture's epoch reads part of its shard list in an order of its own (:class:`MixtureOrder`): its position
carries that sampler (three numbers per source), and the slots are places in that order, with the same guarantees.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.data.stream.mixture import MixtureOrder
from pipeline.data.transforms import mix_seed

__all__ = ["StreamPosition", "epoch_order", "shard_order"]

_POSITION_VERSION = 2
_V1 = 1
"""The format before ranges (a bitmap for every touched shard, the shard sizes listed); still loads."""
_ORDER_SALT = 0x5A4D
_EMPTY = np.zeros(0, dtype=np.int64)


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    """The shards in the order an epoch reads them (read-only; slot ``k`` of the epoch reads ``order[k]``).

    Args:
        seed: The stream's seed.
        epoch: The epoch.
        num_shards: Shards in the stream.

    Returns:
        A permutation of ``range(num_shards)``.
    """
    return _order_and_slots(int(seed), int(epoch), int(num_shards))[0]


def epoch_order(seed: int, epoch: int, num_shards: int, mixture: MixtureOrder | None) -> np.ndarray:
    """The shards in the order an epoch reads them: :func:`shard_order`, or a mixture's (whose epoch reads only
    its first ``mixture.num_slots``)."""
    return _orders(int(seed), int(epoch), int(num_shards), mixture)[0]


def _orders(seed: int, epoch: int, num_shards: int, mixture: MixtureOrder | None) -> tuple[np.ndarray, np.ndarray]:
    if mixture is None:
        return _order_and_slots(seed, epoch, num_shards)
    return mixture.order_and_slots(seed, epoch)


@functools.lru_cache(maxsize=4)
def _order_and_slots(seed: int, epoch: int, num_shards: int) -> tuple[np.ndarray, np.ndarray]:
    """(order, slot of each shard), cached: a 2M-shard permutation costs ~50 ms and is asked for per batch."""
    dtype = np.int32 if num_shards < 2**31 else np.int64
    order = np.random.default_rng(mix_seed(seed, epoch, _ORDER_SALT)).permutation(num_shards).astype(dtype)
    slots = np.empty_like(order)
    slots[order] = np.arange(num_shards, dtype=dtype)
    order.flags.writeable = slots.flags.writeable = False
    return order, slots


# -- sets of slots as flat sorted bounds [start0, stop0, start1, stop1, ...] of disjoint, non-touching ranges


def _runs(slots: np.ndarray) -> np.ndarray:
    """Bounds of the runs of sorted, unique ``slots``."""
    if not slots.size:
        return _EMPTY
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts = slots[np.r_[0, breaks]]
    stops = slots[np.r_[breaks - 1, slots.size - 1]] + 1
    return np.column_stack([starts, stops]).ravel().astype(np.int64)


def _union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bounds of the union of two bound sets."""
    if not a.size or not b.size:
        return (a if a.size else b).copy()
    ranges = np.concatenate([a, b]).reshape(-1, 2)
    ranges = ranges[np.argsort(ranges[:, 0], kind="stable")]
    reach = np.maximum.accumulate(ranges[:, 1])
    opens = np.r_[True, ranges[1:, 0] > reach[:-1]]  # a range that starts after everything before it has ended
    firsts = np.flatnonzero(opens)
    lasts = np.r_[firsts[1:] - 1, len(ranges) - 1]
    return np.column_stack([ranges[firsts, 0], reach[lasts]]).ravel()


def _contains(bounds: np.ndarray, slots: np.ndarray | int) -> np.ndarray | bool:
    return np.searchsorted(bounds, slots, side="right") % 2 == 1


def _encode_done(bounds: np.ndarray, num_shards: int) -> dict[str, str]:
    """``{"ranges": "a:b,c:d"}`` (half-open slot ranges) or ``{"bitmap": base64}`` (a bit per slot), the shorter."""
    bitmap_chars = 4 * ((num_shards + 7) // 8 + 2) // 3  # base64 of one bit per slot
    if bounds.size // 2 * (2 * len(str(num_shards)) + 2) <= bitmap_chars:
        return {"ranges": ",".join(f"{a}:{b}" for a, b in bounds.reshape(-1, 2).tolist())}
    edges = np.zeros(num_shards + 1, dtype=np.int8)
    edges[bounds[0::2]], edges[bounds[1::2]] = 1, -1  # starts and stops never coincide (ranges do not touch)
    return {"bitmap": _pack(np.cumsum(edges[:-1], dtype=np.int8))}


def _decode_done(done: Mapping[str, str], num_shards: int) -> np.ndarray:
    if "bitmap" in done:
        bits = _unpack(done["bitmap"], num_shards)
        return np.flatnonzero(np.diff(np.r_[False, bits, False].astype(np.int8))).astype(np.int64)
    text = done.get("ranges")
    if not isinstance(text, str):
        raise ValueError(f"stream position state: 'done' must hold 'ranges' or 'bitmap', got {sorted(done)}")
    bounds = np.array(text.replace(":", ",").split(","), dtype=np.int64) if text else _EMPTY
    if bounds.size % 2 or (bounds.size and (np.any(np.diff(bounds) <= 0) or bounds[0] < 0
                                             or bounds[-1] > num_shards)):
        raise ValueError(f"stream position state: bad done ranges for {num_shards} shards: {text[:80]!r}")
    return bounds


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
        self._reset(epoch)

    def _reset(self, epoch: int | None) -> None:
        self.epoch: int | None = epoch
        self.seed: int | None = None
        self.dataset: str | None = None
        self.num_shards: int | None = None
        self.mixture: MixtureOrder | None = None
        self._sizes: np.ndarray | None = None  # samples per shard; a loaded state does not carry them
        self._done = _EMPTY  # slots (places in the epoch's order) of shards consumed to the last sample
        self._new_done: set[int] = set()  # done slots not folded into _done yet (folding sorts)
        self._partial: dict[int, np.ndarray] = {}  # shard index -> consumed bits
        self._consumed = 0
        # Rows this position marked itself since it was created or loaded: ranks that resumed from one state mark
        # disjoint rows, so their merge counts that state's samples once and adds every rank's marks.
        self._marked = 0

    # -- binding and marking

    @property
    def bound(self) -> bool:
        """Whether the position knows its dataset (after the first pass or a loaded state)."""
        return self.dataset is not None

    def bind(self, *, dataset: str, seed: int, shard_samples: Sequence[int], epoch: int,
             mixture: MixtureOrder | None = None) -> None:
        """Attaches the position to a stream (done by :func:`iter_train_batches`).

        Args:
            dataset: The stream's fingerprint (it covers the shard sizes and a mixture's draws).
            seed: The stream's seed.
            shard_samples: Samples per shard.
            epoch: Epoch to use when the position has none.
            mixture: The stream's sampler when it is a mixture.

        Raises:
            ValueError: the position belongs to another dataset or seed.
        """
        sizes = np.asarray(shard_samples, dtype=np.int64)
        if self.dataset is None:
            self.dataset, self.seed, self.num_shards, self.mixture = dataset, int(seed), int(sizes.size), mixture
        elif (self.dataset != dataset or self.num_shards != sizes.size or self.mixture != mixture
              or not self._fits(sizes)):
            raise ValueError(
                f"this position belongs to dataset {self.dataset} ({self.num_shards} shards), "
                f"the stream reads dataset {dataset} ({sizes.size} shards); start from a fresh StreamPosition"
            )
        elif self.seed != int(seed):
            raise ValueError(f"this position was recorded with data.seed={self.seed}, the stream uses seed={seed}")
        self._sizes = sizes
        if self.epoch is None:
            self.epoch = int(epoch)

    def _fits(self, sizes: np.ndarray) -> bool:
        if self._sizes is not None:
            return bool(np.array_equal(self._sizes, sizes))
        return all(bits.size == sizes[shard] for shard, bits in self._partial.items())

    def _slots(self) -> np.ndarray:
        return self._orders()[1]

    def _orders(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.seed is not None and self.epoch is not None and self.num_shards is not None
        return _orders(self.seed, self.epoch, self.num_shards, self.mixture)

    def _is_done(self, shard: int) -> bool:
        slot = int(self._slots()[shard])
        return slot in self._new_done or bool(_contains(self._done, slot))

    def _fold(self) -> None:
        if self._new_done:
            self._done = _union(self._done, _runs(np.array(sorted(self._new_done), dtype=np.int64)))
            self._new_done.clear()

    def _fold_when_large(self) -> None:
        if len(self._new_done) > max(4096, self._done.size):  # amortized: each fold sorts all the ranges
            self._fold()

    def _finish(self, shard: int, bits: np.ndarray) -> None:
        """Keeps ``bits`` as the shard's partial bitmap, or the shard as done once every sample is consumed."""
        if bits.all():
            self._partial.pop(shard, None)
            self._new_done.add(int(self._slots()[shard]))
            self._fold_when_large()
        else:
            self._partial[shard] = bits

    def mark(self, batch: Mapping[str, Any]) -> int:
        """Records the rows of ``batch`` as consumed.

        Args:
            batch: A batch with ``shard``, ``index`` and ``epoch`` (arrays/tensors or, for ``epoch``, an int).

        Returns:
            The number of rows newly marked.

        Raises:
            ValueError: the position is unbound, or the batch belongs to another epoch.
        """
        if self._sizes is None:
            raise ValueError("StreamPosition.mark: the position is not bound to a stream yet")
        shards = _as_numpy(batch["shard"]).astype(np.int64).ravel()
        indices = _as_numpy(batch["index"]).astype(np.int64).ravel()
        epochs = np.unique(_as_numpy(batch["epoch"]).ravel()) if "epoch" in batch else np.array([self.epoch])
        if epochs.size and (epochs.size > 1 or int(epochs[0]) != self.epoch):
            raise ValueError(f"batch rows of epoch(s) {epochs.tolist()} marked on a position at epoch {self.epoch}")
        if not shards.size:
            return 0
        if np.any(shards[1:] < shards[:-1]):  # rows arrive grouped by shard unless a shuffle buffer mixed them
            by_shard = np.argsort(shards, kind="stable")
            shards, indices = shards[by_shard], indices[by_shard]
        if shards[0] < 0 or shards[-1] >= self._sizes.size:
            bad = shards[0] if shards[0] < 0 else shards[-1]
            raise ValueError(f"shard index {bad} outside the stream's {self._sizes.size} shards")
        outside = (indices < 0) | (indices >= self._sizes[shards])
        if outside.any():
            shard = int(shards[np.argmax(outside)])
            raise ValueError(f"sample index outside shard {shard} ({self._sizes[shard]} samples): "
                             f"{indices[shards == shard].tolist()}")
        firsts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
        slots = self._slots()[shards[firsts]]
        done = _contains(self._done, slots)
        newly = 0
        for first, last, slot, was_done in zip(firsts.tolist(), np.r_[firsts[1:], shards.size].tolist(),
                                               slots.tolist(), done.tolist(), strict=True):
            shard = int(shards[first])
            bits = self._partial.get(shard)
            if bits is None:
                if was_done or slot in self._new_done:
                    continue  # rows of a shard consumed to the end are nothing new
                bits = np.zeros(int(self._sizes[shard]), dtype=np.bool_)
            before = int(np.count_nonzero(bits))
            bits[indices[first:last]] = True
            after = int(np.count_nonzero(bits))
            newly += after - before
            if after == bits.size:
                self._partial.pop(shard, None)
                self._new_done.add(slot)
            else:
                self._partial[shard] = bits
        self._fold_when_large()
        self._consumed += newly
        self._marked += newly
        return newly

    def is_consumed(self, shard: int, index: int) -> bool:
        """Tells whether sample ``index`` of shard ``shard`` is consumed in the current epoch."""
        bits = self._partial.get(int(shard))
        if bits is not None:
            return bool(bits[int(index)])
        return self.num_shards is not None and 0 <= int(shard) < self.num_shards and bool(self._is_done(int(shard)))

    def packed_consumed(self, shard: int, samples: int) -> bytes | None:
        """The consumed samples of one shard as ``np.packbits`` bytes, None when none is (what a decode task skips).

        Args:
            shard: Shard index.
            samples: Samples in the shard.
        """
        bits = self._partial.get(int(shard))
        if bits is None and self.bound and self._is_done(int(shard)):
            bits = np.ones(samples, dtype=np.bool_)
        return None if bits is None else np.packbits(bits).tobytes()

    @property
    def num_consumed(self) -> int:
        """Samples consumed in the current epoch."""
        return self._consumed

    def _recount(self) -> int:
        """Exact samples consumed, from the shard sizes (a merge of overlapping positions cannot add counts)."""
        assert self._sizes is not None
        self._fold()
        in_order = np.r_[0, np.cumsum(self._sizes[self._orders()[0]])]
        done = int(np.sum(in_order[self._done[1::2]] - in_order[self._done[0::2]]))
        return done + sum(int(np.count_nonzero(b)) for b in self._partial.values())

    def next_epoch(self) -> None:
        """Moves to the start of the next epoch (nothing consumed)."""
        if self.epoch is None:
            raise ValueError("StreamPosition.next_epoch: the position has no epoch yet")
        self.epoch += 1
        self._done, self._partial, self._consumed, self._marked = _EMPTY, {}, 0, 0
        self._new_done.clear()

    # -- state

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serializable snapshot for checkpoints; its size grows with the shards in flight, not the corpus.

        Returns:
            ``{"version": 2, "epoch", "seed", "dataset", "num_shards", "consumed", "marked", "done": {"ranges":
            "a:b,..."} or {"bitmap": base64} (slots of the epoch's shard order), "partial": {shard: [samples,
            base64 bitmap]}}``, and a mixture's ``"mixture": {"sizes", "draws", "copies"}`` (per source).
        """
        self._fold()
        return {
            "version": _POSITION_VERSION,
            "epoch": self.epoch,
            "seed": self.seed,
            "dataset": self.dataset,
            "num_shards": self.num_shards,
            "consumed": self._consumed,
            "marked": self._marked,
            "done": _encode_done(self._done, self.num_shards or 0),
            "partial": {str(s): [int(b.size), _pack(b)] for s, b in sorted(self._partial.items())},
            **({"mixture": self.mixture.state()} if self.mixture is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replaces this position with a stored one (today's format or the previous one, version 1).

        Args:
            state: From :meth:`state_dict` (of one rank or merged).

        Raises:
            ValueError: naming what is wrong with ``state``.
        """
        self._restore(state)
        self._marked = 0  # the loaded samples are this position's starting point, not its own marks

    def _restore(self, state: Mapping[str, Any]) -> None:
        version = state.get("version") if isinstance(state, Mapping) else type(state).__name__
        if version not in (_V1, _POSITION_VERSION):
            raise ValueError(f"not a stream position state (version {version!r}, expected {_POSITION_VERSION})")
        epoch, seed = state.get("epoch"), state.get("seed")
        self._reset(None if epoch is None else int(epoch))
        self.seed = None if seed is None else int(seed)
        self.dataset = state.get("dataset")
        if version == _V1:
            self._restore_v1(state)
            return
        self.num_shards = None if state.get("num_shards") is None else int(state["num_shards"])
        self.mixture = MixtureOrder.from_state(state["mixture"]) if state.get("mixture") is not None else None
        if self.mixture is not None and self.mixture.num_shards != self.num_shards:
            raise ValueError(f"stream position state: its mixture has {self.mixture.num_shards} shards, its "
                             f"num_shards says {self.num_shards}")
        partial = state.get("partial") or {}
        done = state.get("done") or {"ranges": ""}
        if (partial or done != {"ranges": ""}) and (self.num_shards is None or self.epoch is None):
            raise ValueError("stream position state has consumed samples but no num_shards/epoch")
        self._done = _decode_done(done, self.num_shards or 0)
        for key, (samples, text) in partial.items():
            self._partial[self._shard_key(key)] = _unpack(text, int(samples))
        self._consumed, self._marked = int(state.get("consumed", 0)), int(state.get("marked", 0))

    def _shard_key(self, key: str) -> int:
        shard = int(key)
        if self.num_shards is None or not 0 <= shard < self.num_shards:
            raise ValueError(f"stream position state names shard {shard}, outside the dataset")
        return shard

    def _restore_v1(self, state: Mapping[str, Any]) -> None:
        """Version 1 listed every shard's size and a bitmap per touched shard: the sizes bind the position."""
        samples = state.get("shard_samples")
        consumed = state.get("consumed") or {}
        if consumed and samples is None:
            raise ValueError("stream position state has consumed samples but no shard_samples")
        if samples is not None:
            self._sizes = np.asarray(samples, dtype=np.int64)
            self.num_shards = int(self._sizes.size)
        for key, text in consumed.items():
            shard = self._shard_key(key)
            self._finish(shard, _unpack(text, int(self._sizes[shard])))  # type: ignore[index]
        self._consumed = self._recount() if self._sizes is not None else 0

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

    def _adopt(self, other: StreamPosition) -> None:
        self.epoch, self.seed, self.dataset, self.num_shards = other.epoch, other.seed, other.dataset, other.num_shards
        self.mixture = other.mixture
        self._sizes = other._sizes if other._sizes is not None else self._sizes
        self._done, self._new_done = other._done.copy(), set(other._new_done)
        self._partial = {s: b.copy() for s, b in other._partial.items()}
        self._consumed, self._marked = other._consumed, other._marked

    def merge(self, others: Iterable[StreamPosition | Mapping[str, Any]]) -> StreamPosition:
        """Unions other ranks' consumed samples into this position (in place).

        Positions of a later epoch win over earlier ones (a rank that finished the epoch has moved on). The
        merged count of consumed samples is exact when this position knows the shard sizes (it is bound, or a
        bound position was merged in); otherwise it adds the ranks' own marks to the state they resumed from.

        Args:
            others: Positions or their state dicts.

        Returns:
            self.

        Raises:
            ValueError: the positions belong to different datasets or seeds.
        """
        for other in others:
            if not isinstance(other, StreamPosition):
                state, other = other, StreamPosition()
                other._restore(state)  # keeps the state's own marks (load_state_dict would zero them)
            if not other.bound:
                continue
            if not self.bound:
                self._adopt(other)
                continue
            if (other.dataset != self.dataset or other.seed != self.seed or other.num_shards != self.num_shards
                    or other.mixture != self.mixture):
                raise ValueError(
                    f"cannot merge positions of different streams: dataset {other.dataset} seed {other.seed} vs "
                    f"dataset {self.dataset} seed {self.seed}"
                )
            if other.epoch is None or (self.epoch is not None and other.epoch < self.epoch):
                continue
            if self.epoch is None or other.epoch > self.epoch:
                sizes = self._sizes
                self._adopt(other)
                self._sizes = self._sizes if self._sizes is not None else sizes
                continue
            self._union_with(other)
        return self

    def _union_with(self, other: StreamPosition) -> None:
        """Adds ``other`` (same stream, same epoch)."""
        if self._sizes is None:
            self._sizes = other._sizes
        self._fold()
        other._fold()
        self._done = _union(self._done, other._done)
        for shard, bits in other._partial.items():
            mine = self._partial.get(shard)
            self._partial[shard] = bits.copy() if mine is None else mine | bits
        slots = self._slots()
        for shard in list(self._partial):
            if _contains(self._done, int(slots[shard])):
                del self._partial[shard]
            else:
                self._finish(shard, self._partial[shard])
        base = max(self._consumed - self._marked, other._consumed - other._marked)
        self._marked += other._marked
        self._consumed = self._recount() if self._sizes is not None else base + self._marked

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
