"""Reversible Column Networks (RevCol).

Paper: "Reversible Column Networks", Cai et al., ICLR 2023 (https://arxiv.org/abs/2212.11696).
Original code: https://github.com/megvii-research/RevCol (Apache-2.0). This is an independent implementation of
the released architecture: same hyperparameters, parameter counts and ``state_dict`` key names, with a reversible
backward whose activation memory does not grow with the number of columns (see ``revcol/reversible.py``).

A RevCol is a stem (4×4 patchify) followed by ``num_subnet`` columns. Each column is a 4-level ConvNeXt pyramid
(strides 4, 8, 16, 32) whose level ``l`` fuses the level below of the same column (downsampled) with the level
above of the previous column (upsampled), and adds ``alpha_l`` times its own previous state. RevCol-H has one
more branch into level 0, from the top level of the previous column.

One file per architecture (timm's convention), read top to bottom: blocks, the model, weight init, the cfg table
and the registered variants; keeping them together makes it run past 600 lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from revcol.reversible import ReverseStep, ReversibleColumns, RngState, capture_rng, reverse_column

__all__ = ["ColumnOutputs", "RevCol", "ALPHA_MIN"]

ALPHA_MIN = 1e-3
"""Smallest |alpha| used in forward (as released): keeps the reverse division ``/ alpha`` well conditioned."""


class ConvNextBlock(nn.Module):
    """ConvNeXt block: depthwise conv → LayerNorm → MLP (Linear, GELU, Linear) → layer scale → residual.

    Args:
        dim: input and output channels.
        hidden_dim: MLP width (4 × dim in the columns, dim in the reconstruction decoders).
        kernel_size: depthwise kernel size.
        layer_scale_init: initial value of the per-channel layer scale ``gamma``.
        drop_path: stochastic-depth probability of the residual branch.
    """

    def __init__(
        self, dim: int, hidden_dim: int, *, kernel_size: int = 3, layer_scale_init: float = 1e-6, drop_path: float = 0.0
    ) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=(kernel_size - 1) // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden_dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        y = (self.gamma * y).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + self.drop_path(y)


class UpSample(nn.Module):
    """Channel projection (Linear + LayerNorm) then nearest-neighbour upsampling by ``2**ratio``."""

    def __init__(self, ratio: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.scale = 2**ratio
        self.channel_reschedule = nn.Sequential(nn.Linear(in_channels, out_channels), nn.LayerNorm(out_channels, eps=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_reschedule(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return F.interpolate(x, scale_factor=self.scale, mode="nearest")


class Fusion(nn.Module):
    """The input of level ``level``: the level below, downsampled (``down``), plus, from the second column on,
    the previous column's level above, upsampled (``up``), and for RevCol-H's level 0 also the previous
    column's top level (``up2``)."""

    def __init__(self, level: int, channels: tuple[int, ...], *, first_col: bool, top_branch: bool) -> None:
        super().__init__()
        self.down: nn.Module = (
            nn.Identity()
            if level == 0
            else nn.Sequential(
                nn.Conv2d(channels[level - 1], channels[level], kernel_size=2, stride=2),
                LayerNorm2d(channels[level], eps=1e-6),
            )
        )
        self.up = UpSample(1, channels[level + 1], channels[level]) if not first_col and level < 3 else None
        self.up2 = UpSample(3, channels[3], channels[0]) if not first_col and level == 0 and top_branch else None

    def forward(self, below: torch.Tensor, above: torch.Tensor | None, top: torch.Tensor | None) -> torch.Tensor:
        x = self.down(below)
        if self.up is not None:
            x = x + self.up(above)
        if self.up2 is not None:
            x = x + self.up2(top)
        return x


class Level(nn.Module):
    """One level of a column: fusion, then a stack of ConvNeXt blocks."""

    def __init__(
        self,
        level: int,
        channels: tuple[int, ...],
        layers: tuple[int, ...],
        *,
        kernel_size: int,
        first_col: bool,
        top_branch: bool,
        drop_path_rates: list[float],
    ) -> None:
        super().__init__()
        self.fusion = Fusion(level, channels, first_col=first_col, top_branch=top_branch)
        first_block = sum(layers[:level])
        self.blocks = nn.Sequential(
            *(
                ConvNextBlock(
                    channels[level],
                    4 * channels[level],
                    kernel_size=kernel_size,
                    drop_path=drop_path_rates[first_block + i],
                )
                for i in range(layers[level])
            )
        )
        self.uses_rng = any(r > 0 for r in drop_path_rates[first_block : first_block + layers[level]])

    def forward(self, below: torch.Tensor, above: torch.Tensor | None, top: torch.Tensor | None) -> torch.Tensor:
        return self.blocks(self.fusion(below, above, top))


