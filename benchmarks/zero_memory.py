"""Per-rank memory of model states under ZeRO 0/1/2/3, and throughput of each stage relative to ZeRO-0.

Two gloo ranks on this machine, engines built the pipeline's way (the model partitioned from the start under
ZeRO-3, Objective, generated DeepSpeed config, AdamW).

* Memory: RevCol-L (273 M parameters), fp32. Per rank, the heap in use (glibc mallinfo2) after the second
  backward — parameters + gradients + optimizer state + DeepSpeed buffers; activations at batch 1, 32 px are
  negligible — minus the heap before the model was built. Compared with the ideal for fp32 training with AdamW,
  where the weights are the master copy: 16 Ψ bytes (4 weights + 4 gradients + 8 Adam moments) replicated under
  ZeRO-0, 4Ψ + 4Ψ + 8Ψ/W under ZeRO-1, 4Ψ + 12Ψ/W under ZeRO-2, and 16Ψ/W under ZeRO-3.
  Target: ZeRO-3 within 10 % of its ideal.
* Throughput: RevCol-T, batch 4 per rank at 64 px, samples/s of each stage relative to ZeRO-0.

    python benchmarks/zero_memory.py [--memory-model revcol_large] [--speed-model revcol_tiny]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import torch
import torch.multiprocessing as mp

from pipeline.services import free_port

SMALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def _ideal_bytes(stage: int, params: int, world: int) -> float:
    per = {0: 16.0, 1: 8.0 + 8.0 / world, 2: 4.0 + 12.0 / world, 3: 16.0 / world}[stage]
    return per * params


def _worker(rank: int, world: int, port: int, mode: str, model_name: str, stage: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import gc

    import deepspeed

    import revcol
    from pipeline.config import DeepSpeedConfig, OptimConfig, RegularizeConfig
    from pipeline.train.engine import Objective, build_engine, build_model, deepspeed_config
    from pipeline.train.optim import build_optimizer, param_groups
    from revcol.measure import heap_in_use

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    # One ZeRO stage per process pair (see _run): copies freed inside a process are not returned between stages.
    gc.collect()
    before = heap_in_use()
    batch, size = (1, 32) if mode == "memory" else (4, 64)
    config = deepspeed_config(DeepSpeedConfig(zero_stage=stage, extra=SMALL), micro_batch=batch)
    torch.manual_seed(0)
    model = build_model(functools.partial(revcol.create_model, model_name, num_classes=1000), config)  # as the pipeline
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    objective = Objective(model, RegularizeConfig(), mean=(0.5,) * 3, std=(0.5,) * 3)
    optim = OptimConfig()
    optimizer = build_optimizer(param_groups(model, optim), optim, lr=1e-4)
    engine = build_engine(objective, optimizer, config)
    del model, optimizer
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    steps = 2 if mode == "memory" else 5
    kept = 0
    start = time.perf_counter()
    for step in range(steps):
        if step == 1:
            start = time.perf_counter()  # the first step allocates optimizer state: not timed
        loss, _ = engine(x, y)
        engine.backward(loss)
        if step == steps - 1 and mode == "memory":
            gc.collect()
            kept = heap_in_use() - before  # everything that lives between steps, at its peak
        engine.step()
    seconds = time.perf_counter() - start
    results = {stage: {"params": params, "bytes": kept, "samples_per_s": batch * world * (steps - 1) / seconds}}
    engine.destroy()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, out)
    deepspeed.comm.destroy_process_group()


def _run(mode: str, model_name: str, world: int, out: str) -> list[dict]:
    """Per rank, ``{stage: measurements}`` over ZeRO 0-3, each stage in a fresh pair of processes."""
    merged: list[dict] = [{} for _ in range(world)]
    for stage in (0, 1, 2, 3):
        mp.spawn(_worker, args=(world, free_port(), mode, model_name, stage, out), nprocs=world, join=True)
        for rank, result in enumerate(torch.load(out, weights_only=False)):
            merged[rank].update(result)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-model", default="revcol_large")
    parser.add_argument("--speed-model", default="revcol_tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="/tmp/revcol-zero-bench.pt")
    args = parser.parse_args()
    world = args.workers

    ranks = _run("memory", args.memory_model, world, args.out)
    for stage in (0, 1, 2, 3):
        params = ranks[0][stage]["params"]
        per_rank = max(r[stage]["bytes"] for r in ranks)
        ideal = _ideal_bytes(stage, params, world)
        print(json.dumps({"measurement": "zero_model_state_bytes", "model": args.memory_model, "zero_stage": stage,
                          "workers": world, "params": params, "ours_bytes_per_rank": per_rank,
                          "ideal_bytes_per_rank": ideal, "ratio_ours_over_ideal": per_rank / ideal}), flush=True)

    ranks = _run("speed", args.speed_model, world, args.out)
    base = ranks[0][0]["samples_per_s"]
    for stage in (0, 1, 2, 3):
        rate = ranks[0][stage]["samples_per_s"]
        print(json.dumps({"measurement": "zero_throughput", "model": args.speed_model, "zero_stage": stage,
                          "workers": world, "samples_per_s": rate, "baseline_zero0_samples_per_s": base,
                          "ratio_vs_zero0": rate / base}), flush=True)


if __name__ == "__main__":
    main()
