"""``Bound(fn, *args)``: the f of a DEQ layer with its inputs in view, f(z) = fn(z, *args).

Cores and solvers call it as any f. What it adds over a closure (``lambda z: cell(z, x)``) is
that the inputs are visible: a captured solve (``solver.capture``, :mod:`deqlab.solvers.capture`)
copies them into its static buffers before each replay, and the reversible gradient re-binds
them. The LightningModules pass their cells this way (``Bound(net.cell, u)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
