"""Damped fixed-point (Picard) iteration: z_{k+1} = tau f(z_k) + (1 - tau) z_k."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import SolveLoop, SolverResult, State


def fixed_point(
    f: Callable[[State], State],
    z0: State,
    *,
    tau: float = 1.0,
    **common: Any,
) -> SolverResult:
    """Iterate z <- tau f(z) + (1 - tau) z from z0 for at most ``max_iter`` f evaluations.

    Args:
        f: the map whose fixed point is sought, on states shaped as ``z0``.
        z0: the initial state: a tensor, or a tuple/list of tensors sharing the batch dim.
        tau: damping in (0, 1]; 1 is the plain iteration z <- f(z).
        **common: the settings every solver shares (:class:`~deqlab.solvers.SolveSpec`):
            ``max_iter`` and ``tol`` (required), ``stop_mode``, ``save_at``,
            ``return_final``, ``check_every``, ``budgets``.

    Returns:
        A :class:`~deqlab.solvers.SolverResult`: each sample's best iterate and residuals.
    """
    if not 0 < tau <= 1:
        raise ValueError(f"fixed_point: damping tau must lie in (0, 1], got {tau}")
    run = SolveLoop("fixed_point", f, z0, common)
    f, track, max_iter = run.f, run.tracker, run.spec.max_iter
    z = run.z0
    for k in range(max_iter):
        fz = f(z)
        if track.step(k, z, fz) or k == max_iter - 1:
            break
        z = fz if tau == 1.0 else torch.lerp(z, fz, tau)
    return run.result(k + 1)


# @torch.no_grad(), written out so that `make mutate` mutates the body (mutmut skips
# decorated functions); `with torch.no_grad():` inside would change what torch.compile traces.
fixed_point = torch.no_grad()(fixed_point)
