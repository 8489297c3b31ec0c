"""The paper's optimization recipe: AdamW with layer-wise LR decay groups, LR scaled by batch, warmup + cosine.

Weight decay is not applied to norms, biases (every 1-D parameter), layer scales and the reversible shortcut
weights ``alpha*`` (``model.no_weight_decay()``). Each group carries an ``lr_scale`` that the scheduler (timm's
``CosineLRScheduler``, stepped per optimizer update) multiplies into its LR.
"""

from __future__ import annotations

import torch
from timm.scheduler import CosineLRScheduler
from timm.scheduler.scheduler import Scheduler

from pipeline.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "param_groups", "scaled_lr"]

REFERENCE_BATCH = 1024


def scaled_lr(lr: float, global_batch: int) -> float:
    """The recipe's linear scaling: an LR given for a global batch of 1024, used at ``global_batch``."""
    return lr * global_batch / REFERENCE_BATCH


def param_groups(model: torch.nn.Module, cfg: OptimConfig) -> list[dict]:
    """AdamW parameter groups: (layer depth × decay/no-decay), each with ``lr_scale`` and ``weight_decay``.

    Without ``layer_decay`` every group has ``lr_scale`` 1. Frozen parameters are left out.
    """
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    if cfg.layer_decay is not None and hasattr(model, "layer_ids"):
        ids, num_ids = model.layer_ids()
    else:
        ids, num_ids = {}, 1
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        shape = getattr(param, "ds_shape", param.shape)  # a ZeRO-3 partitioned parameter's data is flat
        decay = len(shape) > 1 and name not in skip
        layer = ids.get(name, num_ids - 1)
        key = (layer, decay)
        if key not in groups:
            scale = 1.0 if cfg.layer_decay is None else cfg.layer_decay ** (num_ids - 1 - layer)
            groups[key] = {"params": [], "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": scale}
        groups[key]["params"].append(param)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(groups: list[dict], cfg: OptimConfig, *, lr: float, cpu_offload: bool = False) -> torch.optim.Optimizer:
    """AdamW over ``groups``; DeepSpeed's CPU Adam (AdamW mode) when the optimizer state is offloaded."""
    for group in groups:
        group["lr"] = lr  # the scheduler multiplies in each group's lr_scale
    if cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, total_samples: int, warmup_samples: int, lr_factor: float
) -> Scheduler:
    """Warmup (from ``warmup_lr``) then cosine to ``min_lr``; every LR multiplied by ``lr_factor`` (the batch
    scaling). Its clock is samples: ``scheduler.step_update(samples)`` after each optimizer step with the samples
    trained so far, so a run resumed on another number of workers continues at the same point of training."""
    if cfg.schedule == "constant":
        total_samples = 10**15  # cosine over an effectively infinite horizon: flat after warmup
    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_samples - warmup_samples),
        lr_min=cfg.min_lr * lr_factor,
        warmup_t=warmup_samples,
        warmup_lr_init=cfg.warmup_lr * lr_factor,
        warmup_prefix=True,
        t_in_epochs=False,
    )
