"""Fixes for DeepSpeed 0.19.8 bugs that the pipeline meets, each small and local, each checked by a test that fails
without it. Applied by ``pipeline.train.engine.build_engine`` (and the checkpoint loader for the last one).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["keep_offload_gradients_in_memory", "refresh_master_weights", "use_fp32_weights_as_zero3_master"]


def keep_offload_gradients_in_memory() -> None:
    """Stops ZeRO-3 from writing each step's fp32 gradients to the NVMe optimizer folder and reading them back.

    DeepSpeed 0.19.8 reads a swapped gradient back wrong when its offset in the flat fp32 partition is not
    I/O-aligned — silently: almost every parameter of a real model (tests/test_offload.py compares with plain
    PyTorch; a Linear(512, 7) followed by Linear(512, 512) layers shows it). The round trip is also redundant:
    ZeRO-3 keeps every gradient in its host gradient buffer until the optimizer step anyway. Recording them as
    "unswapped" (a view of that buffer, DeepSpeed's own path for small gradients) costs no memory and saves the
    disk traffic of one fp32 model size per step each way.
    """
    from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
    from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import PartitionedOptimizerSwapper
    from deepspeed.runtime.swap_tensor.pipelined_optimizer_swapper import PipelinedOptimizerSwapper

    def swap_out_gradients(self: OptimizerSwapper, parameter: Any, gradient_offsets: list[int], gradient_tensors: list[torch.Tensor]) -> None:
        swap_info = self.swap_params_info.get(OptimizerSwapper.parameter_id(parameter))
        if swap_info is not None:
            swap_info.unswapped_gradients.update(zip(gradient_offsets, gradient_tensors))

    for swapper in (PartitionedOptimizerSwapper, PipelinedOptimizerSwapper):
        swapper.swap_out_gradients = swap_out_gradients


def use_fp32_weights_as_zero3_master() -> None:
    """Lets ZeRO-3 use fp32 weights as their own master copy, as it means to.

    With fp32 weights (our autocast training) DeepSpeed 0.19.8's ZeRO-3 aliases the master partition to the
    weights' partition only if ``partition.device == self.device`` — a ``torch.device`` against a device-name
    string, never equal — so it keeps a second fp32 copy: 4 more bytes per parameter per rank (ZeRO-3 at 20
    instead of 16 bytes/parameter/W). The comparison is made between devices for the duration of that set-up.
    ZeRO-1..3 equal ZeRO-0's updates with it (tests/test_zero_reversible.py).
    """
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._create_fp32_partitions
    if getattr(original, "compares_devices", False):
        return

    def create_fp32_partitions(self: Stage3) -> None:
        name = self.device
        self.device = torch.device(name)
        try:
            original(self)
        finally:
            self.device = name

    create_fp32_partitions.compares_devices = True
    Stage3._create_fp32_partitions = create_fp32_partitions


def refresh_master_weights(engine: Any) -> None:
    """Makes the optimizer's fp32 master copies follow weights loaded into the model after the engine was built.

    DeepSpeed's ``refresh_fp32_params`` copies flat weight partitions that are all in memory; with NVMe offload
    the weights or the master copies are on disk. Each optimizer sub-group's master is rebuilt from its weights
    (read back from disk where they are) and written where it lives, as DeepSpeed's own set-up does.
    """
    optimizer = engine.optimizer
    if not hasattr(optimizer, "fp16_partitioned_groups_flat_numel"):  # ZeRO 0-2
        if hasattr(optimizer, "refresh_fp32_params"):
            optimizer.refresh_fp32_params()
        return
    for group, numel in enumerate(optimizer.fp16_partitioned_groups_flat_numel):
        weights = torch.empty(numel, dtype=optimizer.fp32_partitioned_groups_flat[group].dtype)
        optimizer._swap_in_sub_group_to_flat_buffer(weights, group)
        on_disk = optimizer._swappable_optimizer_subgroup(group)
        if on_disk:
            optimizer._optimizer_states_and_gradient_swap_in(group)
        optimizer.fp32_partitioned_groups_flat[group].data.copy_(weights)  # swapping in re-points the master
        if on_disk:
            optimizer._optimizer_states_and_gradient_swap_out(group)
