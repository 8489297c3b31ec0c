"""`revcol demo`: the embedded default, on real data that ships with scikit-learn (the 8×8 handwritten digits).

For now it trains a small reversible RevCol in this process and reports held-out accuracy; the distributed
pretrain → finetune → eval chain replaces it once the pipeline stages land.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import revcol

__all__ = ["load_digits_split", "run_demo"]

logger = logging.getLogger(__name__)

IMAGE_SIZE = 32  # digits are 8×8; four-fold upsampling gives the 4 levels (strides 4–32) something to see


def load_digits_split(*, seed: int = 0, test_frac: float = 0.25) -> tuple[torch.Tensor, ...]:
    """Digits as (train_x, train_y, test_x, test_y); images (N, 3, 32, 32) normalized to zero mean, unit std."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=IMAGE_SIZE, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    images = (images - 0.5) / 0.5
    labels = torch.from_numpy(digits.target.astype(np.int64))
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_frac)
    test, train = order[:n_test], order[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(256), y.split(256)))
    return correct / len(y)


def run_demo(*, workdir: str | Path = "runs/demo", epochs: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Trains ``revcol_test`` (reversible, drop path) on digits and returns a summary with held-out top-1.

    Args:
        workdir: where the trained weights are written (``model.safetensors``).
        epochs: passes over the training set (default 12).
        seed: seed of the split, the initialization and the batch order.
    """
    from safetensors.torch import save_file

    epochs = 12 if epochs is None else epochs
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    torch.manual_seed(seed)
    train_x, train_y, test_x, test_y = load_digits_split(seed=seed)
    model = revcol.create_model("revcol_test", num_classes=10, drop_path_rate=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    batch = 64
    steps = epochs * ((len(train_y) + batch - 1) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    progress = tqdm(total=steps, desc="demo: training revcol_test on digits", unit="step", leave=False)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_y))
        for idx in order.split(batch):
            loss = F.cross_entropy(model(train_x[idx]), train_y[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            progress.update()
            progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    progress.close()
    seconds = time.perf_counter() - start
    top1 = _accuracy(model, test_x, test_y)
    out = Path(workdir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    summary = {
        "model": "revcol_test",
        "train_samples": len(train_y),
        "test_samples": len(test_y),
        "epochs": epochs,
        "samples_per_s": round(epochs * len(train_y) / seconds, 1),
        "test_top1": round(top1, 4),
        "weights": str(out / "model.safetensors"),
    }
    print(f"held-out top-1 {top1:.2%} on {len(test_y)} digits after {epochs} epochs ({seconds:.0f} s); weights: {summary['weights']}")
    return summary
