"""Measuring what a training step costs on the CPU: memory kept for backward and step time.

"Memory kept for backward" is the growth of the process heap (glibc ``mallinfo2``: small-block arena plus
mmapped blocks) from just before the forward to just after the loss, so tensors held anywhere — saved for
backward or not — count. Only meaningful on glibc systems with the CPU allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable

import torch

__all__ = ["heap_in_use", "memory_kept_for_backward", "map_large_allocations", "release_free_heap", "train_step_seconds"]


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


_libc: ctypes.CDLL | None = None


def _glibc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"))
        _libc.mallinfo2.restype = _Mallinfo2
    return _libc


def heap_in_use() -> int:
    """Bytes the process has allocated with malloc right now (in use in the arena + mmapped blocks)."""
    info = _glibc().mallinfo2()
    return int(info.uordblks + info.hblkhd)


def map_large_allocations(min_bytes: int = 4 * 2**20) -> None:
    """Makes glibc serve every allocation of ``min_bytes`` or more with its own mapping, returned to the system
    when freed. By default glibc raises that threshold (up to 32 MiB) as large blocks come and go, and the freed
    ones then stay resident in its arena: gigabytes over a step of a big model whose working set is mostly
    activations and gathered parameters that live for one layer."""
    libc = _glibc()
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    libc.mallopt(m_mmap_threshold, min_bytes)
    libc.mallopt(m_trim_threshold, min_bytes)


def release_free_heap() -> None:
    """Returns the malloc arena's free pages to the system (glibc ``malloc_trim``). After many large tensors are
    allocated and freed — a model built one partitioned module at a time — glibc keeps gigabytes of freed arena
    resident; this gives them back."""
    _glibc().malloc_trim(0)


def _wait_for(device: torch.device) -> None:
    """Returns once ``device``'s queued work has run (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    """Bytes allocated on ``device`` right now: CUDA's allocator on a GPU, the malloc heap on the CPU."""
    _wait_for(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else heap_in_use()


def memory_kept_for_backward(
    model: torch.nn.Module, images: torch.Tensor, loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
) -> int:
    """Memory growth in bytes on ``images``' device from just before ``loss_fn(model, images)`` to just after it
    (then runs backward)."""
    model.zero_grad(set_to_none=False)  # gradient buffers exist before the measurement
    gc.collect()
    before = _allocated(images.device)
    loss = loss_fn(model, images)
    kept = _allocated(images.device) - before
    loss.backward()
    del loss
    gc.collect()
    return kept


def train_step_seconds(
    model: torch.nn.Module, images: torch.Tensor, loss_fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]
) -> float:
    """Wall time of one forward + loss + backward (waiting for the GPU's queued work)."""
    model.zero_grad(set_to_none=False)
    _wait_for(images.device)
    start = time.perf_counter()
    loss_fn(model, images).backward()
    _wait_for(images.device)
    return time.perf_counter() - start
