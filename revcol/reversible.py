"""Reversible backward over a whole stack of RevCol columns.

Each column maps its input state ``(c0, c1, c2, c3)`` (plus the stem output ``x``) to a new state with

    c_l' = alpha_l * c_l + F_l(inputs_l)        for l = 0, 1, 2, 3 (in that order)

where ``F_l`` is level ``l`` (fusion + ConvNeXt blocks) and ``inputs_l`` are tensors that are already known when
going backwards: the new state of the level below (``c_{l-1}'`` or ``x``) and the *old* state of the levels above,
which are reconstructed first (3, 2, 1, 0). So every column's input can be recomputed from its output:

    c_l = (c_l' - F_l(inputs_l)) / alpha_l

:class:`ReversibleColumns` runs all columns under ``no_grad`` and keeps only ``x`` and the last column's state
(plus RNG states to replay drop-path masks). In backward it walks the columns from last to first, each time
recomputing the level outputs with grad enabled, reconstructing the column's input and back-propagating one
level at a time. Activation memory therefore does not grow with the number of columns (the official
implementation keeps every column's outputs, ~11.5 MB per column for RevCol-T at batch 8). By default the model
(``RevCol.keep_last_column``) hands only the columns before the last to :class:`ReversibleColumns` and runs the
last one with ordinary autograd: its activations are the last to be produced and the first backward needs, so
keeping them costs one column's memory (constant in the number of columns) and saves recomputing it.

The per-column work is done by calling the column module itself (``column(x, *state, reverse=...)``), never
its internals, so module hooks fire in both directions: DeepSpeed ZeRO-3 gathers partitioned parameters in
forward pre-hooks and must see the recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ReverseStep", "ReversibleColumns", "RngState", "capture_rng", "restore_rng", "reverse_column"]


@dataclass
class RngState:
    """The global RNG state(s) at one point of the forward pass, to replay random ops (drop path) exactly."""

    cpu: torch.Tensor
    device: torch.Tensor | None = None
    device_type: str = "cpu"


def capture_rng(device: torch.device) -> RngState:
    """Returns the CPU RNG state and, for an accelerator ``device``, that device's RNG state."""
    state = RngState(cpu=torch.get_rng_state(), device_type=device.type)
    if device.type != "cpu":
        state.device = torch.get_device_module(device.type).get_rng_state(device)
    return state


def restore_rng(state: RngState, device: torch.device) -> None:
    """Sets the global RNG state(s) back to ``state``."""
    torch.set_rng_state(state.cpu)
    if state.device is not None:
        torch.get_device_module(device.type).set_rng_state(state.device, device)


@dataclass
class ReverseStep:
    """What a column needs to run backwards: the gradients w.r.t. its output state and its forward RNG states.

    Passed as ``column(x, *output_state, reverse=step)``; the column fills ``input_grads``/``x_grad`` and
    returns its reconstructed input state.
    """

    output_grads: list[torch.Tensor]
    rng: list[RngState | None]
    first: bool
    x_grad: torch.Tensor | None = None
    input_grads: list[torch.Tensor | None] = field(default_factory=lambda: [None] * 4)


def reverse_column(
    column: nn.Module, x: torch.Tensor, new_values: list[torch.Tensor], step: ReverseStep
) -> tuple[torch.Tensor, ...]:
    """Reconstructs ``column``'s input from its output, level 3 down to 0, back-propagating as it goes.

    ``column`` is a :class:`revcol.model.Column` (its ``alphas``, ``levels`` and ``level_inputs``; not imported
    here, which would make the two modules import each other).

    Called from ``column.forward(..., reverse=step)`` so that the column's hooks fire. Every tensor crossing a
    level boundary is a fresh leaf, so each level's small graph is freed right after its backward; gradients
    w.r.t. the leaves are read from ``.grad`` and passed on.
    """
    grads = step.output_grads
    alphas = column.alphas()
    levels = column.levels()
    x_leaf = x.detach().requires_grad_()
    new = [v.detach().requires_grad_() for v in new_values]
    old: list[Any] = [None] * 4
    for lvl in (3, 2, 1, 0):
        if step.rng[lvl] is not None:
            restore_rng(step.rng[lvl], x.device)
        branch = levels[lvl](*column.level_inputs(lvl, x_leaf, new, old))
        if step.first:
            # The first column starts from zeros: nothing to reconstruct.
            old[lvl] = torch.zeros((), dtype=new[lvl].dtype, device=new[lvl].device, requires_grad=True)
        else:
            with torch.no_grad():
                restored = (new[lvl].detach() - branch.detach()) / alphas[lvl].detach()
            old[lvl] = restored.requires_grad_()
        out = alphas[lvl] * old[lvl] + branch
        grad = grads[lvl] if new[lvl].grad is None else grads[lvl] + new[lvl].grad
        torch.autograd.backward(out, grad)
    step.x_grad = x_leaf.grad if x_leaf.grad is not None else torch.zeros_like(x)
    step.input_grads = [o.grad if o.grad is not None else torch.zeros_like(o) for o in old]
    return tuple(o.detach() for o in old)


def _fork_rng(device: torch.device) -> Any:
    """Restores the global RNG state(s) on exit, so replaying forward RNG states leaves no trace."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def _autocast_state(device_type: str) -> dict[str, Any]:
    return {
        "device_type": device_type,
        "enabled": torch.is_autocast_enabled(device_type),
        "dtype": torch.get_autocast_dtype(device_type),
        "cache_enabled": torch.is_autocast_cache_enabled(),
    }


class ReversibleColumns(torch.autograd.Function):
    """``apply(columns, taps, replay_rng, x, trigger) -> (c0, c1, c2, c3, *tapped_c3)``.

    Args (of ``apply``):
        columns: the column modules, first to last.
        taps: indices of columns (not the last) whose ``c3`` is also returned, for intermediate heads.
        replay_rng: record RNG states so random ops (drop path) are replayed exactly in backward.
        x: the stem output, shared by every column.
        trigger: an empty tensor that requires grad, so backward runs even when ``x`` needs no gradient. The
            columns' parameters get their gradients accumulated into ``.grad`` during backward, as in any
            recomputation scheme.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, columns: list[nn.Module], taps: tuple[int, ...], replay_rng: bool, x: torch.Tensor, trigger: Any
    ) -> tuple[torch.Tensor, ...]:
        ctx.columns = columns
        ctx.taps = taps
        ctx.autocast = _autocast_state(x.device.type)
        ctx.rng = []
        tapped = []
        state: tuple[torch.Tensor, ...] = tuple(x.new_zeros(()) for _ in range(4))
        with torch.no_grad():
            for i, column in enumerate(columns):
                rng: list[RngState | None] = [None] * 4
                state = column(x, *state, rng_out=rng if replay_rng else None)
                ctx.rng.append(rng)
                if i in taps:
                    tapped.append(state[3])
        ctx.save_for_backward(x, *state)
        return (*state, *tapped)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x, *state = ctx.saved_tensors
        output_grads = list(grads[:4])
        tap_grads = dict(zip(ctx.taps, grads[4:], strict=True))
        x_grad = torch.zeros_like(x)
        with _fork_rng(x.device):
            for i in reversed(range(len(ctx.columns))):
                if i in tap_grads:
                    output_grads[3] = output_grads[3] + tap_grads[i]
                step = ReverseStep(output_grads=output_grads, rng=ctx.rng[i], first=i == 0)
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    state = ctx.columns[i](x, *state, reverse=step)
                x_grad += step.x_grad
                output_grads = step.input_grads  # type: ignore[assignment]
        ctx.columns = ctx.rng = None  # free references early
        return None, None, None, x_grad, None
