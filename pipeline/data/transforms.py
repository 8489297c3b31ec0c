"""Image transforms of the input stream, split the way timm's prefetching loader splits them.

The paper's training recipe (RevCol, arXiv:2212.11696, following ConvNeXt/DeiT) is timm's ImageNet train
transform: ``RandomResizedCrop`` (bicubic), horizontal flip, RandAugment ``rand-m9-mstd0.5-inc1``, normalize and
random erasing (probability 0.25, pixel mode, one box). Evaluation resizes to ``size / crop_pct`` and centre-crops.

The work is split in two halves, as timm's ``PrefetchLoader`` does:

* **CPU side** (Ray Data tasks): decode, crop, flip, RandAugment → ``uint8`` arrays ``(3, H, W)``, plus the random
  erasing *box* of each sample (:func:`sample_erase_box`). Shipping ``uint8`` moves 4× fewer bytes through the
  object store than float tensors.
* **Trainer side** (:func:`normalize_batch`): ``uint8`` → float, normalize with the model's mean/std, fill the
  erasing boxes with per-pixel normal noise (timm's ``mode="pixel"``), on the trainer's device.

:func:`build_train_transform` with ``prefetcher=False`` returns the whole timm pipeline in one callable (float
tensor out); the benchmarks use it for the baselines so that every contender does the same work.

Every random choice of the CPU side comes from the RNGs seeded by :func:`seed_sample` (Python ``random``, NumPy's
global RNG and torch's, which timm's transforms use), so a sample's augmentation is a function of its seed.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import DataConfig

__all__ = [
    "ERASE_MAX_AREA",
    "ERASE_MIN_AREA",
    "ERASE_MIN_ASPECT",
    "ImageConfig",
    "build_eval_transform",
    "build_train_transform",
    "mix_seed",
    "normalize_batch",
    "resolve_image_config",
    "sample_erase_box",
    "seed_sample",
]

ERASE_MIN_AREA = 0.02
"""Smallest erased fraction of the image (timm ``RandomErasing`` default)."""
ERASE_MAX_AREA = 1 / 3
"""Largest erased fraction of the image (timm default)."""
ERASE_MIN_ASPECT = 0.3
"""Aspect ratios of the box are log-uniform in ``[0.3, 1/0.3]`` (timm default)."""
_ERASE_ATTEMPTS = 10


@dataclass(frozen=True)
class ImageConfig:
    """Preprocessing settings resolved from a model's cfg and the recipe's ``data`` section.

    Args:
        size: Square input resolution.
        mean: Per-channel mean (0..1 scale).
        std: Per-channel standard deviation (0..1 scale).
        crop_pct: Eval centre-crop fraction (resize to ``size / crop_pct`` first).
        interpolation: Resize interpolation (``bicubic`` in the paper).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"ImageConfig.size must be >= 1, got {self.size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"ImageConfig.crop_pct must lie in (0, 1], got {self.crop_pct}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"ImageConfig mean/std need 3 channels, got mean={self.mean} std={self.std}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"ImageConfig.std must be positive, got {self.std}")


def resolve_image_config(
    data_cfg: DataConfig, *, model_name: str | None = None, image_config: ImageConfig | None = None
) -> ImageConfig:
    """Resolves preprocessing from the model's cfg table, with the recipe's ``image_size``/``crop_pct`` on top.

    Args:
        data_cfg: The stage's ``data`` section.
        model_name: A registered RevCol variant (its cfg gives size, mean, std, crop pct, interpolation).
        image_config: Explicit settings instead of a model cfg (exactly one of the two).

    Returns:
        The resolved settings.

    Raises:
        ValueError: neither or both of ``model_name`` and ``image_config`` given, or an unknown model.
    """
    if (model_name is None) == (image_config is None):
        raise ValueError("give exactly one of model_name and image_config")
    if image_config is None:
        import revcol

        cfg = revcol.model_cfg(model_name)  # raises naming the unknown model
        image_config = ImageConfig(
            size=int(cfg["input_size"][-1]),
            mean=tuple(float(m) for m in cfg["mean"]),  # type: ignore[arg-type]
            std=tuple(float(s) for s in cfg["std"]),  # type: ignore[arg-type]
            crop_pct=float(cfg.get("crop_pct") or 0.875),
            interpolation=str(cfg.get("interpolation") or "bicubic"),
        )
    return ImageConfig(
        size=data_cfg.image_size or image_config.size,
        mean=image_config.mean,
        std=image_config.std,
        crop_pct=data_cfg.crop_pct or image_config.crop_pct,
        interpolation=image_config.interpolation,
    )


def mix_seed(*parts: int) -> int:
    """Derives a 63-bit seed from integers (stable across processes and Python versions).

    Args:
        *parts: Integers, e.g. ``(seed, epoch, shard, index)``.

    Returns:
        A non-negative seed.
    """
    packed = struct.pack(f"<{len(parts)}q", *(int(p) for p in parts))
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "little") >> 1


def seed_sample(seed: int) -> random.Random:
    """Seeds the global RNGs timm's transforms draw from, for one sample.

    Args:
        seed: The sample's seed (:func:`mix_seed`).

    Returns:
        A private :class:`random.Random` for the sample's own choices (the erasing box).
    """
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.random.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds devices (100 µs)
    return random.Random(seed ^ 0x5DEECE66D)


