"""Decoded + augmented samples/s of the Ray Data input stream against the usual alternatives, side by side.

Generates (once, cached) photo-like JPEGs of random sizes (224-500 px a side: smooth gradients, shapes, blur,
noise) in ten class folders, writes them as WebDataset shards with ``write_shards``, then measures, with the same
train transform (the paper's recipe: RandomResizedCrop bicubic, flip, RandAugment rand-m9-mstd0.5-inc1,
normalize, random erasing 0.25) and the same number N of CPU workers (default: one fewer than the machine's
CPUs, as in training, where the trainer process that consumes the batches needs a core of its own; the ceiling
gives its N loops whole cores and nothing to consume their output, so with N equal to all CPUs it counts the
consumer's core twice):

* ``ceiling``: a single-process decode + transform loop over in-memory samples, times N (perfect scaling), and
  ``ceiling_parallel``: the same loop in N processes at once (what a loaded machine really gives N workers);
* ``dataloader``: ``webdataset.WebDataset`` + ``torch.utils.data.DataLoader(num_workers=N)``, shuffle buffer 1000;
* ``ours``: ``build_train_dataset`` + ``iter_train_batches`` (shuffle buffer 1000, deterministic order), and
  ``ours_unordered`` (``deterministic=False``);
* ``ray_read_webdataset``: Ray's stock ``read_webdataset(decoder=None)`` + a per-row ``map`` doing the same work,
  and ``ray_read_webdataset_read_only``: the reader alone (its per-sample cost, ray-project/ray#65350).

An epoch lists every shard ``--repeat-shards`` times (8,000 samples by default), so per-epoch start-up and the
shuffle buffers weigh as they would on a real dataset less. Each run warms up with one untimed epoch (worker
processes start, imports), then times ``--epochs`` epochs: their samples over their wall time, per-epoch start-up
included (``first_batch_s`` reports it). The ceiling has no start-up at all, so it stays an upper bound. The
consumer's torch uses one thread. Every measurement records the machine's 1-minute load average and
``cpu_ms_per_sample``, the CPU time of the whole process tree (DataLoader workers, every Ray process) per sample:
on a machine shared with other work, wall-clock rates swing with their load, CPU per sample hardly does; the
summary's ``cpu_efficiency/X`` is the ceiling's CPU per sample over X's (1.0: no overhead beyond decode + augment).
Prints one JSON object per measurement and a summary with the ratios ours/dataloader (target >= 1.0) and
ours/ceiling (>= 0.9).

    python benchmarks/input_pipeline.py [--images 2000] [--workers N] [--batch 64] [--cache-dir DIR] [--thp]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import random
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import DataConfig
from pipeline.data.shards import read_manifest, write_shards
from pipeline.data.transforms import build_train_transform, resolve_image_config

MODEL = "revcol_tiny"
CONTENDERS = ("ceiling", "ceiling_parallel", "dataloader", "ours", "ours_unordered", "ray_read_webdataset",
              "ray_read_webdataset_read_only")
NUM_CLASSES = 10
SHUFFLE_BUFFER = 1000


# ----------------------------------------------------------------------------------------------------- the data


def _photo_like(rng: np.random.Generator) -> Any:
    """A synthetic but photo-like RGB image: gradient, shapes, blur and sensor noise; 224-500 px a side."""
    from PIL import Image, ImageDraw, ImageFilter

    w, h = (int(v) for v in rng.integers(224, 501, size=2))
    corners = rng.uniform(0, 255, size=(4, 3))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fy, fx = (yy / (h - 1))[..., None], (xx / (w - 1))[..., None]
    base = (corners[0] * (1 - fx) * (1 - fy) + corners[1] * fx * (1 - fy) + corners[2] * (1 - fx) * fy
            + corners[3] * fx * fy)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(0, w), rng.integers(0, h)
        x1, y1 = x0 + rng.integers(20, w // 2), y0 + rng.integers(20, h // 2)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=color)
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=color)
        else:
            pts = [(int(rng.integers(0, w)), int(rng.integers(0, h))) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=color)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, rng.uniform(3, 10), size=(h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def prepare_shards(cache: Path, images: int, *, shard_size: int, seed: int = 0) -> Path:
    """Generates the images and their shards under ``cache`` once; returns the shards folder."""
    stamp = {"images": images, "shard_size": shard_size, "seed": seed, "version": 1}
    shards = cache / "shards"
    if (cache / "stamp.json").is_file() and json.loads((cache / "stamp.json").read_text()) == stamp:
        return shards
    shutil.rmtree(cache, ignore_errors=True)
    folder = cache / "images"
    rng = np.random.default_rng(seed)
    for i in range(images):
        klass = folder / f"class_{i % NUM_CLASSES:02d}"
        klass.mkdir(parents=True, exist_ok=True)
        _photo_like(rng).save(klass / f"img_{i:05d}.jpg", quality=90)
    write_shards(str(folder), str(shards), shard_size=shard_size, seed=seed, progress=False)
    (cache / "stamp.json").write_text(json.dumps(stamp))
    return shards


def _shard_urls(shards: Path, repeat: int = 1) -> list[str]:
    return [str(shards / r["name"]) for r in read_manifest(str(shards))["shards"]] * repeat


def _samples_in_memory(urls: list[str], limit: int) -> list[tuple[bytes, int]]:
    out: list[tuple[bytes, int]] = []
    for url in urls:
        with tarfile.open(url) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name, member in sorted(members.items()):
                if name.endswith(".jpg"):
                    label = int(tar.extractfile(members[name[:-4] + ".cls"]).read())  # type: ignore[union-attr]
                    out.append((tar.extractfile(member).read(), label))  # type: ignore[union-attr]
                    if len(out) >= limit:
                        return out
    return out


# ------------------------------------------------------------------------------------------------- measurements


class _CpuMeter:
    """CPU time of this process and all its descendants (DataLoader workers, every Ray process) over a window.

    Descendants come and go (Ray retires idle workers), so a thread samples them every ``interval`` seconds and
    keeps each one's last reading; a process that exits loses at most its last interval.
    """

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.interval = interval
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, *, first: bool = False) -> None:
        import psutil

        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            used = times.user + times.system
            if first:
                self._first[proc.pid] = used
            self._first.setdefault(proc.pid, 0.0)
            self._last[proc.pid] = used

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> _CpuMeter:
        self._sample(first=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seconds(self) -> float:
        """CPU seconds used inside the window."""
        return sum(self._last[pid] - self._first[pid] for pid in self._last)


def _timed(epochs: Callable[[], Iterable[Any]], size_of: Callable[[Any], int], *, count: int) -> dict[str, Any]:
    """One untimed warm-up epoch (worker processes start, imports), then ``count`` timed epochs.

    The warm-up runs to the end of its epoch: leaving a pass early cancels Ray tasks still decoding, and Ray
    replaces a worker whose task was cancelled, so the next pass would pay a fresh worker's imports (~4 s here).
    Besides wall-clock throughput it reports ``cpu_ms_per_sample``: CPU time of this process tree per sample, which
    the load other programs put on the machine barely changes.
    """
    warmup = time.perf_counter()
    for _ in epochs():
        pass
    warmup = time.perf_counter() - warmup
    start = time.perf_counter()
    total = 0
    first_batch: list[float] = []
    with _CpuMeter() as meter:
        for _ in range(count):
            epoch_start = time.perf_counter()
            first = None
            for batch in epochs():
                if first is None:
                    first = time.perf_counter() - epoch_start
                total += size_of(batch)
            first_batch.append(first if first is not None else float("nan"))
        seconds = time.perf_counter() - start
    cpu = meter.seconds
    return {
        "epochs": count,
        "samples": total,
        "seconds": seconds,
        "samples_per_s": total / seconds,
        "cpu_ms_per_sample": 1e3 * cpu / max(total, 1),
        "first_batch_s": statistics.median(first_batch),
        "warmup_epoch_s": warmup,
    }


def measure_ceiling(samples: list[tuple[bytes, int]], transform: Callable[[Any], Any], workers: int) -> dict:
    from PIL import Image

    def one(raw: bytes) -> Any:
        image = Image.open(io.BytesIO(raw))
        image.load()
        return transform(image.convert("RGB") if image.mode != "RGB" else image)

    for raw, _ in samples[:20]:  # warm-up
        one(raw)
    cpu = time.process_time()
    start = time.perf_counter()
    for raw, _ in samples:
        one(raw)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    single = len(samples) / seconds
    return {"samples": len(samples), "seconds": seconds, "single_process_samples_per_s": single,
            "samples_per_s": single * workers, "cpu_ms_per_sample": 1e3 * cpu / len(samples)}


_PARALLEL: dict[str, Any] = {}


def _ceiling_child(rank: int) -> tuple[int, float, float]:
    samples, transform, barrier = _PARALLEL["samples"], _PARALLEL["transform"], _PARALLEL["barrier"]
    import torch
    from PIL import Image

    torch.set_num_threads(1)
    for raw, _ in samples[:10]:
        transform(Image.open(io.BytesIO(raw)).convert("RGB"))
    barrier.wait()
    cpu = time.process_time()
    start = time.perf_counter()
    for raw, _ in samples:
        image = Image.open(io.BytesIO(raw))
        image.load()
        transform(image.convert("RGB") if image.mode != "RGB" else image)
    return len(samples), time.perf_counter() - start, time.process_time() - cpu


def measure_ceiling_parallel(samples: list[tuple[bytes, int]], transform: Callable[[Any], Any], workers: int) -> dict:
    """The same loop in N processes at once: what the machine really gives N workers right now."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    _PARALLEL.update(samples=samples, transform=transform, barrier=ctx.Barrier(workers))
    with ctx.Pool(workers) as pool:
        done = pool.map(_ceiling_child, range(workers))
    _PARALLEL.clear()
    samples_done = sum(n for n, _, _ in done)
    return {"samples": samples_done, "seconds": max(t for _, t, _ in done),
            "samples_per_s": sum(n / t for n, t, _ in done),
            "cpu_ms_per_sample": 1e3 * sum(c for _, _, c in done) / samples_done}


