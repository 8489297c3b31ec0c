"""Initializing a stage's model from an earlier stage's export (or a released checkpoint).

The finetune recipe of the paper: load the pretrained weights, drop what does not apply — the intermediate-
supervision heads and decoders when the finetune model has none, the classifier when the class count changes
(re-initialized, scaled by ``head_init_scale``) — and keep the rest strictly. A different input resolution needs
nothing: every weight is resolution-independent.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors.torch import load, load_file

import revcol
from pipeline import storage
from pipeline.config import S3Config
from pipeline.train.engine import load_weights

__all__ = ["load_init_weights", "read_weights"]

logger = logging.getLogger(__name__)


def read_weights(uri: str, *, s3_cfg: S3Config | None = None) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file or an export folder (local or ``s3://``), or a released ``.pth``."""
    if uri.endswith(".safetensors") or storage.is_s3_url(uri) or Path(uri).is_dir():
        url = uri if uri.endswith(".safetensors") else storage.join(uri, "model.safetensors")
        try:
            if not storage.is_s3_url(url):
                return load_file(url)  # memory-mapped: an 8 GiB RevCol-H export is not held twice
            return load(storage.read_bytes(url, s3=s3_cfg))
        except FileNotFoundError:
            raise FileNotFoundError(f"init weights {uri!r} not found ({url})") from None
        except OSError as err:
            raise FileNotFoundError(f"init weights {uri!r} could not be read: {err}") from err
    path = Path(uri)
    if not path.exists():
        raise FileNotFoundError(f"init weights {uri!r} not found")
    return revcol.official_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def load_init_weights(
    model: revcol.RevCol,
    uri: str,
    *,
    head_init_scale: float | None = None,
    s3_cfg: S3Config | None = None,
) -> None:
    """Loads ``uri`` into ``model`` with the finetuning adaptations; raises naming any other mismatch. A ZeRO-3
    partitioned model is loaded one parameter at a time (:func:`pipeline.train.engine.load_weights`)."""
    weights = read_weights(uri, s3_cfg=s3_cfg)
    shapes = {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in model.named_parameters()}
    dropped = sorted(k for k in weights if k.startswith(("cls_blocks.", "decoder_blocks.")) and k not in shapes)
    if dropped and "cls.classifier.1.weight" in shapes and "cls.classifier.1.weight" not in weights:
        last = max(int(k.split(".")[1]) for k in weights if k.startswith("cls_blocks."))
        for key in [k for k in weights if k.startswith(f"cls_blocks.{last}.")]:
            weights[key.replace(f"cls_blocks.{last}.", "cls.", 1)] = weights[key]
    weights = {k: v for k, v in weights.items() if k in shapes or not k.startswith(("cls_blocks.", "decoder_blocks."))}
    head = [k for k in weights if k.startswith(("cls.", "cls_blocks.")) and k in shapes and tuple(weights[k].shape) != shapes[k]]
    for key in head:
        del weights[key]
    missing = [k for k in shapes if k not in weights and k not in head]
    unexpected = [k for k in weights if k not in shapes]
    wrong = [k for k in weights if k in shapes and tuple(weights[k].shape) != shapes[k]]
    if missing or unexpected or wrong:
        raise ValueError(
            f"init weights {uri!r} do not fit the model: missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"wrong shape {wrong[:10]}"
        )
    load_weights(model, weights)
    if head:
        model.reset_classifier(model.num_classes, head_init_scale=head_init_scale)
        logger.info("classifier re-initialized for %d classes (scale %s)", model.num_classes, head_init_scale)
    if dropped:
        logger.info("dropped %d intermediate-supervision tensors the model does not use", len(dropped))
