"""Wrapping a built RevCol in a DeepSpeed engine, from the typed recipe. The model knows nothing of this.

Precision: ``bf16``/``fp16`` use DeepSpeed's ``torch_autocast`` — fp32 weights and master state, autocast
activations — rather than casting the weights: the reversible reconstruction ``c = (c' - F(x)) / alpha`` needs
the column states in fp32 (in bf16 its error doubles per column). The recomputation in backward replays the same
autocast state.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import revcol
from pipeline.config import DeepSpeedConfig, RegularizeConfig
from pipeline.train.deepspeed_fixes import keep_offload_gradients_in_memory, use_fp32_weights_as_zero3_master
from revcol.measure import map_large_allocations, release_free_heap

__all__ = ["Objective", "build_engine", "build_model", "deepspeed_config", "largest_param", "load_weights", "zero3_gathered"]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# Memory-bounded ZeRO-3 settings (elements, not bytes). DeepSpeed's defaults size buffers for GPUs with tens of
# GiB: a 5e8-element (2 GB fp32) gradient reduce bucket, up to 1e9 live parameters, and with parameter offload
# up to 1e9 parameters (4 GB) kept in host memory beside the offload files.
REDUCE_BUCKET = 20_000_000  # 80 MB fp32: still large messages for NCCL/gloo, 4 % of ZeRO-3 RevCol-L per rank
MAX_LIVE_PARAMS = 100_000_000
# NVMe offload (measured with RevCol-H on a 24 GiB, 2-core node; see benchmarks/revcol_h_offload.py):
OFFLOAD_SUB_GROUP = 50_000_000  # optimizer state is swapped in per sub-group of this many parameters
OFFLOAD_PARAM_BUFFERS = 5  # swap buffers (each one parameter) for parameters on their way in from disk


def deepspeed_config(ds: DeepSpeedConfig, *, micro_batch: int, largest_param: int = 0) -> dict[str, Any]:
    """The DeepSpeed JSON for a stage: ZeRO stage and offload, precision, accumulation, clipping; ``ds.extra``
    is merged over it last (expert overrides). ``largest_param`` (elements) sizes the parameter swap buffers of
    NVMe offload, which must each hold one whole parameter (DeepSpeed's default, 1e8, when not given)."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.zero_stage >= 2:
        zero["reduce_bucket_size"] = REDUCE_BUCKET
    if ds.zero_stage == 3:
        zero["stage3_max_live_parameters"] = MAX_LIVE_PARAMS
        zero["override_module_apply"] = True  # build_model relies on it
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": False}
        if ds.offload_optimizer == "nvme":
            zero["offload_optimizer"]["nvme_path"] = ds.nvme_path
            zero["sub_group_size"] = OFFLOAD_SUB_GROUP
    if ds.offload_param != "none":
        zero["offload_param"] = {"device": ds.offload_param, "pin_memory": False}
        if ds.offload_param == "nvme":
            zero["offload_param"].update(nvme_path=ds.nvme_path, max_in_cpu=0, buffer_count=OFFLOAD_PARAM_BUFFERS)
            if largest_param:
                zero["offload_param"]["buffer_size"] = largest_param
            # The reversible backward re-uses every forward parameter, so with any reuse distance ZeRO-3 keeps
            # them all "soon needed", each pinning a swap buffer, and the second forward runs out of buffers.
            zero["stage3_max_reuse_distance"] = 0
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


def build_model(build: Callable[[], revcol.RevCol], config: dict[str, Any]) -> revcol.RevCol:
    """``build()``, or under ZeRO-3 a partitioned build that never holds the whole model in one process.

    ``deepspeed.zero.Init`` partitions each module's parameters as soon as the module is constructed (straight to
    the offload device when parameters are offloaded). The model's initialization runs through ``apply()``,
    which ``zero.Init`` (``override_module_apply``, forced on in :func:`deepspeed_config`) wraps to gather one
    module's parameters at a time: same order, same RNG stream, the same weights as the plain build.
    """
    zero = config["zero_optimization"]
    if zero["stage"] != 3:
        return build()
    import deepspeed

    remote = zero.get("offload_param", {}).get("device")
    if remote is not None:  # memory is what offloading is for: keep glibc from hoarding freed blocks
        map_large_allocations()
    with deepspeed.zero.Init(config_dict_or_path=config, remote_device=remote, pin_memory=False):
        model = build()
    release_free_heap()  # the modules' whole parameters, freed once partitioned, would stay resident otherwise
    return model


def load_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copies ``weights`` into ``module``'s parameters and buffers of the same names, one at a time; a ZeRO-3
    partitioned parameter is gathered only while it is written (a collective; rank 0's values are kept), so no
    process holds the whole model — nor more than the few parameters NVMe offload has swap buffers for."""
    own = dict(_named_tensors(module))
    with torch.no_grad():
        for name, value in weights.items():
            target = own[name]
            with zero3_gathered([target]) if hasattr(target, "ds_id") else nullcontext():
                target.copy_(value)


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(), *module.named_buffers()]


def zero3_gathered(params: list[nn.Parameter]) -> AbstractContextManager:
    """ZeRO-3 partitioned ``params`` made whole while open; rank 0's changes are kept (broadcast on exit)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


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


def largest_param(build: Callable[[], nn.Module]) -> int:
    """Elements of the largest parameter of ``build()``'s model, from a build on the meta device (no memory)."""
    with torch.device("meta"):
        model = build()
    return max(p.numel() for p in model.parameters())


def build_engine(objective: Objective, optimizer: torch.optim.Optimizer, config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` around the objective with our optimizer (param groups with layer decay), with the
    DeepSpeed fixes of ``deepspeed_fixes.py`` in place."""
    import deepspeed

    use_fp32_weights_as_zero3_master()
    if config["zero_optimization"].get("offload_optimizer", {}).get("device") == "nvme":
        keep_offload_gradients_in_memory()

    engine, *_ = deepspeed.initialize(model=objective, optimizer=optimizer, config=config)
    if config["zero_optimization"]["stage"] == 3:
        release_free_heap()  # ZeRO-3's set-up (partition flattening, offload initialization) frees gigabytes
    return engine
