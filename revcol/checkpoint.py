"""Loading checkpoints in the official release's layout (megvii-research/RevCol).

The release saves ``{"model": state_dict, "optimizer": ..., ...}`` (EMA weights under ``"model_ema"``), possibly
with a ``module.`` prefix from DistributedDataParallel. Our module tree uses the release's names
(``stem.0.weight``, ``subnet0.alpha0``, ``subnet1.level0.fusion.up.channel_reschedule.0.weight``,
``cls.classifier.1.weight``, ``cls_blocks.3…``, ``decoder_blocks…``), so conversion is unwrapping plus a strict
check of names and shapes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["load_official_state_dict", "official_state_dict"]

_CONTAINER_KEYS = ("model", "state_dict", "model_ema", "module")


def official_state_dict(checkpoint: Mapping[str, Any], *, ema: bool = False) -> dict[str, torch.Tensor]:
    """Extracts the model weights from a release checkpoint (or a bare state_dict), without prefixes.

    Args:
        checkpoint: what ``torch.load(path, weights_only=True)`` returned.
        ema: take the EMA weights (``"model_ema"``) instead of the raw ones.
    """
    if ema:
        if "model_ema" not in checkpoint:
            raise KeyError(f"checkpoint has no 'model_ema' entry (top-level keys: {sorted(checkpoint)[:10]})")
        checkpoint = checkpoint["model_ema"]
    while not any(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        inner = next((k for k in _CONTAINER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        if inner is None:
            raise ValueError(f"no state_dict found in checkpoint (top-level keys: {sorted(checkpoint)[:10]})")
        checkpoint = checkpoint[inner]
    return {k.removeprefix("module."): v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, Any], *, ema: bool = False) -> None:
    """Loads a checkpoint in the official key layout into ``model``, strictly.

    Args:
        model: a :class:`revcol.RevCol` built with the checkpoint's architecture (variant, ``intersup``, classes).
        state_dict: a release checkpoint or its ``state_dict`` (e.g. ``torch.load(path, weights_only=True)``).
        ema: load the EMA weights of a release checkpoint.

    Raises:
        ValueError: naming missing and unexpected keys and shape mismatches (e.g. a checkpoint with intermediate
            supervision loaded into a model without it, or a different class count).
    """
    weights = official_state_dict(state_dict, ema=ema)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(weights[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(weights))
        if weights[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        hint = ""
        if any(k.startswith(("cls_blocks.", "decoder_blocks.")) for k in unexpected):
            hint = " (checkpoint has intermediate supervision: build the model with intersup=True)"
        elif any(k.startswith(("cls_blocks.", "decoder_blocks.")) for k in missing):
            hint = " (model has intermediate supervision, checkpoint does not: build with intersup=False)"
        raise ValueError(
            "checkpoint does not match the model"
            + hint
            + "".join(f"\n  missing: {k}" for k in missing[:20])
            + "".join(f"\n  unexpected: {k}" for k in unexpected[:20])
            + "".join(f"\n  shape: {m}" for m in mismatched[:20])
        )
    model.load_state_dict(weights, strict=True)
