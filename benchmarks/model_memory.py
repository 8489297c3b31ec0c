"""Memory kept for backward and train-step time of reversible vs non-reversible RevCol, side by side.

RevCol-T widths (channels 64-512, blocks 2-2-4-2), batch 8, 224 px, fp32, CPU, at 1, 2, 4 and 8 columns; with
``--device cuda`` on a GPU (memory read from CUDA's allocator), optionally under bf16 autocast (``--bf16``).
Three paths: the plain model, the reversible reference path (``keep_last_column=False``, ``model.fast_path:
false``) and the reversible default (the last column kept for backward: one column's activations more).
Prints one JSON object per measurement and a summary with the targets of the model issue:
  * reversible memory at 8 columns <= 1.2x its 1-column figure (memory does not grow with columns), both paths,
  * reversible memory at 8 columns <= 0.4x the official implementation's 8-column figure (122 MB, which
    keeps every column's outputs: 38 MB at 1 column, ~11.5 MB more per column),
  * reversible train step <= 1.35x the non-reversible one (theory: 4/3, one extra forward).

    python benchmarks/model_memory.py [--batch 8] [--size 224] [--repeats 3] [--columns 1 2 4 8] [--device cuda]
        [--bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import revcol
from revcol.measure import memory_kept_for_backward, train_step_seconds

PATHS = {  # label: (reversible, keep_last_column)
    "baseline_nonrev": (False, False),
    "ours_rev": (True, False),  # the reference path (model.fast_path: false): the least memory
    "ours_rev_fast": (True, True),  # the default: the last column's activations kept, not recomputed
}
OFFICIAL_MB = {1: 38.0, 8: 122.0}  # measured from the official code by the author (same setting)


def _loss(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images).logsumexp(dim=1).mean()


def _bf16_loss(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.autocast(images.device.type, dtype=torch.bfloat16):
        return _loss(model, images).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per model (median reported)")
    parser.add_argument("--columns", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="forward under bf16 autocast (weights stay fp32)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    loss_fn = _bf16_loss if args.bf16 else _loss
    results = {}
    for cols in args.columns:
        model = revcol.create_model("revcol_tiny", num_subnet=cols).train().to(device)
        row = {"columns": cols, "batch": args.batch, "size": args.size, "device": device.type,
               "precision": "bf16" if args.bf16 else "fp32"}
        for label, (reversible, keep_last) in PATHS.items():
            model.reversible, model.keep_last_column = reversible, keep_last
            train_step_seconds(model, images, loss_fn)  # warm-up: allocator, thread pools
            row[f"{label}_kept_mb"] = memory_kept_for_backward(model, images, loss_fn) / 2**20
        times: dict[str, list[float]] = {label: [] for label in PATHS}
        for _ in range(args.repeats):  # interleaved so drifting machine load hits all alike
            for label, (reversible, keep_last) in PATHS.items():
                model.reversible, model.keep_last_column = reversible, keep_last
                times[label].append(train_step_seconds(model, images, loss_fn))
        for label in PATHS:
            row[f"{label}_step_s"] = statistics.median(times[label])
        row["memory_ratio_rev_vs_nonrev"] = row["ours_rev_kept_mb"] / row["baseline_nonrev_kept_mb"]
        row["time_ratio_rev_vs_nonrev"] = row["ours_rev_step_s"] / row["baseline_nonrev_step_s"]
        row["time_ratio_rev_fast_vs_nonrev"] = row["ours_rev_fast_step_s"] / row["baseline_nonrev_step_s"]
        results[cols] = row
        print(json.dumps({"measurement": "model_memory", **row}), flush=True)
    summary: dict[str, object] = {"measurement": "model_memory_summary"}
    lo, hi = min(results), max(results)
    summary[f"rev_mb_{hi}col_over_{lo}col"] = results[hi]["ours_rev_kept_mb"] / results[lo]["ours_rev_kept_mb"]
    summary[f"rev_fast_mb_{hi}col_over_{lo}col"] = (
        results[hi]["ours_rev_fast_kept_mb"] / results[lo]["ours_rev_fast_kept_mb"]
    )
    summary[f"nonrev_mb_{hi}col_over_{lo}col"] = results[hi]["baseline_nonrev_kept_mb"] / results[lo]["baseline_nonrev_kept_mb"]
    if hi == 8 and args.batch == 8 and args.size == 224 and not args.bf16:
        summary["rev_8col_over_official_8col"] = results[8]["ours_rev_kept_mb"] / OFFICIAL_MB[8]
    summary["time_ratio_rev_vs_nonrev_max"] = max(r["time_ratio_rev_vs_nonrev"] for r in results.values())
    summary["targets"] = {f"rev_mb_{hi}col_over_{lo}col": "<= 1.2", f"rev_fast_mb_{hi}col_over_{lo}col": "<= 1.2",
                          "rev_8col_over_official_8col": "<= 0.4", "time_ratio_rev_vs_nonrev": "<= 1.35"}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