def measure_dataloader(urls: list[str], transform: Callable[[Any], Any], workers: int, batch: int, *,
                       epochs: int) -> dict:
    import torch
    import webdataset as wds

    dataset = (
        wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker,
                       empty_check=False)
        .shuffle(SHUFFLE_BUFFER // max(1, workers))
        .decode("pil")
        .to_tuple("jpg;png", "cls")
        .map_tuple(transform, int)
    )
    loaders = [torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, drop_last=False,
                                           persistent_workers=True)]
    try:
        return _timed(lambda: loaders[0], lambda b: len(b[1]), count=epochs)
    finally:
        loaders.clear()  # its persistent workers stop with the loader's last reference, before the next measurement


def _data_cfg(urls: list[str], **kw: Any) -> DataConfig:
    return DataConfig(train=urls, shuffle_buffer=SHUFFLE_BUFFER, **kw)


def measure_ours(urls: list[str], workers: int, batch: int, *, deterministic: bool, epochs: int) -> dict:
    from pipeline.data.stream import StreamPosition, build_train_dataset, iter_train_batches

    ds = build_train_dataset(_data_cfg(urls, deterministic=deterministic), model_name=MODEL, data_cpus=workers)
    position = StreamPosition()
    return _timed(lambda: iter_train_batches(ds, batch_size=batch, position=position, drop_last=False),
                  lambda b: len(b["label"]), count=epochs)


