"""Train-step time of RevCol's fast path vs the reference path (and vs the non-reversible model), side by side.

RevCol-T widths (channels 64-512, blocks 2-2-4-2), batch 8, 224 px, fp32, CPU, 2 threads, at 1, 2, 4 and 8
columns. One model per column count (same weights, same input) is switched between the variants below, measured
interleaved (one step of each per round, in a shuffled order, ``--repeats`` rounds) so that drifting machine
load hits all alike; ratios are medians over rounds of a variant's time over the reference's in the same round,
of wall time and (``*_cpu_time``) of this process's CPU time, which other load moves less:

  * ``reference``: the reversible path as before issue 16 (``keep_last_column=False``, NCHW),
  * ``fast``: the default (``keep_last_column=True``: the last column's activations kept, not recomputed),
  * ``channels_last``, ``fast_channels_last``: channels-last activations on the reference and the fast path
    (``--breakdown``; off by default because it is slower here),
  * ``nonrev``: the plain model (every activation kept): the floor for removing recomputation.

Prints one JSON object per column count (median seconds per variant and the ratios) and a summary with the
issue's target: fast <= 0.8x reference at RevCol-T's 4 columns. Memory kept for backward of the fast path (flat
in the number of columns) is measured by ``benchmarks/model_memory.py``.

    python benchmarks/model_speed.py [--columns 1 2 4 8] [--repeats 5] [--batch 8] [--size 224] [--threads 2]
        [--breakdown]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

import revcol
from revcol.measure import train_step_seconds

REFERENCE = {"reversible": True, "channels_last": False, "keep_last_column": False}
VARIANTS = {
    "reference": REFERENCE,
    "fast": {**REFERENCE, "keep_last_column": True},
    "channels_last": {**REFERENCE, "channels_last": True},
    "fast_channels_last": {**REFERENCE, "keep_last_column": True, "channels_last": True},
    "nonrev": {**REFERENCE, "reversible": False},
}
BREAKDOWN = ("channels_last", "fast_channels_last")


def _loss(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).logsumexp(dim=1).mean()


def _step(model: revcol.RevCol, images: torch.Tensor, settings: dict[str, bool]) -> tuple[float, float]:
    """(wall, CPU) seconds of one train step with ``settings``: the CPU time of this process moves less than the
    wall time when other processes share the cores."""
    for name, value in settings.items():
        setattr(model, name, value)
    cpu = time.process_time()
    wall = train_step_seconds(model, images, _loss)
    return wall, time.process_time() - cpu


def _paired_ratio(times: dict[str, list[float]], name: str) -> float:
    """Median over rounds of ``name``'s time over the reference's in the same round (drift cancels)."""
    return statistics.median(t / r for t, r in zip(times[name], times["reference"], strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--columns", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--breakdown", action="store_true", help="also time each technique on its own")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [n for n in VARIANTS if args.breakdown or n not in BREAKDOWN]
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size)
    rows = {}
    for cols in args.columns:
        model = revcol.create_model("revcol_tiny", num_subnet=cols).train()
        for name in names:
            _step(model, images, VARIANTS[name])  # warm-up: allocator, oneDNN primitives
        wall: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            order = random.Random(repeat).sample(names, len(names))  # no variant always runs after the same one
            for name in order:
                seconds = _step(model, images, VARIANTS[name])
                wall[name].append(seconds[0])
                cpu[name].append(seconds[1])
        others = [name for name in names if name != "reference"]
        row = {"measurement": "model_speed", "columns": cols, "batch": args.batch, "size": args.size,
               "threads": args.threads, "repeats": args.repeats,
               **{f"{name}_step_s": round(statistics.median(s), 4) for name, s in wall.items()},
               **{f"{name}_over_reference": round(_paired_ratio(wall, name), 3) for name in others},
               **{f"{name}_over_reference_cpu_time": round(_paired_ratio(cpu, name), 3) for name in others},
               "fast_over_nonrev": round(statistics.median(wall["fast"]) / statistics.median(wall["nonrev"]), 3)}
        rows[cols] = row
        print(json.dumps(row), flush=True)
    summary: dict[str, object] = {
        "measurement": "model_speed_summary",
        "fast_over_reference": {c: r["fast_over_reference"] for c, r in rows.items()},
        "fast_over_reference_cpu_time": {c: r["fast_over_reference_cpu_time"] for c, r in rows.items()},
        "fast_over_nonrev": {c: r["fast_over_nonrev"] for c, r in rows.items()},
        "nonrev_over_reference": {c: r["nonrev_over_reference"] for c, r in rows.items()},
        "targets": {"fast_over_reference at 4 columns (RevCol-T)": "<= 0.8"},
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
