"""The real RevCol-H (2.16 B parameters) trained on one 24 GiB, 2-core node: ZeRO-3 with parameters and
optimizer state offloaded to disk, built and configured the pipeline's way from
``jobs/revcol_h_single_node_offload.yaml``, against plain PyTorch forward+backward of the same model.

Two phases, each in a fresh process so each one's peak memory is its own:

* plain: the same model (reversible, fp32, no DeepSpeed) built whole; one forward+backward on the fixed batch.
  No optimizer: with AdamW state it would need ~34 GiB.
* offload: ``build_model`` under ``zero.Init`` (parameters go to the offload folder as modules are built),
  DeepSpeed ZeRO-3 with ``offload_param``/``offload_optimizer`` on NVMe, CPU Adam; ``--steps`` optimizer steps
  on the same fixed batch (the loss must fall).

Both report peak resident memory (sampled every 0.5 s and the kernel's high-water mark), the offload folder's
largest size on disk, times per phase, and the ratio of forward+backward times. The ``revcol plan`` prediction
for the recipe is printed beside the measured figures.

    python benchmarks/revcol_h_offload.py [--offload-dir DIR] [--steps 3] [--batch 1]

Needs ~45 GiB free at ``--offload-dir`` and ~20 GiB of memory; takes ~20 minutes here.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.multiprocessing as mp

from pipeline.config import Recipe, load_recipe
from pipeline.services import free_port

RECIPE = Path(__file__).resolve().parents[1] / "jobs" / "revcol_h_single_node_offload.yaml"
GIB = 2**30


def _disk_usage(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:  # swap files come and go
                pass
    return total


class Sampler(threading.Thread):
    """Peak resident memory of this process and peak size of a folder on disk, sampled in the background."""

    def __init__(self, folder: Path | None = None, every_s: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.folder, self.every_s = folder, every_s
        self.peak_rss = self.peak_disk = 0
        self._done = threading.Event()
        self._proc = psutil.Process()

    def run(self) -> None:
        while not self._done.is_set():
            self.sample()
            self._done.wait(self.every_s)

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        if self.folder is not None:
            self.peak_disk = max(self.peak_disk, _disk_usage(self.folder))

    def stop(self) -> dict[str, float]:
        self._done.set()
        self.join()
        self.sample()
        high_water = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_rss_gib": max(self.peak_rss, high_water) / GIB, "peak_offload_gib": self.peak_disk / GIB}


def fixed_batch(recipe: Recipe, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``batch`` of scikit-learn's digits at the recipe's image size, normalized as the model expects."""
    from sklearn.datasets import load_digits

    import revcol

    stage = recipe.stages[0]
    digits = load_digits()
    images = torch.tensor(digits.images[:batch], dtype=torch.float32)[:, None].repeat(1, 3, 1, 1) / 16
    size = stage.data.image_size
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    cfg = revcol.model_cfg(stage.model.name)
    mean, std = torch.tensor(cfg["mean"])[:, None, None], torch.tensor(cfg["std"])[:, None, None]
    return (images - mean) / std, torch.tensor(digits.target[:batch], dtype=torch.long)


def _model_builder(recipe: Recipe, num_classes: int) -> Any:
    """The stage's model constructor, exactly as the training worker builds it."""
    from pipeline.train.loop import StageJob, model_builder

    job = StageJob(recipe=recipe.model_dump(mode="json"), stage=recipe.stages[0].name, num_classes=num_classes,
                   train_samples=1)
    return model_builder(job, recipe.stages[0])


def _plain(_: int, recipe_dict: dict, batch: int, num_classes: int, out: str) -> None:
    import revcol
    from pipeline.train.engine import Objective

    recipe = Recipe.model_validate(recipe_dict)
    sampler = Sampler()
    sampler.start()
    build = _model_builder(recipe, num_classes)
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build()
    built_s = time.perf_counter() - start
    stage = recipe.stages[0]
    cfg = revcol.model_cfg(stage.model.name)
    objective = Objective(model, stage.regularize, mean=cfg["mean"], std=cfg["std"])
    images, labels = fixed_batch(recipe, batch)
    start = time.perf_counter()
    loss, _ = objective(images, labels)
    loss.backward()
    fwd_bwd_s = time.perf_counter() - start
    result = {"build_s": built_s, "fwd_bwd_s": fwd_bwd_s, "loss": loss.item(), **sampler.stop()}
    Path(out).write_text(json.dumps(result))


