"""The stream position at corpus scale: size and save/load time of :class:`StreamPosition` against the previous
implementation, side by side in one process, on synthetic corpora (no payload: only the shard sizes).

For each corpus (20 k, 200 k and 2 M shards of ``--samples`` samples) and each point of the epoch (10 %, 50 %,
99 % of the shards consumed), a merged checkpoint position is built with ``--ranks`` x ``--in-flight`` shards half
consumed (in flight) and the rest of that fraction consumed whole, the whole ones taken either in the stream's own
order (``stream``: the first slots of the epoch's shard order) or in ``random`` order. Ours is built from a state
that lists the whole shards as ranges (the format it reads and writes), then bound and marked with the in-flight
rows through ``mark``; the baseline is the previous algorithm (a bitmap per touched shard, every shard's size in
the state), kept here only, whose size and time do not depend on the order (measured once per point).

Save is ``json.dumps(state_dict(), indent=1)`` as ``pipeline/train/checkpoint.py`` writes it; load is
``json.loads`` + ``from_state_dict``; times are CPU seconds of this process (``wall_s`` beside them: on a machine
shared with other work the wall clock swings with their load), the best of ``--repeats`` (the baseline once above 20 k shards: it takes
tens of seconds). Prints one JSON object per measurement (``ours``, ``baseline``, ``ratio`` = baseline / ours) and
a summary checking the targets: at the largest corpus every state <= 1 MB and save + load <= 0.5 s, and in stream
order the largest corpus within 2x of the smallest.

    python benchmarks/stream_scale.py [--shards 20000,200000,2000000] [--samples 1000] [--ranks 8] [--in-flight 64]
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from typing import Any

import numpy as np

from pipeline.data.stream.position import StreamPosition, shard_order

_SEED, _EPOCH, _DATASET = 11, 0, "synthetic"


class _PreviousPosition:
    """The previous StreamPosition's state (version 1): every touched shard's bitmap, every shard's size."""

    def __init__(self, sizes: list[int], consumed: dict[int, np.ndarray]) -> None:
        self.sizes, self.consumed = sizes, consumed

    def state_dict(self) -> dict[str, Any]:
        packed = {str(s): base64.b64encode(np.packbits(b.astype(np.bool_)).tobytes()).decode("ascii")
                  for s, b in sorted(self.consumed.items()) if b.any()}
        return {"version": 1, "epoch": _EPOCH, "seed": _SEED, "dataset": _DATASET, "shard_samples": list(self.sizes),
                "consumed": packed}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> _PreviousPosition:
        sizes = tuple(int(n) for n in state["shard_samples"])
        consumed = {}
        for key, text in state["consumed"].items():
            raw = np.frombuffer(base64.b64decode(text.encode("ascii")), dtype=np.uint8)
            consumed[int(key)] = np.unpackbits(raw)[: sizes[int(key)]].astype(np.bool_)
        return cls(list(sizes), consumed)


def _plan(num_shards: int, fraction: float, order: str, in_flight: int) -> tuple[np.ndarray, np.ndarray]:
    """(slots consumed whole, sorted; slots in flight) at ``fraction`` of an epoch."""
    consumed = max(int(fraction * num_shards), in_flight)
    whole = consumed - in_flight
    if order == "stream":
        return np.arange(whole), np.arange(whole, consumed)
    picked = np.random.default_rng(1).permutation(num_shards)[:consumed]
    return np.sort(picked[:whole]), picked[whole:]


def _ranges(slots: np.ndarray) -> str:
    if not slots.size:
        return ""
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    starts, stops = slots[np.r_[0, breaks]], slots[np.r_[breaks - 1, slots.size - 1]] + 1
    return ",".join(f"{a}:{b}" for a, b in zip(starts.tolist(), stops.tolist(), strict=True))


