"""StreamPosition without Ray: a simulated stream split over ranks, merges, resumes, consumption orders, state size."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from pipeline.data.stream.mixture import MixtureOrder
from pipeline.data.stream.position import StreamPosition, epoch_order, shard_order

# Written by the previous StreamPosition (version 1, a bitmap per touched shard) for shards of 5, 7, 3, 9, 4, 12
# samples: shards 1 and 4 consumed whole, shard 3 samples 0, 4, 8 and shard 5 samples 2, 11.
V1_STATE = {
    "version": 1, "epoch": 2, "seed": 7, "dataset": "0123456789abcdef0123456789abcdef",
    "shard_samples": [5, 7, 3, 9, 4, 12],
    "consumed": {"1": "/g==", "3": "iIA=", "4": "8A==", "5": "IBA="},
}
V1_CONSUMED = {(1, i) for i in range(7)} | {(4, i) for i in range(4)} | {(3, 0), (3, 4), (3, 8), (5, 2), (5, 11)}


def _roundtrip(position: StreamPosition) -> StreamPosition:
    return StreamPosition.from_state_dict(json.loads(json.dumps(position.state_dict())))


def _consumed_set(position: StreamPosition, sizes: list[int]) -> set[tuple[int, int]]:
    return {(s, i) for s, n in enumerate(sizes) for i in range(n) if position.is_consumed(s, i)}


class _Stream:
    """What the decode tasks and an equal split do, in miniature: slots in the epoch's shard order (a mixture's:
    the shards it draws), each shard's samples not yet consumed in a seeded order, blocks of ``block`` rows dealt
    to the ranks in turn."""

    def __init__(self, sizes: list[int], *, seed: int = 5, epoch: int = 0, block: int = 3,
                 mixture: MixtureOrder | None = None) -> None:
        self.sizes, self.seed, self.epoch, self.block, self.mixture = sizes, seed, epoch, block, mixture

    def bind(self, position: StreamPosition) -> StreamPosition:
        position.bind(dataset="ds", seed=self.seed, shard_samples=self.sizes, epoch=self.epoch, mixture=self.mixture)
        return position

    def read_shards(self) -> list[int]:
        """The shards the epoch reads, in order."""
        slots = len(self.sizes) if self.mixture is None else self.mixture.num_slots
        return epoch_order(self.seed, self.epoch, len(self.sizes), self.mixture)[:slots].tolist()

    def blocks(self, start: StreamPosition) -> list[dict[str, Any]]:
        out = []
        for shard in self.read_shards():
            todo = [i for i in np.random.default_rng(shard).permutation(self.sizes[shard]).tolist()
                    if not start.is_consumed(shard, i)]
            for k in range(0, len(todo), self.block):
                rows = todo[k:k + self.block]
                out.append({"shard": np.full(len(rows), shard), "index": np.array(rows), "epoch": self.epoch})
        return out

    def run(self, start: StreamPosition, ranks: int, *, stop_after: int | None = None) -> list[StreamPosition]:
        """Each rank starts from ``start`` and marks its blocks; stops after ``stop_after`` blocks in all."""
        positions = [self.bind(StreamPosition.from_state_dict(start.state_dict())) for _ in range(ranks)]
        for k, block in enumerate(self.blocks(start)[:stop_after]):
            positions[k % ranks].mark(block)
        return positions


def test_version_1_state_loads() -> None:
    position = StreamPosition.from_state_dict(V1_STATE)
    sizes = V1_STATE["shard_samples"]
    assert _consumed_set(position, sizes) == V1_CONSUMED and position.num_consumed == len(V1_CONSUMED)
    state = position.state_dict()
    assert state["version"] == 2 and "shard_samples" not in state and sorted(state["partial"]) == ["3", "5"]
    again = _roundtrip(position)
    again.bind(dataset=V1_STATE["dataset"], seed=7, shard_samples=sizes, epoch=0)
    assert again.epoch == 2 and _consumed_set(again, sizes) == V1_CONSUMED
    assert again.mark({"shard": np.array([0, 0, 1]), "index": np.array([0, 1, 0]), "epoch": 2}) == 2
    with pytest.raises(ValueError, match="belongs to dataset"):
        StreamPosition.from_state_dict(V1_STATE).bind(dataset=V1_STATE["dataset"], seed=7, shard_samples=sizes[:-1],
                                                      epoch=0)


def test_state_checks() -> None:
    with pytest.raises(ValueError, match="not a stream position state"):
        StreamPosition.from_state_dict({"version": 3})
    position = _Stream([4, 4, 4]).bind(StreamPosition())
    position.mark({"shard": np.array([0, 0, 0, 0, 2]), "index": np.array([0, 1, 2, 3, 1]), "epoch": 0})
    state = position.state_dict()
    with pytest.raises(ValueError, match="outside the dataset"):
        StreamPosition.from_state_dict({**state, "partial": {"7": [4, "gA=="]}})
    with pytest.raises(ValueError, match="bad done ranges"):
        StreamPosition.from_state_dict({**state, "done": {"ranges": "2:1"}})
    with pytest.raises(ValueError, match="not bound"):
        StreamPosition.from_state_dict(state).mark({"shard": np.array([1]), "index": np.array([0]), "epoch": 0})
    with pytest.raises(ValueError, match="outside shard 1"):
        position.mark({"shard": np.array([1]), "index": np.array([4]), "epoch": 0})
    assert position.mark({"shard": np.array([], dtype=np.int64), "index": np.array([], dtype=np.int64)}) == 0


_MIXTURE = MixtureOrder(sizes=(25, 5), draws=(12, 9), copies=(1, 2))
"""Two sources: 12 of 25 shards drawn, and a small one read almost twice (its 5 shards listed twice)."""


@pytest.mark.parametrize(("ranks", "resume_ranks", "mixture"), [
    (2, 3, None), (4, 1, None), (3, 3, None), pytest.param(2, 3, _MIXTURE, id="mixture-2-3"),
    pytest.param(3, 1, _MIXTURE, id="mixture-3-1"),
])
def test_merge_and_resume_on_another_worker_count(ranks: int, resume_ranks: int, mixture: MixtureOrder | None) -> None:
    sizes = [int(n) for n in np.random.default_rng(1).integers(1, 12, size=40)]
    if mixture is not None:  # every copy of a source's shard has that shard's size
        sizes = sizes[:25] + sizes[25:30] * 2
    stream = _Stream(sizes, mixture=mixture)
    everything = {(s, i) for s in stream.read_shards() for i in range(sizes[s])}
    crashed = stream.run(stream.bind(StreamPosition()), ranks, stop_after=50 if mixture is None else 20)
    checkpoint = json.loads(json.dumps(StreamPosition.merged([p.state_dict() for p in crashed]).state_dict()))
    before = set().union(*(_consumed_set(p, sizes) for p in crashed))
    resumed_from = StreamPosition.from_state_dict(checkpoint)
    assert _consumed_set(resumed_from, sizes) == before and resumed_from.num_consumed == len(before)
    assert len(checkpoint["partial"]) <= ranks + 1  # the shards in flight, not every shard touched

    resumed = stream.run(resumed_from, resume_ranks)
    after = [_consumed_set(p, sizes) - before for p in resumed]
    assert sum(len(a) for a in after) == len(set().union(*after)), "a sample reached two ranks"
    final = StreamPosition.merged([p.state_dict() for p in resumed])
    assert _consumed_set(final, sizes) == everything and final.num_consumed == len(everything)
    slots = len(sizes) if mixture is None else mixture.num_slots
    assert final.state_dict()["done"] == {"ranges": f"0:{slots}"} and not final.state_dict()["partial"]
    assert ("mixture" in checkpoint) == (mixture is not None)
    exact = StreamPosition.merged(resumed)  # positions that know the shard sizes recount exactly
    assert exact.num_consumed == len(everything)


def test_merge_epochs_and_streams() -> None:
    stream = _Stream([3, 3])
    a, b = stream.bind(StreamPosition()), stream.bind(StreamPosition())
    a.mark({"shard": np.array([0, 1]), "index": np.array([0, 0]), "epoch": 0})
    b.mark({"shard": np.array([1, 1]), "index": np.array([0, 2]), "epoch": 0})  # (1, 0) overlaps a's
    assert StreamPosition.merged([a, b.state_dict()]).num_consumed == 3
    ahead = _roundtrip(b)
    ahead.next_epoch()
    assert StreamPosition.merged([a, ahead]).epoch == 1 and StreamPosition.merged([ahead, a]).num_consumed == 0
    other = StreamPosition()
    other.bind(dataset="other", seed=5, shard_samples=[3, 3], epoch=0)
    with pytest.raises(ValueError, match="different streams"):
        StreamPosition.merged([a, other])


def _consume_in_order(sizes: list[int], slots: list[int], checkpoints: set[int]) -> list[dict[str, Any]]:
    """Consumes whole shards in the order of ``slots`` (places in the epoch's order); returns the states at the
    given numbers of shards, checking each against what was consumed."""
    stream = _Stream(sizes)
    position, seen, states = stream.bind(StreamPosition()), set(), []
    order = shard_order(stream.seed, 0, len(sizes))
    for k, slot in enumerate(slots, start=1):
        shard = int(order[slot])
        half = sizes[shard] // 2  # two batches: the shard is partial in between
        for rows in (np.arange(half), np.arange(half, sizes[shard])):
            position.mark({"shard": np.full(rows.size, shard), "index": rows, "epoch": 0})
        seen |= {(shard, i) for i in range(sizes[shard])}
        if k in checkpoints:
            again = _roundtrip(position)
            assert _consumed_set(again, sizes) == seen and again.num_consumed == len(seen)
            states.append(position.state_dict())
    return states


@pytest.mark.parametrize("order", ["stream", "reverse", "random", "every_other"])
def test_every_consumption_order(order: str) -> None:
    n = 300
    sizes = [int(s) for s in np.random.default_rng(2).integers(1, 9, size=n)]
    slots = {
        "stream": list(range(n)),
        "reverse": list(range(n))[::-1],
        "random": np.random.default_rng(3).permutation(n).tolist(),
        "every_other": list(range(0, n, 2)) + list(range(1, n, 2)),
    }[order]
    states = _consume_in_order(sizes, slots, {1, n // 10, n // 2, n - 1, n})
    assert states[-1]["done"] == {"ranges": f"0:{n}"}
    bitmap_chars = 4 * ((n + 7) // 8 + 2) // 3
    assert all(len(s["done"].get("ranges", s["done"].get("bitmap"))) <= bitmap_chars for s in states)


def test_state_size_does_not_grow_with_the_corpus() -> None:
    """Consumed in the stream's order, a position at 20 k shards is as large as one at 200 shards; in random
    order it stays within a bit per shard."""
    sizes: dict[int, int] = {}
    for n in (200, 20_000):
        states = _consume_in_order([4] * n, list(range(n // 2)), {n // 2})
        sizes[n] = len(json.dumps(states[0])) - 2 * len(str(n))  # the shard count itself is written twice
    assert sizes[20_000] <= sizes[200] + 8
    n = 20_000
    random_state = _consume_in_order([4] * n, np.random.default_rng(4).permutation(n)[: n // 2].tolist(), {n // 2})
    assert len(json.dumps(random_state[0])) <= 4 * (n // 8) // 3 + 400
