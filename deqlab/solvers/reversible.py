"""The reversible fixed-point iteration of McCallum, Arora & Foster (2025), "Reversible Deep
Equilibrium Models" (arXiv 2509.12917): two coupled states, y_0 = z_0, and

    y_{n+1} = (1 - beta) y_n + beta f(z_n)
    z_{n+1} = (1 - beta) z_n + beta f(y_{n+1})

with relaxation beta in (0, 2), beta != 1. Each step inverts algebraically,

    z_n = (z_{n+1} - beta f(y_{n+1})) / (1 - beta),   y_n = (y_{n+1} - beta f(z_n)) / (1 - beta),

so backpropagation can run the iteration backwards instead of storing it: the gradient of the
returned iterate is exact, in memory that does not grow with the step count
(``grad=reversible``, :mod:`deqlab.reversible_grad`). As a solver on its own it is a relaxed
fixed-point iteration with any gradient mode.

Step k of the tracker tests z_k, so ``max_iter`` = k tests at most k - 1 reversible steps,
and ``nfe`` = 2 (k - 1) + 1: two evaluations per step and one for the residual of z_k. The
returned state is each sample's best (or, ``return_final``, last) z_k; ``aux["y"]`` holds its
partner y_k and ``aux["beta"]`` the relaxation, which is what the reverse pass starts from.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import SolveLoop, SolverResult, State


def check_beta(beta: float) -> None:
    if not (0 < beta < 2 and beta != 1):
        raise ValueError(
            f"reversible: beta must lie in (0, 2) and differ from 1 (each step divides by "
            f"1 - beta), got {beta}"
        )


def reversible(
    f: Callable[[State], State],
    z0: State,
    *,
    beta: float = 0.5,
    **common: Any,
) -> SolverResult:
    """The coupled iteration above from y_0 = z_0, testing z_k at each step.

    Args:
        f: the map whose fixed point is sought, on states shaped as ``z0``.
        z0: the initial state: a tensor, or a tuple/list of tensors sharing the batch dim.
        beta: relaxation in (0, 2), not 1.
        **common: the settings every solver shares (:class:`~deqlab.solvers.SolveSpec`):
            ``max_iter`` and ``tol`` (required), ``stop_mode``, ``save_at``,
            ``return_final``, ``check_every``, ``budgets``.

    Returns:
        A :class:`~deqlab.solvers.SolverResult` whose ``aux`` holds the partner iterate ``y``
        of each returned z (what :mod:`deqlab.reversible_grad` inverts) and ``beta``.
    """
    check_beta(beta)
    run = SolveLoop("reversible", f, z0, common)
    f_flat, track, max_iter = run.f, run.tracker, run.spec.max_iter
    state = run.state
    z = run.z0
    y = y_kept = z
    fz = f_flat(z)
    nfe = 1
    for k in range(max_iter):
        stop = track.step(k, z, fz, nfe=nfe)
        # y_k of the samples whose returned iterate is now z_k
        y_kept = torch.where(track.improved[k].unsqueeze(1), y, y_kept)
        if stop or k == max_iter - 1:
            break
        y = torch.lerp(y, fz, beta)
        z = torch.lerp(z, f_flat(y), beta)
        fz = f_flat(z)
        nfe += 2
    res = run.result(nfe)
    res.aux.update(y=state.unflatten(y_kept), beta=beta)
    return res


reversible = torch.no_grad()(reversible)  # the decorator, written out: see fixed_point.py
