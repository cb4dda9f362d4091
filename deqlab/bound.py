"""``Bound(fn, *args)``: the f of a DEQ layer with its inputs in view, f(z) = fn(z, *args).

Cores and solvers call it as any f. What it adds over a closure (``lambda z: cell(z, x)``) is
that the inputs are visible: a captured solve (``solver.capture``, :mod:`deqlab.solvers.capture`)
copies them into its static buffers before each replay, and the reversible gradient re-binds
them, and the implicit gradient differentiates twice through them. The LightningModules pass
their cells this way (``Bound(net.cell, u)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class Bound:
    """``f(z) = fn(z, *args)`` with its inputs in view (module docstring).

    Args:
        fn: the cell, called as ``fn(z, *args)``.
        *args: its inputs besides the state (the input injection).

    Example:
        >>> cell = lambda z, u: 0.5 * z + u
        >>> f = Bound(cell, torch.ones(2))
        >>> f(torch.zeros(2))
        tensor([1., 1.])
    """

    def __init__(self, fn: Callable[..., Any], *args: Any):
        self.fn, self.args = fn, args

    def __call__(self, z: Any) -> Any:
        return self.fn(z, *self.args)

    def __repr__(self) -> str:
        return f"Bound({self.fn!r}, {len(self.args)} inputs)"


def map_tensors(fn: Callable[[Tensor], Any], x: Any) -> Any:
    """``fn`` applied to every tensor in x: tuples, lists, dicts and dataclasses (the LM's
    context) are walked; anything else is kept as it is."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, (tuple, list)):
        items = [map_tensors(fn, v) for v in x]
        return type(x)(*items) if hasattr(x, "_fields") else type(x)(items)
    if isinstance(x, dict):
        return {k: map_tensors(fn, v) for k, v in x.items()}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(
            x,
            **{
                f.name: map_tensors(fn, getattr(x, f.name)) for f in dataclasses.fields(x) if f.init
            },
        )
    return x


def differentiable_inputs(
    f: Callable[[Any], Any], needed_by: str = "grad=reversible"
) -> tuple[Callable[[Any, list[Tensor]], Any], list[Tensor]]:
    """The tensors f reads that need a gradient, and ``g(z, tensors) = f(z)`` reading those
    tensors from its argument instead (so that each evaluation's products reach them, and
    stand-ins for them can be differentiated apart from the originals).

    Args:
        f: a :class:`Bound` (its inputs that require grad, and its cell's parameters when the
            cell is a module) or an ``nn.Module`` z -> z (its parameters).
        needed_by: who asks, named in the error for any other f.

    Raises:
        TypeError: f is another callable (a closure hides what it reads).
    """
    if isinstance(f, Bound):
        fn, bound_args = f.fn, f.args
    elif isinstance(f, nn.Module):
        fn, bound_args = f, ()
    else:
        raise TypeError(
            f"{needed_by} must know the tensors f reads to hand back their gradients: pass f as "
            f"deqlab.Bound(cell, *inputs) or an nn.Module z -> z, not a {type(f).__name__}"
        )
    module = fn if isinstance(fn, nn.Module) else None
    leaves: list[Tensor] = []

    def collect(t: Tensor) -> Tensor:
        if t.requires_grad:
            leaves.append(t)
        return t

    map_tensors(collect, bound_args)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad] if module else []
    params = [p for _, p in named]
    slots = {id(t): i for i, t in enumerate(leaves)}

    def g(z: Any, tensors: list[Tensor]) -> Any:
        args = map_tensors(lambda t: tensors[slots[id(t)]] if id(t) in slots else t, bound_args)
        given = tensors[len(leaves) :]
        if all(a is b for a, b in zip(given, params)):
            return fn(z, *args)
        # stand-ins for the parameters: the module runs with them in place of its own
        swap = {name: t for (name, _), t in zip(named, given)}
        return torch.func.functional_call(module, swap, (z, *args))

    return g, [*leaves, *params]
