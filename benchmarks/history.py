"""The products with stored history that Anderson and Broyden make, alone, with the solvers'
own kernels: f plus these is a floor below which no implementation of the algorithm goes
(the ``history_floor`` column of the solver-overhead benchmark)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from deqlab.solvers import solver_options
from deqlab.solvers.broyden import low_rank_apply


def anderson_products(x: Tensor, iters: int, m: int = 5) -> Callable[[], None]:
    """The products with stored history that ``iters`` Anderson iterations on the flat (B, D)
    state ``x`` make, alone, with the solver's kernels (the Gram row <g_i, g_new> and the
    mixing sum_i alpha_i f_i over the n <= m filled slots): a floor below which no
    implementation of the algorithm goes, for benchmarks (``python -m benchmarks``)."""
    b, d = x.shape
    f_hist = torch.randn(b, m, d, dtype=x.dtype, device=x.device)
    g_hist = torch.randn_like(f_hist)
    alpha = torch.full((b, 1, m), 1.0 / m, dtype=x.dtype, device=x.device)

    def products() -> None:
        for k in range(iters - 1):  # no update after the last evaluation
            n = min(k + 1, m)
            torch.bmm(x.unsqueeze(1), g_hist[:, :n].transpose(1, 2))
            torch.bmm(alpha[:, :, :n], f_hist[:, :n])

    return products


def broyden_products(x: Tensor, iters: int, memory: int = 30) -> Callable[[], None]:
    """The products with stored history that ``iters`` Broyden iterations on the flat (B, D)
    state ``x`` make, alone, with the solver's own kernel (:func:`low_rank_apply`, twice per
    step over the slots in use): a floor below which no implementation of the algorithm goes,
    for benchmarks (``python -m benchmarks``)."""
    b, d = x.shape
    slots = max(1, min(memory, iters - 2))
    us = torch.randn(b, slots, d, dtype=x.dtype, device=x.device)
    vs = torch.randn_like(us)

    def products() -> None:
        for used in range(1, iters - 2):  # step k uses k - 1 slots; none at k = 0, 1
            u, v = us[:, :used], vs[:, :used]
            low_rank_apply(v.transpose(1, 2), u, x)  # B g
            low_rank_apply(u.transpose(1, 2), v, x)  # dz^T B

    return products


def history_products(name: str, z0: Tensor, iters: int) -> Callable[[], None] | None:
    """The products with stored history that ``name`` makes in ``iters`` iterations at its
    default settings, alone, by :func:`anderson_products` or :func:`broyden_products`; ``None`` for
    solvers without history. No implementation of the algorithm goes below f plus these."""
    x = z0.reshape(z0.shape[0], -1)
    defaults = solver_options(name)
    if name == "anderson":
        return anderson_products(x, iters, m=defaults["m"])
    if name == "broyden":
        return broyden_products(x, iters, memory=defaults["memory"])
    return None