def _effective_alpha(alpha: torch.Tensor) -> torch.Tensor:
    """``alpha`` with |alpha| raised to at least ALPHA_MIN, gradient passed straight through.

    The release clamps ``alpha.data`` in place before each forward; doing it functionally gives the same values
    and gradients without mutating parameters (which sharded/offloaded parameters do not allow).
    """
    sign = torch.where(alpha < 0, -1.0, 1.0).to(alpha.dtype)
    clamped = sign * alpha.detach().abs().clamp_min(ALPHA_MIN)
    return alpha + (clamped - alpha.detach())


class Column(nn.Module):
    """One column (``subnet{i}`` in the release): four levels joined by reversible connections.

    ``forward(x, c0, c1, c2, c3)`` returns the new state. With ``reverse=ReverseStep(...)`` it instead takes the
    column's *output* state, reconstructs and returns its input state and back-propagates through itself
    (see ``revcol/reversible.py``). Both directions go through ``__call__`` so module hooks fire.
    """

    def __init__(
        self,
        channels: tuple[int, ...],
        layers: tuple[int, ...],
        *,
        kernel_size: int,
        first_col: bool,
        top_branch: bool,
        drop_path_rates: list[float],
    ) -> None:
        super().__init__()
        self.top_branch = top_branch
        for lvl, ch in enumerate(channels):
            setattr(self, f"alpha{lvl}", nn.Parameter(torch.full((1, ch, 1, 1), 0.5)))
        for lvl in range(4):
            setattr(
                self,
                f"level{lvl}",
                Level(
                    lvl,
                    channels,
                    layers,
                    kernel_size=kernel_size,
                    first_col=first_col,
                    top_branch=top_branch,
                    drop_path_rates=drop_path_rates,
                ),
            )

    def alphas(self) -> list[torch.Tensor]:
        return [_effective_alpha(getattr(self, f"alpha{lvl}")) for lvl in range(4)]

    def levels(self) -> list[Level]:
        return [getattr(self, f"level{lvl}") for lvl in range(4)]

    def level_inputs(
        self, lvl: int, x: torch.Tensor, new: list[Any], old: list[Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        below = x if lvl == 0 else new[lvl - 1]
        above = old[lvl + 1] if lvl < 3 else None
        top = old[3] if lvl == 0 and self.top_branch else None
        return below, above, top

    def forward(
        self,
        x: torch.Tensor,
        c0: torch.Tensor,
        c1: torch.Tensor,
        c2: torch.Tensor,
        c3: torch.Tensor,
        *,
        rng_out: list[RngState | None] | None = None,
        reverse: ReverseStep | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if reverse is not None:
            return reverse_column(self, x, [c0, c1, c2, c3], reverse)
        old = [c0, c1, c2, c3]
        new: list[Any] = [None] * 4
        alphas = self.alphas()
        for lvl, level in enumerate(self.levels()):
            if rng_out is not None and level.uses_rng:
                rng_out[lvl] = capture_rng(x.device)
            new[lvl] = alphas[lvl] * old[lvl] + level(*self.level_inputs(lvl, x, new, old))
        return new[0], new[1], new[2], new[3]

class Classifier(nn.Module):
    """Global average pool → LayerNorm → Linear."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.LayerNorm(in_channels, eps=1e-6), nn.Linear(in_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Decoder(nn.Module):
    """Reconstruction decoder of intermediate supervision (≤1000 classes): three (1×1 conv, LayerNorm, GELU,
    bilinear ×2, ConvNeXt block) stages from the top level down to stride 4, then a 1×1 conv to 4×4×3 and
    pixel shuffle back to the input resolution."""

    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        dims = list(reversed(channels))  # top level first
        self.normal_layers = nn.ModuleList(
            nn.Sequential(ConvNextBlock(dims[i], dims[i], kernel_size=3)) for i in range(1, len(dims))
        )
        self.proj_layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dims[i - 1], dims[i], 1), LayerNorm2d(dims[i], eps=1e-6), nn.GELU())
            for i in range(1, len(dims))
        )
        self.projback = nn.Sequential(nn.Conv2d(dims[-1], 4 * 4 * 3, 1), nn.PixelShuffle(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for proj, blocks in zip(self.proj_layers, self.normal_layers, strict=True):
            x = F.interpolate(proj(x), scale_factor=2, mode="bilinear", align_corners=True)
            x = blocks(x)
        return self.projback(x)


class SimpleDecoder(nn.Module):
    """Light reconstruction decoder (>1000 classes, as released): LayerNorm, 1×1 conv to 32×32×3, pixel shuffle."""

    def __init__(self, in_channels: int, stride: int = 32) -> None:
        super().__init__()
        self.projback = nn.Sequential(
            LayerNorm2d(in_channels, eps=1e-6), nn.Conv2d(in_channels, stride * stride * 3, 1), nn.PixelShuffle(stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projback(x)


@dataclass
class ColumnOutputs:
    """What :meth:`RevCol.forward_columns` returns.

    Attributes:
        logits: per supervised column, first to last; ``logits[-1]`` is the model's prediction. One entry without
            intermediate supervision, four with it.
        reconstructions: images reconstructed from intermediate columns (intermediate supervision only), each
            ``(B, 3, H, W)`` logits of the de-normalized input.
        features: the last column's multi-level feature maps (strides 4, 8, 16, 32).
    """

    logits: list[torch.Tensor]
    reconstructions: list[torch.Tensor]
    features: list[torch.Tensor]


class RevCol(nn.Module):
    """Reversible Column Network.

    Args:
        channels: widths of the four levels.
        layers: ConvNeXt blocks per level, in every column.
        num_subnet: number of columns.
        kernel_size: depthwise kernel size of the column blocks.
        num_classes: classifier outputs.
        in_chans: input image channels.
        drop_path_rate: stochastic depth, rising linearly from 0 over the blocks of a column (same in every column).
        reversible: recompute columns in backward instead of storing them (memory independent of ``num_subnet``).
        intersup: intermediate supervision: classifiers after every ``num_subnet // 4`` columns and reconstruction
            decoders after the first three of them (see :func:`revcol.compound_loss`).
        top_branch: RevCol-H's extra fusion branch from the previous column's top level into level 0.
        head_init_scale: scale the freshly initialized classifier weights and bias by this (finetuning).
        channels_last: run on channels-last (NHWC-strided) activations, so the permutes around the ConvNeXt
            blocks' LayerNorm and MLP are views rather than copies. Weights and ``state_dict`` are unchanged. Off
            by default: on the CPU with 2 threads it makes the step slower (``benchmarks/model_speed.py``).
        keep_last_column: (reversible) keep the last column's activations for backward instead of recomputing
            them: one column's activations more (still independent of ``num_subnet``), one column's forward
            less per step. On by default; off is the reference path ``benchmarks/model_speed.py`` compares
            against.
    """

    def __init__(
        self,
        *,
        channels: tuple[int, ...] = (64, 128, 256, 512),
        layers: tuple[int, ...] = (2, 2, 4, 2),
        num_subnet: int = 4,
        kernel_size: int = 3,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_path_rate: float = 0.0,
        reversible: bool = True,
        intersup: bool = False,
        top_branch: bool = False,
        head_init_scale: float | None = None,
        channels_last: bool = False,
        keep_last_column: bool = True,
    ) -> None:
        super().__init__()
        channels, layers = tuple(int(c) for c in channels), tuple(int(n) for n in layers)
        _check_args(channels, layers, num_subnet, kernel_size, num_classes, drop_path_rate, intersup)
        self.channels, self.layers, self.num_subnet = channels, layers, num_subnet
        self.num_classes, self.num_features = num_classes, channels[-1]
        self.reversible, self.intersup = reversible, intersup
        self.channels_last, self.keep_last_column = channels_last, keep_last_column
        self.feature_info = [
            {"num_chs": ch, "reduction": 4 * 2**lvl, "module": f"subnet{num_subnet - 1}.level{lvl}"}
            for lvl, ch in enumerate(channels)
        ]

        self.stem = nn.Sequential(nn.Conv2d(in_chans, channels[0], 4, stride=4), LayerNorm2d(channels[0], eps=1e-6))
        rates = torch.linspace(0, drop_path_rate, sum(layers), device="cpu").tolist()
        for i in range(num_subnet):
            column = Column(
                channels, layers, kernel_size=kernel_size, first_col=i == 0, top_branch=top_branch, drop_path_rates=rates
            )
            self.add_module(f"subnet{i}", column)

        if intersup:
            self.cls_blocks = nn.ModuleList(Classifier(channels[-1], num_classes) for _ in range(4))
            self.decoder_blocks = nn.ModuleList(
                Decoder(channels) if num_classes <= 1000 else SimpleDecoder(channels[-1]) for _ in range(3)
            )
        else:
            self.cls = Classifier(channels[-1], num_classes)
        self.init_weights(head_init_scale=head_init_scale)

    # ----------------------------------------------------------------------------------------- init and hooks
    def init_weights(self, *, head_init_scale: float | None = None) -> None:
        """The release's initialization: truncated normal (std .02) for conv/linear weights, zero biases.

        Only through ``apply()``: DeepSpeed's ``zero.Init`` gathers each module's partitioned parameters around
        ``apply()``, so a model built partitioned gets the same weights as a plain build.
        """
        self.apply(init_module)
        if head_init_scale is not None:
            self._scale_head(head_init_scale)

    def _scale_head(self, scale: float) -> None:
        def scale_linear(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                with torch.no_grad():
                    module.weight.mul_(scale)
                    module.bias.mul_(scale)

        for head in self.classifiers():
            head.classifier[1].apply(scale_linear)

    def columns(self) -> list[Column]:
        return [getattr(self, f"subnet{i}") for i in range(self.num_subnet)]

    def classifiers(self) -> list[Classifier]:
        return list(self.cls_blocks) if self.intersup else [self.cls]

    def get_classifier(self) -> nn.Module:
        return self.classifiers()[-1].classifier[1]

    def reset_classifier(self, num_classes: int, *, head_init_scale: float | None = None) -> None:
        """Replaces every classifier with a freshly initialized one of ``num_classes`` outputs (finetuning)."""
        self.num_classes = num_classes
        for head in self.classifiers():
            head.classifier[1] = nn.Linear(self.num_features, num_classes, device=head.classifier[0].weight.device)
            init_module(head.classifier[1])
        if head_init_scale is not None:
            self._scale_head(head_init_scale)

    def drop_intersup(self) -> None:
        """Removes intermediate supervision (per-column classifiers, decoders), keeping the last classifier as
        ``cls`` — what the official finetunes do to an intermediate-supervision pretrained model."""
        if not self.intersup:
            return
        self.cls = self.cls_blocks[-1]
        del self.cls_blocks, self.decoder_blocks
        self.intersup = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch for recomputation in backward: here that is the reversible mode."""
        self.reversible = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay: stem first, then each column, heads last."""
        return {
            "stem": r"^stem",
            "blocks": r"^subnet(\d+)" if coarse else [(r"^subnet(\d+)\.level(\d+)", None), (r"^subnet(\d+)", None)],
        }

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """Depth of every parameter for layer-wise LR decay, as the release assigns it; and the number of depths.

        Block ``b`` (counted over a column's levels) of column ``c`` sits at ``1 + d[b][c]`` where ``d`` is the
        shortest path through the (block, column) grid, ``d[b][c] = min(d[b][c-1], d[b-1][c]) + 1`` with
        ``d[b][0] = b`` and ``d[0][c] = c``: a late block of an early column is as deep as an early block of a
        late one. Fusions sit with their level's first block, a column's alphas with its first block; the stem
        is 0 and the heads come last.
        """
        depth = sum(self.layers)
        grid = [[0] * self.num_subnet for _ in range(depth)]
        for b in range(depth):
            for c in range(self.num_subnet):
                grid[b][c] = b if c == 0 else c if b == 0 else min(grid[b][c - 1], grid[b - 1][c]) + 1
        last = grid[-1][-1] + 1
        ids = {}
        for name, _ in self.named_parameters():
            parts = name.split(".")
            if parts[0] == "stem":
                ids[name] = 0
            elif parts[0].startswith("subnet"):
                col = int(parts[0].removeprefix("subnet"))
                if parts[1].startswith("alpha"):
                    block = 0
                else:
                    lvl = int(parts[1].removeprefix("level"))
                    block = sum(self.layers[:lvl]) + (int(parts[3]) if parts[2] == "blocks" else 0)
                ids[name] = grid[block][col] + 1
            else:
                ids[name] = last + 1
        return ids, last + 2

    def no_weight_decay(self) -> set[str]:
        """Layer scales and reversible shortcut weights (norms and biases are excluded by dimension)."""
        return {name for name, _ in self.named_parameters() if name.endswith(".gamma") or ".alpha" in name}

    # ------------------------------------------------------------------------------------------------ forward
    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # convolutions and pointwise ops keep the layout
        return self.stem(x)

    def _run_columns(self, x: torch.Tensor, taps: tuple[int, ...]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Runs every column from the stem output; returns the last state and the tapped columns' ``c3``.

        Reversible: the columns up to the last (or all of them, without ``keep_last_column``) run in
        :class:`ReversibleColumns`, the rest with ordinary autograd, which keeps its activations.
        """
        columns = self.columns()
        state: tuple[torch.Tensor, ...] = tuple(x.new_zeros(()) for _ in range(4))
        tapped: list[torch.Tensor] = []
        recomputed = 0
        params_need_grad = any(p.requires_grad for column in columns for p in column.parameters())
        if self.reversible and torch.is_grad_enabled() and (x.requires_grad or params_need_grad):
            recomputed = len(columns) - 1 if self.keep_last_column else len(columns)
        if recomputed:
            replay_rng = self.training and any(lvl.uses_rng for col in columns for lvl in col.levels())
            out = _reversible_columns(columns[:recomputed], taps, replay_rng, x)
            state, tapped = out[:4], list(out[4:])
        for i in range(recomputed, len(columns)):
            state = columns[i](x, *state)
            if i in taps:
                tapped.append(state[3])
        return list(state), tapped

    def _taps(self) -> tuple[int, ...]:
        """Columns (except the last) whose top level feeds an intermediate head."""
        if not self.intersup:
            return ()
        interval = self.num_subnet // 4
        return tuple(i for i in range(self.num_subnet - 1) if (i + 1) % interval == 0)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Multi-level feature maps of the last column, strides 4, 8, 16, 32 (for detection/segmentation)."""
        state, _ = self._run_columns(self._stem(x), ())
        return state

    def forward_head(self, features: list[torch.Tensor] | torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        top = features[-1] if isinstance(features, (list, tuple)) else features
        head = self.classifiers()[-1]
        if pre_logits:
            return head.classifier[0](F.adaptive_avg_pool2d(top, 1).flatten(1))
        return head(top)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of the last column."""
        return self.forward_head(self.forward_features(x))

    def forward_columns(self, x: torch.Tensor) -> ColumnOutputs:
        """Per-column logits and reconstructions for intermediate supervision and per-column metrics.

        With ``intersup`` the four classifiers see the columns ``num_subnet//4``, ``2·num_subnet//4``, … and
        the decoders the first three of those; without it this is ``forward`` with the features attached.
        """
        state, tapped = self._run_columns(self._stem(x), self._taps())
        if not self.intersup:
            return ColumnOutputs(logits=[self.cls(state[3])], reconstructions=[], features=state)
        tops = [*tapped, state[3]]
        logits = [head(t) for head, t in zip(self.cls_blocks, tops, strict=True)]
        recon = [dec(t) for dec, t in zip(self.decoder_blocks, tops[:-1], strict=True)]
        return ColumnOutputs(logits=logits, reconstructions=recon, features=state)


@torch.compiler.disable
def _reversible_columns(
    columns: list[Column], taps: tuple[int, ...], replay_rng: bool, x: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    # Kept out of torch.compile graphs: the backward runs modules and nested autograd, which dynamo can't trace.
    # The empty trigger makes autograd call backward (where the columns' parameters get their gradients) even
    # when x needs none. Parameters themselves must not be inputs: a sharded (ZeRO-3) parameter would then get
    # a gradient accumulator recorded with its empty partition shape.
    trigger = torch.empty(0, device=x.device, requires_grad=True)
    return ReversibleColumns.apply(columns, taps, replay_rng, x, trigger)


def _check_args(
    channels: tuple[int, ...],
    layers: tuple[int, ...],
    num_subnet: int,
    kernel_size: int,
    num_classes: int,
    drop_path_rate: float,
    intersup: bool,
) -> None:
    if len(channels) != 4 or any(c < 1 for c in channels):
        raise ValueError(f"channels must be 4 positive widths, got {channels}")
    if len(layers) != 4 or any(n < 1 for n in layers):
        raise ValueError(f"layers must be 4 positive block counts, got {layers}")
    if num_subnet < 1:
        raise ValueError(f"num_subnet must be >= 1, got {num_subnet}")
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if not 0 <= drop_path_rate < 1:
        raise ValueError(f"drop_path_rate must lie in [0, 1), got {drop_path_rate}")
    if intersup and num_subnet % 4:
        raise ValueError(f"intersup needs num_subnet divisible by 4 (four supervised columns), got {num_subnet}")


def init_module(module: nn.Module) -> None:
    """The release's init for one module: truncated normal (std .02) conv/linear weights, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# ------------------------------------------------------------------------------------------ pretrained cfgs
def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.0",
        "classifier": "cls.classifier.1",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2212.11696",
        "origin_url": "https://github.com/megvii-research/RevCol",
        **kwargs,
    }


# No weights are downloaded at run time; load released checkpoints with revcol.load_official_state_dict.
default_cfgs = generate_default_cfgs(
    {
        "revcol_tiny.untrained": _cfg(),
        "revcol_small.untrained": _cfg(),
        "revcol_base.untrained": _cfg(),
        "revcol_large.untrained": _cfg(),
        "revcol_xlarge.untrained": _cfg(),
        "revcol_huge.untrained": _cfg(),
        "revcol_test.untrained": _cfg(input_size=(3, 64, 64), pool_size=(2, 2)),
    }
)


# Official architecture of every released variant (channels, blocks per level, columns, kernel, extra branch)
# and the drop-path rate of its ImageNet-1K recipe.
VARIANTS: dict[str, dict[str, Any]] = {
    "revcol_tiny": dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2), num_subnet=4, kernel_size=3),
    "revcol_small": dict(channels=(64, 128, 256, 512), layers=(2, 2, 4, 2), num_subnet=8, kernel_size=3),
    "revcol_base": dict(channels=(72, 144, 288, 576), layers=(1, 1, 3, 2), num_subnet=16, kernel_size=3),
    "revcol_large": dict(channels=(128, 256, 512, 1024), layers=(1, 2, 6, 2), num_subnet=8, kernel_size=3),
    "revcol_xlarge": dict(channels=(224, 448, 896, 1792), layers=(1, 2, 6, 2), num_subnet=8, kernel_size=3),
    "revcol_huge": dict(
        channels=(360, 720, 1440, 2880), layers=(1, 2, 6, 2), num_subnet=8, kernel_size=3, top_branch=True
    ),
    # Not released: a seconds-fast model with every feature of the real ones, for tests and the demo.
    "revcol_test": dict(channels=(8, 16, 24, 32), layers=(1, 1, 2, 1), num_subnet=4, kernel_size=3),
}


def _create_revcol(variant: str, pretrained: bool = False, **kwargs: Any) -> RevCol:
    if pretrained:
        raise ValueError(
            f"{variant}: no weights are downloaded; build with pretrained=False and load a released checkpoint "
            "with revcol.load_official_state_dict(model, torch.load(path, weights_only=True))"
        )
    args = {**VARIANTS[variant], **kwargs}
    return build_model_with_cfg(RevCol, variant, pretrained=False, **args)


@register_model
def revcol_tiny(pretrained: bool = False, **kwargs: Any) -> RevCol:
    return _create_revcol("revcol_tiny", pretrained, **kwargs)


@register_model
def revcol_small(pretrained: bool = False, **kwargs: Any) -> RevCol:
    return _create_revcol("revcol_small", pretrained, **kwargs)


@register_model
def revcol_base(pretrained: bool = False, **kwargs: Any) -> RevCol:
    return _create_revcol("revcol_base", pretrained, **kwargs)


@register_model
def revcol_large(pretrained: bool = False, **kwargs: Any) -> RevCol:
    return _create_revcol("revcol_large", pretrained, **kwargs)


@register_model
def revcol_xlarge(pretrained: bool = False, **kwargs: Any) -> RevCol:
    return _create_revcol("revcol_xlarge", pretrained, **kwargs)


@register_model
def revcol_huge(pretrained: bool = False, **kwargs: Any) -> RevCol:
    return _create_revcol("revcol_huge", pretrained, **kwargs)


@register_model
def revcol_test(pretrained: bool = False, **kwargs: Any) -> RevCol:
    return _create_revcol("revcol_test", pretrained, **kwargs)
