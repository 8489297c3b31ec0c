"""The compound loss of intermediate supervision (RevCol paper, Sec. 3.3; release ``loss.py``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["compound_loss", "reconstruction_target"]


def reconstruction_target(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The normalized input images mapped back to [0, 1] and clamped to [0.01, 0.99] (targets of the BCE terms)."""
    m = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0.01, 0.99)


def compound_loss(
    logits: Sequence[torch.Tensor],
    reconstructions: Sequence[torch.Tensor],
    target_images: torch.Tensor,
    targets: torch.Tensor,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    fcoe: float = 3.0,
    ccoe: float = 0.7,
) -> torch.Tensor:
    """``Σ_k [BCE(rec_k, img)·(1 − k/n_rec)·fcoe + CE(logits_k, y)·((k+1)/n_cls)·ccoe] + CE(logits_last, y)``.

    Args:
        logits: per supervised column, first to last (``ColumnOutputs.logits``).
        reconstructions: one per intermediate column (``ColumnOutputs.reconstructions``), pixel logits.
        target_images: images in [0, 1] (see :func:`reconstruction_target`), resized to the reconstructions.
        targets: class labels, or soft targets for mixup/cutmix; passed to ``criterion``.
        criterion: classification loss (e.g. label-smoothing or soft-target cross entropy).
        fcoe: weight of the reconstruction terms.
        ccoe: weight of the intermediate classification terms.

    Returns:
        The scalar loss.
    """
    if len(reconstructions) >= len(logits):
        raise ValueError(f"need more classifier outputs ({len(logits)}) than reconstructions ({len(reconstructions)})")
    n_rec, n_cls = len(reconstructions), len(logits)
    loss = criterion(logits[-1], targets)
    for k, rec in enumerate(reconstructions):
        if rec.shape[-2:] != target_images.shape[-2:]:
            raise ValueError(f"reconstruction {k} is {tuple(rec.shape[-2:])}, images {tuple(target_images.shape[-2:])}")
        bce = F.binary_cross_entropy_with_logits(rec.float(), target_images.float())
        loss = loss + bce * (1 - k / n_rec) * fcoe + criterion(logits[k], targets) * ((k + 1) / n_cls) * ccoe
    return loss
