"""Which samples of the current epoch have been consumed: :class:`StreamPosition`, saved in checkpoints."""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["StreamPosition", "packed_bitmaps"]

_POSITION_VERSION = 1


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


def packed_bitmaps(position: StreamPosition) -> dict[int, bytes]:
    return {s: np.packbits(b).tobytes() for s, b in position.consumed_bitmaps().items()}
