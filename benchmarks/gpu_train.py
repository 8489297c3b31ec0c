"""Samples/s per GPU, peak GPU memory and model FLOP utilization of RevCol training steps through our DeepSpeed
engine (NCCL, bf16), for the fast path (the default) and the reference path (``fast_path: false``) side by side.

Needs a CUDA GPU: CI has none, so this runs when a GPU machine is at hand (figures quoted in the README);
``--device cpu --models revcol_test:0 --batches 2 --size 64`` runs the same code on gloo in seconds, to prove it
works. Each model and path runs in its own process as rank 0 of an NCCL process group (DeepSpeed's ZeRO paths, collectives included,
as on a cluster; one GPU cannot hold two NCCL ranks), with the engine built as the training stage builds it:
``deepspeed_config`` from a typed ``DeepSpeedConfig`` (bf16 autocast over fp32 weights), ``build_model``
(partitioned as it is built under ZeRO-3), AdamW over the release's parameter groups, ``build_engine``. The batch
is synthetic and fixed (the input stream is measured by ``input_pipeline.py``), so the loss must fall from step
to step. For each model the largest of ``--batches`` that fits is used (a batch that runs out of GPU memory is
retried smaller, in a fresh process; the reference path then starts from the batch the fast one fitted).
Prints one JSON object per model and path: samples/s (median over the timed steps), step time, peak GPU memory,
the first and last loss, and model FLOP utilization: one forward's FLOPs (``FlopCounterMode``, intermediate heads
included) x 4 for the reversible step (forward, recomputation, 2x backward; the fast path recomputes one column
less, so this is the issue's convention for both paths), per second, over the chip's dense bf16 peak
(``--peak-tflops``, or known from the device name). Then one line with fast/reference ratios per model.

    python benchmarks/gpu_train.py [--models revcol_tiny:0 revcol_huge:3] [--batches 256 128 64 32 16 8]
        [--steps 8] [--warmup 3] [--size 224] [--paths fast reference] [--peak-tflops 989] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any

OOM_EXIT = 3
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}  # dense, per the vendors' data sheets


def forward_flops(name: str, batch: int, size: int) -> int:
    """FLOPs of one training forward of ``name`` with intermediate heads, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import revcol

    with torch.device("meta"):
        model = revcol.create_model(name, intersup=True)
        images = torch.empty(batch, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.forward_columns(images)
    return counter.get_total_flops()


def _peak_tflops(device_name: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in device_name), None)


def train_steps(
    name: str, zero_stage: int, batch: int, *, fast_path: bool, steps: int, warmup: int, size: int, device: str,
    peak_tflops: float | None,
) -> dict[str, Any]:
    """Builds the engine for ``name`` at ``zero_stage`` and times ``steps`` steps after ``warmup`` (rank 0 of 1)."""
    import torch

    import revcol
    from pipeline.config import DeepSpeedConfig, OptimConfig, RegularizeConfig
    from pipeline.services import free_port
    from pipeline.train.engine import Objective, build_engine, build_model, deepspeed_config
    from pipeline.train.optim import build_optimizer, param_groups, scaled_lr

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    probe = torch.full((4,), 2.0, device=device)
    dist.all_reduce(probe)  # the backend really carries a collective
    assert probe.tolist() == [2.0] * 4, probe

    config = deepspeed_config(DeepSpeedConfig(zero_stage=zero_stage, precision="bf16"), micro_batch=batch)
    torch.manual_seed(0)
    model = build_model(
        lambda: revcol.create_model(name, intersup=True, keep_last_column=fast_path), config
    )
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    cfg = revcol.model_cfg(name)
    objective = Objective(model, RegularizeConfig(), mean=cfg["mean"], std=cfg["std"])
    optim = OptimConfig()
    optimizer = build_optimizer(param_groups(model, optim), optim, lr=scaled_lr(optim.base_lr, batch))
    engine = build_engine(objective, optimizer, config)

    images = torch.randn(batch, 3, size, size, device=engine.device)
    targets = torch.randint(0, 1000, (batch,), device=engine.device)
    seconds, losses = [], []
    for _ in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = engine(images, targets)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())  # waits for the step
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds[warmup:])
    step_flops = 4 * forward_flops(name, batch, size)
    step_tflops = step_flops / 1e12
    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = _peak_tflops(device_name, peak_tflops)
    return {
        "measurement": "gpu_train", "model": name, "path": "fast" if fast_path else "reference",
        "params_m": round(params / 1e6, 1), "zero_stage": zero_stage,
        "precision": "bf16 autocast, fp32 weights", "batch_per_gpu": batch, "size": size,
        "samples_per_s_per_gpu": round(batch / step_s, 1), "step_s": round(step_s, 4),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "step_gflop": round(step_flops / 1e9, 2), "tflop_per_s": round(step_tflops / step_s, 3),
        "peak_bf16_tflop_per_s": peak, "mfu": round(step_tflops / step_s / peak, 4) if peak else None,
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "gpu": device_name, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "nccl": str(torch.cuda.nccl.version()) if cuda else None,
    }


