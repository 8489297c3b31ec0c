"""How much of the digits task the demo's pretraining already solves: its 40-class digit×rotation head, read only
at the upright classes (``dK_r0``), on the demo's upright ``val`` digits — before any finetuning.

The demo's pretraining gain is bounded by this: pretraining that has not learned the digits its own labels name
cannot teach the finetune stage much. ``jobs/demo_digits.yaml``'s pretrain settings were chosen on it (on ``val``,
never on ``test``). Each export given is probed on the same images, side by side; the last column's head is the one
the finetune stage starts from, the others are printed for comparison.

    python benchmarks/demo_pretrain_probe.py [WORKDIR] [EXPORT ...]

``WORKDIR`` is a ``revcol demo --workdir`` (default ``runs/demo``, where ``make demo`` runs); without ``EXPORT`` the
probe reads the newest export of its pretrain stage. Prints one JSON object per export; says so and exits 0 when
the workdir holds no demo yet (``make bench`` runs every benchmark).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

import revcol
from pipeline.config import DataConfig
from pipeline.data.transforms import build_eval_transform, resolve_image_config


def _images(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The upright digits of an image folder (one sub-folder per digit) as eval-transformed tensors and labels."""
    transform = build_eval_transform(resolve_image_config(DataConfig(image_size=32), model_name="revcol_test"),
                                     prefetcher=False)
    images, labels = [], []
    for digit in sorted(p for p in folder.iterdir() if p.is_dir()):
        for path in sorted(digit.glob("*.png")):
            images.append(transform(Image.open(path).convert("RGB")))
            labels.append(int(digit.name))
    return torch.stack(images), torch.tensor(labels)


def probe(export: Path, images: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> dict[str, object]:
    model = revcol.create_model("revcol_test", num_classes=len(classes), intersup=True)
    model.load_state_dict(load_file(export))
    model.eval()
    upright = [classes.index(f"d{k}_r0") for k in range(10)]
    with torch.no_grad():
        logits = model.forward_columns(images).logits
    top1 = [float((column[:, upright].argmax(1) == labels).float().mean()) for column in logits]
    return {"export": str(export), "images": len(labels), "upright_top1_last_column": round(top1[-1], 4),
            "upright_top1_per_column": [round(t, 4) for t in top1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, nargs="?", default=Path("runs/demo"))
    parser.add_argument("exports", type=Path, nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    found = sorted((args.workdir / "storage").glob("*-pretrain/checkpoint_*/export/model.safetensors"))
    exports = args.exports or found[-1:]
    if not exports or not (args.workdir / "images" / "val").is_dir():
        print(f"nothing to probe: no demo with a val split and a pretrain export in {args.workdir} "
              f"(run `revcol demo --workdir {args.workdir}` first)", file=sys.stderr)
        return
    classes = sorted(p.name for p in (args.workdir / "images" / "pretrain").iterdir() if p.is_dir())
    images, labels = _images(args.workdir / "images" / "val")
    for export in exports:
        print(json.dumps(probe(export, images, labels, classes)))


if __name__ == "__main__":
    main()