def measure_ray_webdataset(urls: list[str], transform: Callable[[Any], Any], workers: int, batch: int, *,
                           epochs: int) -> dict:
    import ray
    import torch
    from PIL import Image

    def decode(row: dict[str, Any]) -> dict[str, Any]:
        image = Image.open(io.BytesIO(row["jpg"]))
        image.load()
        return {"image": transform(image.convert("RGB")).numpy(), "label": int(row["cls"])}

    ds = ray.data.read_webdataset(urls, decoder=None, override_num_blocks=len(urls)).map(
        decode, compute=ray.data.TaskPoolStrategy(size=workers), num_cpus=1
    )

    def batches() -> Iterable[dict[str, Any]]:
        for rows in ds.iter_batches(batch_size=batch, batch_format="numpy", prefetch_batches=2):
            yield {"image": torch.from_numpy(rows["image"]), "label": torch.from_numpy(rows["label"])}

    return _timed(batches, lambda b: len(b["label"]), count=epochs)


def measure_ray_webdataset_read_only(urls: list[str], workers: int, batch: int, *, epochs: int) -> dict:
    """Ray's stock reader alone (no decode): its per-sample cost, to compare with decode + augment."""
    import ray

    ds = ray.data.read_webdataset(urls, decoder=None, override_num_blocks=len(urls), concurrency=workers)
    return _timed(lambda: ds.iter_batches(batch_size=batch, batch_format="pyarrow", prefetch_batches=2),
                  lambda b: b.num_rows, count=epochs)


