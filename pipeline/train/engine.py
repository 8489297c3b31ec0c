"""Wrapping a built RevCol in a DeepSpeed engine, from the typed recipe. The model knows nothing of this.

Precision: ``bf16``/``fp16`` use DeepSpeed's ``torch_autocast`` — fp32 weights and master state, autocast
activations — rather than casting the weights: the reversible reconstruction ``c = (c' - F(x)) / alpha`` needs
the column states in fp32 (in bf16 its error doubles per column). The recomputation in backward replays the same
autocast state.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import revcol
from pipeline.config import DeepSpeedConfig, RegularizeConfig

__all__ = ["Objective", "build_engine", "deepspeed_config"]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(ds: DeepSpeedConfig, *, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON for a stage: ZeRO stage and offload, precision, accumulation, clipping; ``ds.extra``
    is merged over it last (expert overrides)."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": False}
        if ds.offload_optimizer == "nvme":
            zero["offload_optimizer"]["nvme_path"] = ds.nvme_path
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": False}
        if ds.offload_param == "nvme":
            zero["offload_param"]["nvme_path"] = ds.nvme_path
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": ds.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # progress is ours
        "wall_clock_breakdown": False,
    }
    if ds.precision != "fp32":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if ds.precision == "bf16" else "float16"}
    return _merge(config, ds.extra)


class Objective(nn.Module):
    """The model plus its training loss, so the engine's forward returns the loss (and per-column logits).

    With intermediate supervision: the compound loss (per-column classifiers and reconstructions); otherwise the
    classification loss of the last column. Targets may be class indices or soft (mixup/cutmix) targets.
    """

    def __init__(self, model: revcol.RevCol, reg: RegularizeConfig, *, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.smoothing = reg.label_smoothing
        self.fcoe, self.ccoe = reg.fcoe, reg.ccoe
        self.mean, self.std = mean, std

    def criterion(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if targets.is_floating_point():  # soft targets (mixup/cutmix already smoothed them)
            return torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out = self.model.forward_columns(images)
        if not out.reconstructions:
            return self.criterion(out.logits[-1], targets), out.logits
        target_images = revcol.reconstruction_target(images.float(), self.mean, self.std)
        loss = revcol.compound_loss(
            out.logits, out.reconstructions, target_images, targets, self.criterion, fcoe=self.fcoe, ccoe=self.ccoe
        )
        return loss, out.logits


def build_engine(objective: Objective, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` around the objective with our optimizer (param groups with layer decay)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)
    return engine
