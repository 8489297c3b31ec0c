"""Model EMA that works under every ZeRO stage: each rank averages the parameters it holds.

Under ZeRO 0–2 every rank holds full parameters, so its EMA is full. Under ZeRO-3 a rank holds one flat partition
per parameter (``param.ds_tensor``) and keeps the EMA of that partition only — the EMA is sharded like the
model, costing 1/W of the parameters per rank. :meth:`ShardedEma.full_state_dict` all-gathers the partitions into
full tensors (on every rank; for export and checkpoints), and :meth:`load_full_state_dict` takes a rank's slice
again, so a checkpoint's EMA loads onto any number of workers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ShardedEma"]


def _local(param: nn.Parameter) -> torch.Tensor:
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class ShardedEma:
    """Exponential moving average of a (possibly ZeRO-3 partitioned) module's parameters.

    Args:
        module: the module whose parameters are averaged (names are its ``named_parameters``).
        decay: EMA decay per update (0.9999 in the paper).
    """

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = dict(module.named_parameters())
        self.shadow = {name: _local(p).detach().float().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            self.shadow[name].lerp_(_local(param).float(), 1 - self.decay)

    def _gather(self, name: str) -> torch.Tensor:
        param, part = self.params[name], self.shadow[name]
        if not hasattr(param, "ds_tensor"):
            return part.clone()
        world = dist.get_world_size()
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full EMA tensors by parameter name (a collective under ZeRO-3: call on every rank)."""
        return {name: self._gather(name) for name in self.shadow}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Loads full EMA tensors, keeping this rank's partition under ZeRO-3."""
        for name, param in self.params.items():
            full = state[name].float()
            if hasattr(param, "ds_tensor"):
                part, rank = self.shadow[name].numel(), dist.get_rank()
                flat = torch.zeros(part * dist.get_world_size())  # partitions are padded equal chunks
                flat[: param.ds_numel] = full.flatten()
                self.shadow[name].copy_(flat[rank * part : (rank + 1) * part])
            else:
                self.shadow[name].copy_(full.view_as(self.shadow[name]))