def _offload(_: int, recipe_dict: dict, batch: int, num_classes: int, steps: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    import revcol
    from pipeline.train.engine import Objective, build_engine, build_model, deepspeed_config, largest_param
    from pipeline.train.optim import build_optimizer, param_groups, scaled_lr

    recipe = Recipe.model_validate(recipe_dict)
    stage = recipe.stages[0]
    folder = Path(stage.deepspeed.nvme_path)
    sampler = Sampler(folder)
    sampler.start()
    deepspeed.init_distributed(dist_backend="gloo")
    build = _model_builder(recipe, num_classes)
    config = deepspeed_config(stage.deepspeed, micro_batch=batch, largest_param=largest_param(build))
    torch.manual_seed(0)
    start = time.perf_counter()
    model = build_model(build, config)
    optimizer = build_optimizer(param_groups(model, stage.optim), stage.optim,
                                lr=scaled_lr(stage.optim.base_lr, batch), cpu_offload=True)
    cfg = revcol.model_cfg(stage.model.name)
    engine = build_engine(Objective(model, stage.regularize, mean=cfg["mean"], std=cfg["std"]), optimizer, config)
    built_s = time.perf_counter() - start
    images, labels = fixed_batch(recipe, batch)
    records = []
    for step in range(steps):
        t0 = time.perf_counter()
        loss, _ = engine(images, labels)
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        records.append({"step": step + 1, "loss": loss.item(), "fwd_bwd_s": t1 - t0, "optimizer_s": t2 - t1})
        print(json.dumps({"offload_step": records[-1], "rss_gib": psutil.Process().memory_info().rss / GIB}),
              flush=True)
    result = {"build_s": built_s, "steps": records, **sampler.stop()}
    Path(out).write_text(json.dumps(result))
    engine.destroy()


def _run(target: Any, *args: Any) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    mp.spawn(target, args=(*args, out), nprocs=1, join=True)
    return json.loads(Path(out).read_text())


def _plan(recipe: Recipe) -> dict[str, float]:
    from pipeline.plan import plan_recipe

    plan = plan_recipe(recipe, with_deepspeed_estimate=False).stages[0]
    return {"peak_rss_gib": plan.peak("host")[0] / GIB, "offload_gib": plan.peak("nvme")[0] / GIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default=str(RECIPE))
    parser.add_argument("--offload-dir", default=None, help="offload folder (default: the recipe's nvme_path)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=None, help="micro-batch (default: the recipe's)")
    parser.add_argument("--skip-plain", action="store_true")
    args = parser.parse_args()

    recipe = load_recipe(args.recipe)
    stage = recipe.stages[0]
    batch = args.batch or stage.data.batch_size
    offload_dir = Path(args.offload_dir or stage.deepspeed.nvme_path).resolve()
    if offload_dir.exists():
        shutil.rmtree(offload_dir)
    offload_dir.mkdir(parents=True)
    recipe.stages[0].deepspeed.nvme_path = str(offload_dir)
    num_classes = stage.model.num_classes or 40  # the demo's pretraining set: 10 digits × 4 rotations
    recipe_dict = recipe.model_dump(mode="json")

    report: dict[str, Any] = {"model": stage.model.name, "batch": batch, "image_size": stage.data.image_size,
                              "plan": _plan(recipe)}
    print(json.dumps({"plan": report["plan"]}), flush=True)
    if not args.skip_plain:
        report["plain"] = _run(_plain, recipe_dict, batch, num_classes)
        print(json.dumps({"plain": report["plain"]}), flush=True)
    try:
        report["offload"] = _run(_offload, recipe_dict, batch, num_classes, args.steps, free_port())
    finally:
        shutil.rmtree(offload_dir, ignore_errors=True)
    steps = report["offload"]["steps"]
    report["loss_falling"] = all(b["loss"] < a["loss"] for a, b in zip(steps, steps[1:]))
    report["step_s"] = [s["fwd_bwd_s"] + s["optimizer_s"] for s in steps]
    if "plain" in report:
        later = steps[1:] or steps  # the first step also pays one-time swap-buffer set-up
        mean_fwd_bwd = sum(s["fwd_bwd_s"] for s in later) / len(later)
        report["fwd_bwd_ratio_offload_vs_plain"] = mean_fwd_bwd / report["plain"]["fwd_bwd_s"]
    report["targets"] = {
        "peak_rss_le_20_gib": report["offload"]["peak_rss_gib"] <= 20,
        "offload_le_45_gib": report["offload"]["peak_offload_gib"] <= 45,
        "loss_falling": report["loss_falling"],
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
