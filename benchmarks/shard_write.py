"""Time to write many small shards: the partial manifest saved throttled (ours) vs after every shard (the baseline).

``manifest.partial.json`` lists every shard written so far, so saving it after each shard, as the writer did
before, writes bytes quadratic in the number of shards. Ours saves it after the first shard, then at most every
``PARTIAL_SAVE_S`` seconds and when the write stops on an error (``pipeline/data/shards/writer.py``). Both write
scikit-learn's digits (1797 images) into ``--shard-size``-sample shards on local disk, interleaved ``--repeats``
times; prints one JSON object per round and a summary with the median ratio baseline/ours.

    python benchmarks/shard_write.py [--shard-size 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from unittest import mock

from pipeline.data.shards import write_shards
from pipeline.data.shards import writer


def _write(folder: str, shard_size: int, *, every_shard: bool) -> float:
    started = time.perf_counter()
    if every_shard:  # the baseline: the save throttle never holds a save back
        with mock.patch.object(writer._PartialManifest, "shard_added", writer._PartialManifest.save):
            write_shards("digits", folder, shard_size=shard_size, seed=0, progress=False)
    else:
        write_shards("digits", folder, shard_size=shard_size, seed=0, progress=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-size", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ratios = []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            times = {}
            for name in (("ours", "baseline") if repeat % 2 == 0 else ("baseline", "ours")):
                times[name] = _write(f"{tmp}/{name}", args.shard_size, every_shard=name == "baseline")
        ratios.append(times["baseline"] / times["ours"])
        print(json.dumps({"measurement": "shard_write", "shards": -(-1797 // args.shard_size),
                          **{f"{k}_s": round(v, 2) for k, v in times.items()}}), flush=True)
    print(json.dumps({"measurement": "shard_write_summary", "baseline_over_ours": round(statistics.median(ratios), 2)}))


if __name__ == "__main__":
    main()