def _half(samples: int, shard: int) -> np.ndarray:
    return np.random.default_rng(shard).permutation(samples)[: samples // 2]


def _ours(num_shards: int, samples: int, whole: np.ndarray, flight: np.ndarray) -> StreamPosition:
    state = {"version": 2, "epoch": _EPOCH, "seed": _SEED, "dataset": _DATASET, "num_shards": num_shards,
             "consumed": int(whole.size) * samples, "marked": 0, "done": {"ranges": _ranges(whole)}, "partial": {}}
    position = StreamPosition.from_state_dict(state)
    position.bind(dataset=_DATASET, seed=_SEED, shard_samples=np.full(num_shards, samples), epoch=_EPOCH)
    order = shard_order(_SEED, _EPOCH, num_shards)
    for shard in order[flight].tolist():
        rows = _half(samples, shard)
        position.mark({"shard": np.full(rows.size, shard), "index": rows, "epoch": _EPOCH})
    return position


def _previous(num_shards: int, samples: int, whole: np.ndarray, flight: np.ndarray) -> _PreviousPosition:
    order = shard_order(_SEED, _EPOCH, num_shards)
    full = np.ones(samples, dtype=np.bool_)  # one array for every whole shard: only the state's size matters here
    consumed = dict.fromkeys(order[whole].tolist(), full)
    for shard in order[flight].tolist():
        bits = np.zeros(samples, dtype=np.bool_)
        bits[_half(samples, shard)] = True
        consumed[shard] = bits
    return _PreviousPosition([samples] * num_shards, consumed)


def _save_load(position: Any, cls: Any, repeats: int) -> dict[str, float]:
    best: dict[str, float] = {}
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        text = json.dumps(position.state_dict(), indent=1)
        c1 = time.process_time()
        cls.from_state_dict(json.loads(text))
        w2, c2 = time.perf_counter(), time.process_time()
        run = {"bytes": len(text), "save_s": c1 - c0, "load_s": c2 - c1, "total_s": c2 - c0, "wall_s": w2 - w0}
        best = run if not best or run["total_s"] < best["total_s"] else best
    return {k: round(v, 5) if isinstance(v, float) else v for k, v in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", default="20000,200000,2000000")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--fractions", default="0.1,0.5,0.99")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=64, help="shards in flight per rank")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    corpora = [int(n) for n in args.shards.split(",")]
    in_flight = args.ranks * args.in_flight
    results = []
    for num_shards in corpora:
        for fraction in (float(f) for f in args.fractions.split(",")):
            whole, flight = _plan(num_shards, fraction, "stream", in_flight)
            baseline = _save_load(_previous(num_shards, args.samples, whole, flight), _PreviousPosition,
                                  args.repeats if num_shards <= 20_000 else 1)
            for order in ("stream", "random"):
                whole, flight = _plan(num_shards, fraction, order, in_flight)
                ours = _save_load(_ours(num_shards, args.samples, whole, flight), StreamPosition, args.repeats)
                row = {"measure": "position_save_load", "shards": num_shards, "samples_per_shard": args.samples,
                       "fraction": fraction, "order": order, "in_flight_shards": in_flight, "ours": ours,
                       "baseline": baseline,
                       "ratio": {"bytes": round(baseline["bytes"] / ours["bytes"], 1),
                                 "total_s": round(baseline["total_s"] / max(ours["total_s"], 1e-9), 1)}}
                results.append(row)
                print(json.dumps(row), flush=True)
    largest, smallest = max(corpora), min(corpora)
    at_largest = [r["ours"] for r in results if r["shards"] == largest]
    stream = {(r["shards"], r["fraction"]): r["ours"] for r in results if r["order"] == "stream"}
    growth = [max(stream[largest, f][k] / stream[smallest, f][k] for k in ("bytes", "total_s"))
              for (n, f) in stream if n == largest]
    print(json.dumps({
        "measure": "summary", "largest_shards": largest,
        "max_bytes": max(o["bytes"] for o in at_largest), "max_total_s": max(o["total_s"] for o in at_largest),
        "bytes_ok": max(o["bytes"] for o in at_largest) <= 1_000_000,
        "time_ok": max(o["total_s"] for o in at_largest) <= 0.5,
        "stream_order_growth_largest_vs_smallest": round(max(growth), 2), "growth_ok": max(growth) <= 2.0,
    }))


if __name__ == "__main__":
    main()
