"""Samples/s per GPU and peak GPU memory of RevCol training steps through our DeepSpeed engine (NCCL, bf16).

Needs a CUDA GPU: CI has none, so this runs when a GPU machine is at hand (figures quoted in the README). Each
model runs in its own process as rank 0 of an NCCL process group (DeepSpeed's ZeRO paths, collectives included,
as on a cluster; one GPU cannot hold two NCCL ranks), with the engine built as the training stage builds it:
``deepspeed_config`` from a typed ``DeepSpeedConfig`` (bf16 autocast over fp32 weights), ``build_model``
(partitioned as it is built under ZeRO-3), AdamW over the release's parameter groups, ``build_engine``. The batch
is synthetic and fixed (the input stream is measured by ``input_pipeline.py``), so the loss must fall from step
to step. For each model the largest of ``--batches`` that fits is used (a batch that runs out of GPU memory is
retried smaller, in a fresh process). Prints one JSON object per model: samples/s (median over the timed steps),
step time, peak GPU memory, the first and last loss.

    python benchmarks/gpu_train.py [--models revcol_tiny:0 revcol_huge:3] [--batches 256 128 64 32 16 8]
        [--steps 8] [--warmup 3] [--size 224]
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


def train_steps(name: str, zero_stage: int, batch: int, *, steps: int, warmup: int, size: int) -> dict[str, Any]:
    """Builds the engine for ``name`` at ``zero_stage`` and times ``steps`` steps after ``warmup`` (rank 0 of 1)."""
    import torch

    import revcol
    from pipeline.config import DeepSpeedConfig, OptimConfig, RegularizeConfig
    from pipeline.services import free_port
    from pipeline.train.engine import Objective, build_engine, build_model, deepspeed_config
    from pipeline.train.optim import build_optimizer, param_groups, scaled_lr

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    torch.cuda.set_device(0)
    import deepspeed
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl")
    probe = torch.full((4,), 2.0, device="cuda")
    dist.all_reduce(probe)  # NCCL really carries a collective
    assert probe.tolist() == [2.0] * 4, probe

    config = deepspeed_config(DeepSpeedConfig(zero_stage=zero_stage, precision="bf16"), micro_batch=batch)
    torch.manual_seed(0)
    model = build_model(lambda: revcol.create_model(name, intersup=True), config)
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
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss, _ = engine(images, targets)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())  # waits for the step
        seconds.append(time.perf_counter() - start)
    step_s = statistics.median(seconds[warmup:])
    return {
        "measurement": "gpu_train", "model": name, "params_m": round(params / 1e6, 1), "zero_stage": zero_stage,
        "precision": "bf16 autocast, fp32 weights", "batch_per_gpu": batch, "size": size,
        "samples_per_s_per_gpu": round(batch / step_s, 1), "step_s": round(step_s, 4),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "nccl": str(torch.cuda.nccl.version()),
    }


def _child(args: argparse.Namespace) -> None:
    name, stage = args.one.split(":")
    try:
        result = train_steps(name, int(stage), args.batch, steps=args.steps, warmup=args.warmup, size=args.size)
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
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child process: NAME:STAGE at --batch
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        _child(args)
        return
    for spec in args.models:
        name, _, stage = spec.partition(":")
        if stage not in ("0", "1", "2", "3"):
            parser.error(f"--models: {spec!r} is not NAME:ZERO_STAGE with a stage of 0-3")
        for batch in sorted(args.batches, reverse=True):
            cmd = [sys.executable, __file__, "--one", spec, "--batch", str(batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--size", str(args.size)]
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
            if done.returncode == 0:
                print(done.stdout.strip().splitlines()[-1], flush=True)
                break
            if done.returncode != OOM_EXIT:
                sys.exit(f"{spec} at batch {batch} failed (exit {done.returncode}); its output is above")
        else:
            sys.exit(f"{spec}: no batch of {args.batches} fits")


if __name__ == "__main__":
    main()
