"""Jacobian-free Newton-Krylov (Knoll and Keyes, J. Comput. Phys. 2004) for z = f(z).

Newton's method on g(z) = f(z) - z steps by d solving (I - J) d = f(z) - z, J the Jacobian of
f at z. The system is solved inexactly by GMRES (:mod:`deqlab.solvers.gmres`, one Krylov
space per sample) to ``inner_tol`` relative to the residual, using Jacobian-vector products
only: forward-mode autodiff (``jvp="autograd"``, exact) or a finite difference
(``jvp="fd"``, one f evaluation, for cells forward mode cannot run). A backtracking line
search on ||g|| (Armijo) keeps each sample's step where its residual decreases. Where it
only accepts a short step (below 1/4: far from the solution, or at a kink of a ReLU cell,
where the linearization is poor), the fixed-point step z <- f(z) is tried too, and the
better of the two is kept. Near the solution the convergence is superlinear, and it does not
need f to be a contraction: it settles where fixed-point iteration does not (a cell
tanh(W z + x) with ||W|| = 2).

Cost accounting: ``nfe`` counts every f evaluation, a Jacobian-vector product as one (it
evaluates f once, with a tangent); ``max_iter`` bounds the Newton steps, each one reported to
the tracker with its exact residual.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import SolveLoop, SolverResult, State
from .gmres import gmres

JVPS = ("autograd", "fd")


def _jacobian_product(
    f: Callable[[Tensor], Tensor], z: Tensor, fz: Tensor, how: str
) -> Callable[[Tensor], Tensor]:
    """v -> J v at z (J = df/dz), by forward-mode autodiff or a finite difference."""
    if how == "autograd":

        def jvp(v: Tensor) -> Tensor:
            with torch.enable_grad():
                return torch.func.jvp(f, (z,), (v,))[1]

        return jvp
    eps_machine = math.sqrt(torch.finfo(z.dtype).eps)
    z_norm = torch.linalg.vector_norm(z, dim=1, keepdim=True)

    def difference(v: Tensor) -> Tensor:
        v_norm = torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(1e-30)
        eps = eps_machine * (1 + z_norm) / v_norm  # per sample: the step ||eps v|| ~ sqrt(u)
        return (f(z + eps * v) - fz) / eps

    return difference


def newton_krylov(
    f: Callable[[State], State],
    z0: State,
    *,
    inner_iters: int = 20,
    inner_tol: float = 1e-2,
    jvp: str = "autograd",
    line_search: bool = True,
    min_step: float = 1.0 / 64,
    warmup: int = 0,
    **common: Any,
) -> SolverResult:
    """Jacobian-free Newton-Krylov with a backtracking line search (module docstring).

    Args:
        f: the map whose fixed point is sought, on states shaped as ``z0``; differentiable
            (forward mode for ``jvp="autograd"``).
        z0: the initial state: a tensor, or a tuple/list of tensors sharing the batch dim.
        inner_iters: GMRES steps per Newton step (Krylov vectors; no restart).
        inner_tol: GMRES stops at a residual of ``inner_tol`` times the Newton residual.
        jvp: ``autograd`` (forward-mode, exact) or ``fd`` (finite difference).
        line_search: halve each sample's step until its residual decreases (Armijo), down to
            ``min_step``; False: always the full Newton step.
        min_step: the smallest step fraction tried before a sample keeps its iterate (and
            the solve warns that the line search could not decrease its residual).
        warmup: fixed-point steps before the first Newton step. Newton's method from far
            away can stall at a point where ||f(z) - z|| has a local minimum (measured: half
            the samples of the tutorial's ReLU cell from z = 0); a contractive cell's first
            fixed-point steps bring it where Newton converges fast.
        **common: the settings every solver shares (:class:`~deqlab.solvers.SolveSpec`):
            ``max_iter`` (Newton steps) and ``tol`` (required), ``stop_mode``, ``save_at``,
            ``return_final``, ``check_every``, ``budgets``.

    Returns:
        A :class:`~deqlab.solvers.SolverResult`: each sample's best iterate and residuals.

    Example:
        >>> W = torch.tensor([[0.0, 2.0], [-2.0, 0.0]])  # ||W|| = 2: iteration cycles
        >>> res = newton_krylov(
        ...     lambda z: torch.tanh(z @ W.T + 0.5), torch.zeros(1, 2), max_iter=30, tol=1e-8
        ... )
        >>> bool(res.converged.all())
        True
    """
    if inner_iters < 1:
        raise ValueError(f"newton_krylov: inner_iters must be >= 1 GMRES steps, got {inner_iters}")
    if not 0 < inner_tol < 1:
        raise ValueError(f"newton_krylov: inner_tol must lie in (0, 1), got {inner_tol}")
    if jvp not in JVPS:
        raise ValueError(f"newton_krylov: jvp must be one of {JVPS}, got {jvp!r}")
    if not 0 < min_step <= 1:
        raise ValueError(f"newton_krylov: min_step must lie in (0, 1], got {min_step}")
    if warmup < 0:
        raise ValueError(f"newton_krylov: warmup must be >= 0 fixed-point steps, got {warmup}")
    run = SolveLoop("newton_krylov", f, z0, common)
    f_flat, track, max_iter = run.f, run.tracker, run.spec.max_iter
    z = run.z0
    fz = f_flat(z)
    nfe, stalled = 1, 0
    for k in range(max_iter):
        if track.step(k, z, fz, nfe=nfe) or k == max_iter - 1:
            break
        if k < warmup:
            z, fz = fz, f_flat(fz)
            nfe += 1
            continue
        r = fz - z
        scale = torch.linalg.vector_norm(r, dim=1, keepdim=True).clamp_min(1e-30)
        jv = _jacobian_product(f_flat, z, fz, jvp)
        r_unit = r / scale  # GMRES to an absolute inner_tol on the unit residual
        inner = gmres(
            lambda d, jv=jv, r_unit=r_unit: jv(d) + r_unit,
            torch.zeros_like(z),
            max_iter=inner_iters + 1,
            tol=inner_tol,
            stop_mode="abs",
            restart=inner_iters,
            affine_rtol=None,
        )
        nfe += inner.nfe
        step = inner.z * scale
        z, fz, failed, spent = _line_search(f_flat, z, fz, step, line_search, min_step)
        nfe += spent
        stalled += failed
    if stalled:
        warnings.warn(
            f"newton_krylov: the line search could not decrease the residual {stalled} time(s) "
            "(a sample kept its iterate): the Newton direction is poor there. Raise "
            "solver.inner_iters or lower solver.inner_tol, or use anderson or broyden",
            stacklevel=2,
        )
    return run.result(nfe)


def _line_search(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    fz: Tensor,
    step: Tensor,
    enabled: bool,
    min_step: float,
) -> tuple[Tensor, Tensor, int, int]:
    """Each sample's largest step fraction in 1, 1/2, ... (>= min_step) whose residual is
    below (1 - 1e-4 alpha) of the current one; where that fraction is below 1/4 or none is
    found, the fixed-point step to f(z) if its residual is lower; samples with neither keep z.
    Returns the new (z, f(z)), how many samples found no decrease, and the f evaluations
    spent."""
    base = torch.linalg.vector_norm(fz - z, dim=1)
    alpha = torch.ones(z.shape[0], 1, dtype=z.dtype, device=z.device)
    done = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    new_z, new_fz, spent = z, fz, 0
    while True:
        trial = z + alpha * step
        f_trial = f(trial)
        spent += 1
        res = torch.linalg.vector_norm(f_trial - trial, dim=1)
        ok = ~done & torch.isfinite(res)
        if enabled:
            ok &= res <= (1 - 1e-4 * alpha.squeeze(1)) * base
        new_z = torch.where(ok.unsqueeze(1), trial, new_z)
        new_fz = torch.where(ok.unsqueeze(1), f_trial, new_fz)
        done |= ok
        if bool(done.all()) or not enabled or float(alpha[~done].max()) / 2 < min_step:
            break
        alpha = torch.where(done.unsqueeze(1), alpha, alpha / 2)
    weak = (~done | (alpha.squeeze(1) < 0.25)) if enabled else torch.zeros_like(done)
    if bool(weak.any()):  # the fixed-point step, from the f(z) already at hand
        f_picard = f(fz)
        spent += 1
        res_picard = torch.linalg.vector_norm(f_picard - fz, dim=1)
        res_new = torch.linalg.vector_norm(new_fz - new_z, dim=1)
        take = weak & torch.isfinite(res_picard) & (res_picard < torch.where(done, res_new, base))
        new_z = torch.where(take.unsqueeze(1), fz, new_z)
        new_fz = torch.where(take.unsqueeze(1), f_picard, new_fz)
        done |= take
    return new_z, new_fz, int((~done).sum()), spent


newton_krylov = torch.no_grad()(newton_krylov)  # the decorator, written out: see fixed_point.py
