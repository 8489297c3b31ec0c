"""RevCol (Reversible Column Networks), pure PyTorch: the model family, reversible backward, checkpoint loading.

    import revcol
    model = revcol.create_model("revcol_tiny", num_classes=1000)       # also timm.create_model("revcol_tiny")
    logits = model(images)                                              # (B, num_classes)
    out = model.forward_columns(images)                                 # per-column logits, reconstructions
"""

from __future__ import annotations

from typing import Any

from revcol.checkpoint import load_official_state_dict, official_state_dict
from revcol.loss import compound_loss, reconstruction_target
from timm.models import get_pretrained_cfg

from revcol.model import VARIANTS, ColumnOutputs, RevCol

__all__ = [
    "ColumnOutputs",
    "RevCol",
    "compound_loss",
    "create_model",
    "list_variants",
    "load_official_state_dict",
    "model_cfg",
    "official_state_dict",
    "reconstruction_target",
]

_OVERRIDES = (
    "channels", "layers", "num_subnet", "kernel_size", "top_branch", "head_init_scale", "in_chans", "channels_last",
    "keep_last_column",
)


def list_variants() -> list[str]:
    """Names accepted by :func:`create_model` (and by ``timm.create_model`` once ``revcol`` is imported)."""
    return list(VARIANTS)


def model_cfg(name: str) -> dict[str, Any]:
    """Preprocessing metadata of a variant: input size, mean/std, crop pct, interpolation, head names."""
    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    return get_pretrained_cfg(name).to_dict()


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    reversible: bool = True,
    intersup: bool = False,
    drop_path_rate: float = 0.0,
    **overrides: Any,
) -> RevCol:
    """Builds a registered RevCol variant with the official hyperparameters.

    Args:
        name: one of :func:`list_variants` (``revcol_tiny`` … ``revcol_huge``, and the tiny ``revcol_test``).
        num_classes: classifier outputs.
        reversible: recompute columns in backward (memory independent of the number of columns).
        intersup: intermediate supervision heads (per-column classifiers, reconstruction decoders).
        drop_path_rate: stochastic depth.
        **overrides: custom sizes: ``channels``, ``layers``, ``num_subnet``, ``kernel_size``, ``top_branch``,
            ``head_init_scale``, ``in_chans``; and the speed switches ``keep_last_column`` (on by default) and
            ``channels_last`` (off), see :class:`RevCol`.
    """
    from revcol.model import _create_revcol

    if name not in VARIANTS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(VARIANTS)}")
    unknown = sorted(set(overrides) - set(_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name}; allowed: {', '.join(_OVERRIDES)}")
    return _create_revcol(
        name,
        num_classes=num_classes,
        reversible=reversible,
        intersup=intersup,
        drop_path_rate=drop_path_rate,
        **overrides,
    )