def _posterize(img: Any, bits_to_keep: int, **__: Any) -> Any:
    """timm's ``posterize`` as it behaved before Pillow 13: ``bits_to_keep <= 0`` gives a black image.

    Pillow 13 rejects ``bits`` outside ``[1, 8]``; timm 1.0's ``PosterizeIncreasing`` at magnitude 10 (reached with
    ``mstd0.5``) asks for 0 bits and would crash a worker now and then.
    """
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _patch_posterize(transform: Any) -> Any:
    """Swaps :func:`_posterize` into every posterize op of the RandAugment inside ``transform`` (in place)."""
    from timm.data.auto_augment import AugmentOp

    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []) or []:
            if isinstance(op, AugmentOp) and op.name.startswith("Posterize"):
                op.aug_fn = _posterize
    return transform


def build_train_transform(
    image: ImageConfig, data_cfg: DataConfig, *, prefetcher: bool = True
) -> Callable[[Any], Any]:
    """The paper's train transform (timm ``create_transform``), for one RGB PIL image.

    Args:
        image: Resolved preprocessing settings.
        data_cfg: Augmentation settings (``crop_scale``, ``hflip``, ``auto_augment``, ``color_jitter``,
            ``random_erasing``).
        prefetcher: True: crop, flip, RandAugment only, returning ``uint8`` ``(3, H, W)`` (normalize and erasing
            follow in :func:`normalize_batch`). False: the whole pipeline (normalize and random erasing included)
            returning a float tensor, as a plain DataLoader would run it.

    Returns:
        The transform.
    """
    from timm.data import create_transform

    transform = create_transform(
        input_size=image.size,
        is_training=True,
        scale=tuple(data_cfg.crop_scale),
        hflip=data_cfg.hflip,
        auto_augment=data_cfg.auto_augment,
        color_jitter=data_cfg.color_jitter if data_cfg.auto_augment is None else 0.0,
        interpolation=image.interpolation,
        mean=image.mean,
        std=image.std,
        re_prob=0.0 if prefetcher else data_cfg.random_erasing,
        re_mode="pixel",
        re_count=1,
        use_prefetcher=prefetcher,
    )
    return _patch_posterize(transform)


def build_eval_transform(image: ImageConfig, *, prefetcher: bool = True) -> Callable[[Any], Any]:
    """The eval transform: resize to ``size / crop_pct`` (interpolation from the model cfg), centre crop.

    Args:
        image: Resolved preprocessing settings.
        prefetcher: True returns ``uint8`` ``(3, H, W)`` (normalize in :func:`normalize_batch`); False a
            normalized float tensor.

    Returns:
        The transform.
    """
    from timm.data import create_transform

    return create_transform(
        input_size=image.size,
        is_training=False,
        interpolation=image.interpolation,
        mean=image.mean,
        std=image.std,
        crop_pct=image.crop_pct,
        use_prefetcher=prefetcher,
    )


def sample_erase_box(rng: random.Random, height: int, width: int, *, prob: float) -> tuple[int, int, int, int]:
    """Draws one random-erasing box the way timm's ``RandomErasing(max_count=1)`` does.

    Args:
        rng: The sample's RNG.
        height: Image height.
        width: Image width.
        prob: Probability of erasing at all.

    Returns:
        ``(top, left, h, w)``; ``h == 0`` means no erasing.
    """
    if prob <= 0 or rng.random() > prob:
        return (0, 0, 0, 0)
    area = height * width
    log_ratio = (math.log(ERASE_MIN_ASPECT), math.log(1 / ERASE_MIN_ASPECT))
    for _ in range(_ERASE_ATTEMPTS):
        target_area = rng.uniform(ERASE_MIN_AREA, ERASE_MAX_AREA) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if 0 < h < height and 0 < w < width:
            return (rng.randint(0, height - h), rng.randint(0, width - w), h, w)
    return (0, 0, 0, 0)


def normalize_batch(
    images: Any,
    *,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    erase: Any = None,
    generator: Any = None,
) -> Any:
    """``uint8`` images to normalized float, then random erasing with per-pixel normal noise.

    Args:
        images: ``uint8`` tensor ``(B, 3, H, W)`` on any device.
        mean: Per-channel mean (0..1 scale).
        std: Per-channel standard deviation (0..1 scale).
        erase: Optional int tensor ``(B, 4)`` of ``(top, left, h, w)`` boxes (``h == 0``: none).
        generator: torch generator on ``images``' device for the noise (reproducible erasing).

    Returns:
        float32 tensor ``(B, 3, H, W)`` on the same device.
    """
    import torch

    device = images.device
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=device).view(1, -1, 1, 1)
    out = torch.empty(images.shape, dtype=torch.float32, device=device)  # (B, 3, H, W)
    step = 4 if device.type == "cpu" else max(1, images.shape[0])  # CPU: a few images at a time stay in cache
    for i in range(0, images.shape[0], step):
        out[i : i + step].copy_(images[i : i + step]).mul_(scale).add_(shift)
    if erase is not None:
        boxes = erase.tolist() if hasattr(erase, "tolist") else list(erase)
        for i, (top, left, h, w) in enumerate(boxes):
            if h > 0 and w > 0:
                noise = torch.empty((out.shape[1], h, w), dtype=out.dtype, device=device)
                out[i, :, top : top + h, left : left + w] = noise.normal_(generator=generator)
    return out
