"""Reading weights — an earlier stage's export (safetensors) or a released RevCol checkpoint (``.pth``), local or
``s3://`` — and initializing a stage's model from them.

The finetune recipe of the paper: load the pretrained weights, drop what does not apply — the intermediate-
supervision heads and decoders when the finetune model has none, the classifier when the class count changes
(re-initialized, scaled by ``head_init_scale``) — and keep the rest strictly. A different input resolution needs
nothing: every weight is resolution-independent.
"""

from __future__ import annotations

import io
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load, load_file

import revcol
from pipeline import storage
from pipeline.config import S3Config
from pipeline.train.engine import load_weights

__all__ = ["MODEL_METADATA_KEY", "ModelSpec", "load_init_weights", "model_spec", "read_weights"]

logger = logging.getLogger(__name__)

MODEL_METADATA_KEY = "revcol.model"
"""Safetensors metadata key of an export: JSON ``{"name": variant, "overrides": {...}}`` of the model it holds."""
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
"""File names read with ``torch.load(weights_only=True)`` (the official release's checkpoints)."""


def _weights_url(uri: str) -> str:
    """The file behind ``uri``: itself, or ``model.safetensors`` in an export folder."""
    if uri.endswith((".safetensors", *_TORCH_SUFFIXES)) or not (storage.is_s3_url(uri) or Path(uri).is_dir()):
        return uri
    return storage.join(uri, "model.safetensors")


def _read_failed(uri: str, url: str, err: OSError) -> FileNotFoundError:
    if isinstance(err, FileNotFoundError):
        return FileNotFoundError(f"weights {uri!r} not found" + (f" ({url})" if url != uri else ""))
    return FileNotFoundError(f"weights {uri!r} could not be read: {err}")


def read_weights(uri: str, *, s3_cfg: S3Config | None = None) -> dict[str, torch.Tensor]:
    """Weights from a ``.safetensors`` file or an export folder, or an official RevCol checkpoint (``.pth``: its
    ``model`` / ``state_dict`` entry, ``module.`` prefixes removed); local or ``s3://``.

    Raises:
        FileNotFoundError: nothing at ``uri`` (or it cannot be read).
    """
    url = _weights_url(uri)
    try:
        if url.endswith(_TORCH_SUFFIXES):
            source: Any = io.BytesIO(storage.read_bytes(url, s3=s3_cfg)) if storage.is_s3_url(url) else url
            return revcol.official_state_dict(torch.load(source, map_location="cpu", weights_only=True))
        if not storage.is_s3_url(url):
            return load_file(url)  # memory-mapped: an 8 GiB RevCol-H export is not held twice
        return load(storage.read_bytes(url, s3=s3_cfg))
    except OSError as err:
        raise _read_failed(uri, url, err) from None


def _describe(uri: str, s3_cfg: S3Config | None) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """``({name: shape}, safetensors metadata)`` of the weights at ``uri``; a safetensors file's header only."""
    url = _weights_url(uri)
    if url.endswith(_TORCH_SUFFIXES):
        return {k: tuple(v.shape) for k, v in read_weights(uri, s3_cfg=s3_cfg).items()}, {}
    try:
        with storage.open_read(url, s3=s3_cfg) as stream:
            (size,) = struct.unpack("<Q", stream.read(8))
            header = json.loads(stream.read(size))
    except OSError as err:
        raise _read_failed(uri, url, err) from None
    except (struct.error, ValueError) as err:
        raise ValueError(f"weights {uri!r} are not a safetensors file ({err})") from None
    metadata = header.pop("__metadata__", None) or {}
    return {k: tuple(v["shape"]) for k, v in header.items()}, metadata


@dataclass(frozen=True)
class ModelSpec:
    """The model a weights file is built into: variant, class count, intermediate supervision, size overrides."""

    name: str
    num_classes: int
    intersup: bool
    overrides: dict[str, Any] = field(default_factory=dict)

    def build(self) -> revcol.RevCol:
        return revcol.create_model(self.name, num_classes=self.num_classes, intersup=self.intersup,
                                   **self.overrides)


def model_spec(
    uri: str, *, model: str | None = None, overrides: dict[str, Any] | None = None, s3_cfg: S3Config | None = None
) -> ModelSpec:
    """The model that ``uri``'s weights fit, checked on the ``meta`` device (no weights are loaded).

    The variant is ``model``, else the one an export records in its metadata; the class count and intermediate
    supervision come from the weights' heads.

    Raises:
        FileNotFoundError: no weights at ``uri``.
        ValueError: no variant given or recorded, or the weights do not fit it (naming the variant and the keys).
    """
    shapes, metadata = _describe(uri, s3_cfg)
    recorded = json.loads(metadata[MODEL_METADATA_KEY]) if MODEL_METADATA_KEY in metadata else None
    name = model or (recorded or {}).get("name")
    if name is None:
        raise ValueError(f"weights {uri!r} do not record their model: name it (--model, e.g. revcol_tiny)")
    if overrides is None:
        overrides = (recorded or {}).get("overrides", {}) if recorded and recorded.get("name") == name else {}
    heads = sorted((k for k in shapes if k.startswith(("cls.", "cls_blocks.")) and k.endswith("classifier.1.weight")),
                   key=lambda k: int(k.split(".")[1]) if k.startswith("cls_blocks.") else -1)
    if not heads:
        raise ValueError(f"weights {uri!r} hold no RevCol classifier (cls.classifier.1.weight): not RevCol weights?")
    spec = ModelSpec(name=name, num_classes=shapes[heads[-1]][0], intersup=heads[-1].startswith("cls_blocks."),
                     overrides=dict(overrides))
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in spec.build().state_dict().items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or unexpected or wrong:
        said = f" (they record {recorded['name']!r})" if recorded and recorded.get("name") != name else ""
        raise ValueError(
            f"weights {uri!r} do not fit model {name!r}{said}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {[f'{k}: {shapes[k]} vs {expected[k]}' for k in wrong[:5]]}"
        )
    return spec


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
