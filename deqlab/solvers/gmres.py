"""Restarted GMRES (Saad and Schultz, 1986) for fixed points of affine maps, batched with one
Krylov space per sample.

The implicit backward pass solves g = J^T g + u: a fixed point of the affine map
f(g) = J^T g + u, i.e. the linear system (I - J^T) g = u. Fixed-point iteration needs the
spectral radius of J below 1; Anderson and Broyden do better but remain iterations on f.
GMRES minimizes the residual over the Krylov space span{r0, M r0, ..., M^(k-1) r0} of
M = I - J^T, so it converges for any invertible I - J^T, in at most dim steps, and usually in
far fewer when the spectrum clusters.

With f affine, f(x) = A x + b, each Arnoldi vector v costs one evaluation, A v = f(x0 + v) -
f(x0), and f at every GMRES iterate x0 + V y is known without another evaluation:
f(x0) + (A V) y. So every f evaluation yields an iterate and its exact residual for the
tracker, and each sample stops on its own tolerance like every deqlab solver. A restart (every
``restart`` steps) re-evaluates f at the iterate, which also checks that f is affine: a map
that is not is reported, since GMRES then solves a different, linearized problem.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import SolveLoop, SolverResult, State


def _least_squares(h: Tensor, beta: Tensor) -> Tensor:
    """argmin_y ||beta e1 - H y|| for each sample (H: (B, j + 1, j)), by QR. A zero pivot (a
    sample whose Krylov space stopped growing: solved, or M singular there) gets the
    coefficient 0 instead of a division by zero, so no sample's numbers blow up."""
    q, r = torch.linalg.qr(h)  # (B, j+1, j), (B, j, j)
    rhs = q[:, 0, :] * beta.unsqueeze(1)  # Q^T (beta e1)
    diag = r.diagonal(dim1=1, dim2=2)
    scale = h.abs().amax(dim=(1, 2)).clamp_min(torch.finfo(h.dtype).tiny).unsqueeze(1)
    degenerate = diag.abs() <= 64 * torch.finfo(h.dtype).eps * scale  # (B, j)
    if bool(degenerate.any()):  # that row reads y_i = 0
        r = r.masked_fill(degenerate.unsqueeze(2), 0.0)
        r = r + torch.diag_embed(degenerate.to(r.dtype))
        rhs = rhs.masked_fill(degenerate, 0.0)
    return torch.linalg.solve_triangular(r, rhs.unsqueeze(2), upper=True).squeeze(2)


def gmres(
    f: Callable[[State], State],
    z0: State,
    *,
    restart: int = 20,
    affine_rtol: float | None = 1e-3,
    **common: Any,
) -> SolverResult:
    """Restarted GMRES on z = f(z) for an affine f (module docstring).

    Args:
        f: an affine map z -> A z + b on states shaped as ``z0`` (the implicit backward's
            g -> J^T g + u; a linear DEQ's forward map).
        z0: the initial state: a tensor, or a tuple/list of tensors sharing the batch dim.
        restart: Krylov vectors kept before a restart (memory: 2 * restart states).
        affine_rtol: at a restart, warn (once) when f at the iterate differs from its affine
            prediction by more than this, relative to ||f||: f is not affine. None: no check.
        **common: the settings every solver shares (:class:`~deqlab.solvers.SolveSpec`):
            ``max_iter`` (f evaluations) and ``tol`` (required), ``stop_mode``, ``save_at``,
            ``return_final``, ``check_every``, ``budgets``.

    Returns:
        A :class:`~deqlab.solvers.SolverResult`: each sample's best iterate and residuals.

    Example:
        >>> A = torch.tensor([[0.0, 2.0], [-2.0, 0.0]])  # spectral radius 2: iteration diverges
        >>> res = gmres(lambda z: z @ A.T + 1.0, torch.zeros(1, 2), max_iter=10, tol=1e-8)
        >>> [round(v, 4) for v in res.z[0].tolist()]  # (I - A) z = 1
        [-0.2, 0.6]
    """
    if restart < 1:
        raise ValueError(f"gmres: the restart length must be >= 1 Krylov vectors, got {restart}")
    run = SolveLoop("gmres", f, z0, common)
    f_flat, track, max_iter = run.f, run.tracker, run.spec.max_iter
    x0 = run.z0
    batch = x0.shape[0]
    tiny = torch.finfo(x0.dtype).tiny
    k, nfe, stop = 0, 0, False
    predicted: Tensor | None = None  # f at the iterate a restart starts from, as predicted
    while not stop:
        f0 = f_flat(x0)
        nfe += 1
        checked = predicted is not None and affine_rtol is not None
        if checked and _not_affine(f0, predicted, affine_rtol):
            affine_rtol = None  # reported once a solve
        stop = track.step(k, x0, f0) or nfe >= max_iter
        k += 1
        if stop:
            break
        r0 = f0 - x0
        beta = torch.linalg.vector_norm(r0, dim=1)
        basis = [r0 / beta.clamp_min(tiny).unsqueeze(1)]  # v_1 .. v_j
        images: list[Tensor] = []  # A v_1 .. A v_j
        h = torch.zeros(batch, restart + 1, restart, dtype=x0.dtype, device=x0.device)
        for j in range(restart):
            av = f_flat(x0 + basis[j]) - f0
            nfe += 1
            images.append(av)
            w = basis[j] - av  # M v_j, M = I - A
            for i, v in enumerate(basis):  # modified Gram-Schmidt, per sample
                h[:, i, j] = (w * v).sum(1)
                w = w - h[:, i, j].unsqueeze(1) * v
            h[:, j + 1, j] = torch.linalg.vector_norm(w, dim=1)
            y = _least_squares(h[:, : j + 2, : j + 1], beta)
            x = x0 + torch.einsum("bj,jbd->bd", y, torch.stack(basis))
            fx = f0 + torch.einsum("bj,jbd->bd", y, torch.stack(images))
            stop = track.step(k, x, fx) or nfe >= max_iter
            k += 1
            if stop:
                break
            norm = h[:, j + 1, j].unsqueeze(1)
            basis.append(torch.where(norm > tiny, w / norm.clamp_min(tiny), torch.zeros_like(w)))
        x0, predicted = x, fx
    return run.result(nfe)


def _not_affine(f_true: Tensor, f_predicted: Tensor, rtol: float) -> bool:
    """Warn, and say so, when f at an iterate is not what an affine f would give there."""
    gap = torch.linalg.vector_norm(f_true - f_predicted, dim=1)
    scale = torch.linalg.vector_norm(f_true, dim=1).clamp_min(1e-12)
    worst = float((gap / scale).max())
    if worst > rtol:
        warnings.warn(
            f"gmres: f at the iterate differs from its affine prediction by {worst:.2g} "
            "(relative): f is not affine, and GMRES solves its linearization, not z = f(z). "
            "Use it for affine maps (grad.solver=gmres, linear cells); for a nonlinear "
            "forward solve use anderson or broyden",
            stacklevel=3,
        )
    return worst > rtol


gmres = torch.no_grad()(gmres)  # the decorator, written out: see fixed_point.py