def _child(args: argparse.Namespace) -> None:
    name, stage, path = args.one.split(":")
    try:
        result = train_steps(
            name, int(stage), args.batch, fast_path=path == "fast", steps=args.steps, warmup=args.warmup,
            size=args.size, device=args.device, peak_tflops=args.peak_tflops,
        )
    except RuntimeError as err:  # torch.OutOfMemoryError, or DeepSpeed's re-raise of it
        if "out of memory" not in str(err):
            raise
        print(f"out of GPU memory at batch {args.batch}: {str(err).splitlines()[0]}", file=sys.stderr)
        sys.exit(OOM_EXIT)
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["revcol_tiny:0", "revcol_huge:3"],
                        help="NAME:ZERO_STAGE pairs")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 128, 64, 32, 16, 8],
                        help="batch sizes per GPU to try, largest first")
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotuning, allocator)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--paths", nargs="+", choices=["fast", "reference"], default=["fast", "reference"],
                        help="model paths to time (fast: the default; reference: fast_path false)")
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak (default: known by name)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: gloo, to check the script")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: NAME:STAGE:PATH at --batch
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _child(args)
        return
    for spec in args.models:
        name, _, stage = spec.partition(":")
        if stage not in ("0", "1", "2", "3"):
            parser.error(f"--models: {spec!r} is not NAME:ZERO_STAGE with a stage of 0-3")
        batches = sorted(args.batches, reverse=True)
        results = {}
        for path in args.paths:
            results[path] = _largest_fitting(args, f"{spec}:{path}", batches)
            print(json.dumps(results[path]), flush=True)
            batches = [b for b in batches if b <= results[path]["batch_per_gpu"]]
        if len(results) == 2:
            fast, ref = results["fast"], results["reference"]
            print(json.dumps({
                "measurement": "gpu_train_ratio", "model": name, "zero_stage": int(stage),
                "fast_over_reference_samples_per_s": round(
                    fast["samples_per_s_per_gpu"] / ref["samples_per_s_per_gpu"], 3
                ),
                "batches": [fast["batch_per_gpu"], ref["batch_per_gpu"]],
            }), flush=True)


def _largest_fitting(args: argparse.Namespace, one: str, batches: list[int]) -> dict[str, Any]:
    """The result of the largest batch of ``batches`` at which ``one`` (NAME:STAGE:PATH) fits, each in a fresh
    process (a CUDA out-of-memory error leaves the allocator fragmented)."""
    for batch in batches:
        cmd = [sys.executable, __file__, "--one", one, "--batch", str(batch), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--size", str(args.size), "--device", args.device]
        if args.peak_tflops is not None:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        if done.returncode != OOM_EXIT:
            sys.exit(f"{one} at batch {batch} failed (exit {done.returncode}); its output is above")
    sys.exit(f"{one}: no batch of {batches} fits")


if __name__ == "__main__":
    main()