# ----------------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="synthetic JPEGs to generate (cached)")
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                        help="CPU workers for every contender (default: CPUs - 1, a core left for the consumer)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--ceiling-samples", type=int, default=1000, help="samples timed for the ceiling")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per run (after a warm-up epoch)")
    parser.add_argument("--repeat-shards", type=int, default=4,
                        help="list every shard this many times per epoch (longer epochs, same images)")
    parser.add_argument("--repeats", type=int, default=2, help="runs per contender, interleaved (median kept)")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/revcol-bench"))
    parser.add_argument("--only", nargs="*", default=None,
                        help=f"subset of: {' '.join(CONTENDERS)}")
    parser.add_argument("--thp", action="store_true",
                        help="run everything with THP_MEM_ALLOC_ENABLE=1 (torch allocates large CPU tensors on "
                        "transparent huge pages; cheapens the trainer-side uint8 -> float conversion)")
    args = parser.parse_args()
    if args.thp and os.environ.get("THP_MEM_ALLOC_ENABLE") != "1":  # torch reads it once, at start: re-exec
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
        os.execv(sys.executable, [sys.executable, *sys.argv])
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch

    torch.set_num_threads(1)
    random.seed(0)
    shards = prepare_shards(Path(args.cache_dir), args.images, shard_size=args.shard_size)
    urls = _shard_urls(shards, args.repeat_shards)
    cfg = _data_cfg(urls)
    transform = build_train_transform(resolve_image_config(cfg, model_name=MODEL), cfg, prefetcher=False)
    in_memory = _samples_in_memory(urls, args.ceiling_samples)
    common = {"thp": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1", "workers": args.workers, "batch": args.batch,
              "images": args.images, "shards_per_epoch": len(urls),
              "samples_per_epoch": args.images * args.repeat_shards, "size": 224, "cpu_count": os.cpu_count(),
              "load_avg_1m": round(os.getloadavg()[0], 2)}
    wanted = set(args.only or list(CONTENDERS))

    temp = tempfile.mkdtemp(prefix="ray-bench-", dir="/tmp")
    runs: dict[str, list[dict[str, Any]]] = {}
    contenders: dict[str, Callable[[], dict]] = {
        "ceiling": lambda: measure_ceiling(in_memory, transform, args.workers),
        "ceiling_parallel": lambda: measure_ceiling_parallel(in_memory, transform, args.workers),
        "dataloader": lambda: measure_dataloader(urls, transform, args.workers, args.batch, epochs=args.epochs),
        "ours": lambda: measure_ours(urls, args.workers, args.batch, deterministic=True, epochs=args.epochs),
        "ours_unordered": lambda: measure_ours(urls, args.workers, args.batch, deterministic=False,
                                               epochs=args.epochs),
        "ray_read_webdataset": lambda: measure_ray_webdataset(urls, transform, args.workers, args.batch,
                                                              epochs=args.epochs),
        "ray_read_webdataset_read_only": lambda: measure_ray_webdataset_read_only(urls, args.workers, args.batch,
                                                                                  epochs=args.epochs),
    }
    try:
        for repeat in range(args.repeats):
            for name, run in contenders.items():
                if name not in wanted:
                    continue
                uses_ray = name.startswith(("ours", "ray_"))
                if uses_ray and not ray.is_initialized():  # Ray's processes exist only while Ray contenders run
                    ray.init(num_cpus=args.workers, include_dashboard=False, _temp_dir=temp,
                             configure_logging=False, log_to_driver=False)
                    ray.data.DataContext.get_current().enable_progress_bars = False
                elif not uses_ray and ray.is_initialized():
                    ray.shutdown()
                result = {"measurement": "input_pipeline", "name": name, "repeat": repeat, **common, **run(),
                          "load_avg_1m": round(os.getloadavg()[0], 2)}
                runs.setdefault(name, []).append(result)
                print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    rate = {name: statistics.median(r["samples_per_s"] for r in rs) for name, rs in runs.items()}
    cpu = {name: statistics.median(r["cpu_ms_per_sample"] for r in rs) for name, rs in runs.items()}
    summary: dict[str, Any] = {"measurement": "input_pipeline_summary", **common,
                               "samples_per_s": {k: round(v, 1) for k, v in rate.items()},
                               "cpu_ms_per_sample": {k: round(v, 3) for k, v in cpu.items()}}
    for name in ("ours", "ours_unordered", "dataloader", "ray_read_webdataset"):
        if name in cpu and "ceiling" in cpu:  # CPU efficiency: the ceiling's CPU per sample over the contender's
            summary[f"cpu_efficiency/{name}"] = round(cpu["ceiling"] / cpu[name], 3)
    if "ours" in rate:
        for other, target in (("dataloader", 1.0), ("ceiling", 0.9), ("ceiling_parallel", None),
                              ("ray_read_webdataset", None)):
            if other in rate:
                ratio = rate["ours"] / rate[other]
                summary[f"ours/{other}"] = round(ratio, 3)
                if target is not None:
                    summary[f"ours/{other}_target"] = target
                    summary[f"ours/{other}_met"] = bool(ratio >= target)
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
