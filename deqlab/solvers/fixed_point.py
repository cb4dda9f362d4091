"""Damped fixed-point (Picard) iteration: z_{k+1} = tau f(z_k) + (1 - tau) z_k."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import FlatState, SolverResult, State, Tracker
from .checks import check_common


def fixed_point(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int,
    tol: float | None,
    stop_mode: str = "rel",
    save_at: Sequence[int] = (),
    return_final: bool = False,
    check_every: int = 1,
    budgets: Sequence[int] = (),
    tau: float = 1.0,
) -> SolverResult:
    """Iterate z <- tau f(z) + (1 - tau) z from z0 for at most ``max_iter`` f evaluations."""
    check_common(max_iter, tol, stop_mode, check_every)
    if not 0 < tau <= 1:
        raise ValueError(f"fixed_point: damping tau must lie in (0, 1], got {tau}")
    state = FlatState(z0)
    f_flat = state.flat_fn(f)
    z = state.flatten(z0)
    track = Tracker(z, max_iter, tol, stop_mode, save_at, return_final, check_every, budgets)
    nfe = 0
    for k in range(max_iter):
        fz = f_flat(z)
        nfe += 1
        if track.step(k, z, fz) or k == max_iter - 1:
            break
        z = fz if tau == 1.0 else torch.lerp(z, fz, tau)
    return track.result(state, nfe, "fixed_point")


# @torch.no_grad(), written out so that `make mutate` mutates the body (mutmut skips
# decorated functions); `with torch.no_grad():` inside would change what torch.compile traces.
fixed_point = torch.no_grad()(fixed_point)
