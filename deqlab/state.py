"""DEQ states: a tensor, or a tuple of tensors sharing the batch dimension (multi-scale models),
and the few operations every part of the engine applies to either kind."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

State = Tensor | tuple[Tensor, ...] | list[Tensor]


def as_tuple(z: State) -> tuple[Tensor, ...]:
    """The tensors of a state, as a tuple."""
    return (z,) if isinstance(z, Tensor) else tuple(z)


def like(template: State, parts: Sequence[Tensor]) -> State:
    """``parts`` in the structure of ``template`` (a tensor or a tuple)."""
    return parts[0] if isinstance(template, Tensor) else tuple(parts)


def leaf(z: State, requires_grad: bool) -> State:
    """z detached from any graph, as a fresh leaf (that records from here if requires_grad)."""
    return like(z, [p.detach().requires_grad_(requires_grad) for p in as_tuple(z)])


def mix(z: State, fz: State, tau: float) -> State:
    """tau fz + (1 - tau) z on states of any structure."""
    if tau == 1.0:
        return fz
    # Not torch.lerp: under autocast f may return another dtype than z, and this promotes.
    return like(z, [a + (b - a) * tau for a, b in zip(as_tuple(z), as_tuple(fz))])
