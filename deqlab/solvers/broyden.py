"""Limited-memory good Broyden on g(z) = f(z) - z, batched per sample.

The inverse Jacobian of g is approximated as B = -I + sum_i u_i v_i^T (Broyden, 1965; as in
the DEQ code of Bai et al., 2019). Each step z_{k+1} = z_k - B g_k, then the good-Broyden
(Sherman-Morrison) update with dz = z_{k+1} - z_k and dg = g_{k+1} - g_k:

    v^T = dz^T B,    u = (dz - B dg) / (dz^T B dg).

Since B itself made the step dz = -B g_k, B dg = B g_{k+1} + dz and the update needs no new
vector: u = -B g_{k+1} / (dz^T B dg) (except right after a restart). Storage is ``memory``
(u, v) slots, O(memory * D) whatever ``max_iter`` is, and each step costs two products with B
over the slots in use. When every slot is used the estimate
restarts from B = -I. (Overwriting only the oldest
slot, as the reference implementations do, leaves the remaining u_i inconsistent: each was
derived from a B that contained the dropped term. On long solves that diverges; see
``tests/test_solvers.py::test_long_solve_with_small_memory``.) An update whose denominator is
numerically zero (relative to ||dz^T B|| ||dg||) or non-finite, or whose dg is at the rounding
level of the residuals (16 eps ||f(z)||, where the references' updates blow up), is skipped for
that sample.

``ls=True`` searches along each step (Armijo backtracking on phi(s) = ||g(z + s d)||^2, each
sample its own step size; see :func:`armijo_step`), as TorchDEQ's ``ls`` and the DEQ code's
Broyden do, where the full step overshoots.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .base import SolveLoop, SolverResult, State, scratch, set_rows_


def low_rank_apply(left_t: Tensor, right: Tensor, x: Tensor) -> Tensor:
    """-x + sum_i (x . left_i) right_i, batched, with ``left_t`` the (B, D, n) transposed slots.
    Both products are row vectors times a slot matrix: a batched gemv in that orientation runs
    several times faster on CPU."""
    if right.shape[1] == 0:
        return -x
    row = x.unsqueeze(1)  # (B, 1, D)
    coeff = torch.bmm(row, left_t)  # (B, 1, n)
    return torch.baddbmm(row, coeff, right, alpha=1.0, beta=-1.0).squeeze(1)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample a . b as (B, 1), by the fast batched-gemv orientation, without a temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(1).transpose(1, 2)).squeeze(2)


def armijo_step(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    gz: Tensor,
    d: Tensor,
    c1: float = 1e-4,
    min_step: float = 1e-2,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """z + s d with, per sample, the first step size s that satisfies Armijo's condition on
    phi(s) = ||g(z + s d)||^2, g(z) = f(z) - z:

        phi(s) <= phi(0) (1 - c1 s)      (phi'(0) = -phi(0), as TorchDEQ and scipy assume)

    trying s = 1, then the minimiser of the quadratic through phi(0), phi'(0) and the last
    phi(s), kept within [0.1 s, 0.5 s] (Nocedal & Wright, 2006, section 3.5). A sample
    whose s falls below ``min_step`` without success takes the full step, as the references'
    search does. Returns the new iterates, f at them, the step sizes (B, 1) and the number of
    f evaluations (at most 8, one when every full step is accepted)."""
    phi0 = gz.square().sum(1, keepdim=True)
    z_new = z + d
    fz_new = f(z_new)
    phi = (fz_new - z_new).square().sum(1, keepdim=True)
    s = torch.ones_like(phi0)
    done = phi <= phi0 * (1 - c1)  # NaN compares False: a non-finite trial is refused
    evals = 1
    trying = ~done
    while True:
        # the quadratic's minimiser, phi0 s^2 / (2 (phi(s) - phi0 + phi0 s)), safeguarded
        quad = phi0 * s * s / (2 * (phi - phi0 + phi0 * s))
        quad = torch.where(torch.isfinite(quad), quad, 0.5 * s)
        s = torch.where(trying, torch.minimum(torch.maximum(quad, 0.1 * s), 0.5 * s), s)
        trying.logical_and_(s >= min_step)
        if not bool(trying.any()):  # the one host read per trial
            break
        z_try = z + s * d
        fz_try = f(z_try)
        evals += 1
        phi = (fz_try - z_try).square().sum(1, keepdim=True)
        ok = (phi <= phi0 * (1 - c1 * s)).logical_and_(trying)
        z_new = torch.where(ok, z_try, z_new)
        fz_new = torch.where(ok, fz_try, fz_new)
        done.logical_or_(ok)
        trying.logical_and_(~ok)
    return z_new, fz_new, torch.where(done, s, 1.0), evals


def broyden(
    f: Callable[[State], State],
    z0: State,
    *,
    memory: int = 30,
    ls: bool = False,
    keep_inverse: bool = False,
    **common: Any,
) -> SolverResult:
    """Good Broyden with the ``memory`` most recent rank-one updates (module docstring).

    Args:
        f: the map whose fixed point is sought, on states shaped as ``z0``.
        z0: the initial state: a tensor, or a tuple/list of tensors sharing the batch dim.
        memory: rank-one updates kept; when all are used the inverse Jacobian estimate
            restarts from -I.
        ls: an Armijo line search along each step (:func:`armijo_step`); ``max_iter`` then
            counts steps and ``nfe`` the f evaluations.
        keep_inverse: return the final inverse-Jacobian estimate B = -I + sum_i u_i v_i^T as
            ``aux["inverse_jacobian"] = (u, v)``, each (B, n, D) on the flat state (what
            ``grad=shine`` reads: it sets this itself).
        **common: the settings every solver shares (:class:`~deqlab.solvers.SolveSpec`):
            ``max_iter`` and ``tol`` (required), ``stop_mode``, ``save_at``,
            ``return_final``, ``check_every``, ``budgets``.

    Returns:
        A :class:`~deqlab.solvers.SolverResult`: each sample's best iterate and residuals.
    """
    if memory < 1:
        raise ValueError(f"broyden: memory must be >= 1, got {memory}")
    if ls and common.get("check_every", 1) != 1:
        raise ValueError(
            "broyden: ls reads its Armijo test back at every trial, so it cannot defer its "
            "convergence tests: set check_every=1 (and capture=false) or ls=false"
        )
    run = SolveLoop("broyden", f, z0, common)
    f_flat, track, max_iter = run.f, run.tracker, run.spec.max_iter
    z = run.z0
    batch, dim = z.shape
    dtype, device = z.dtype, z.device
    eps = torch.finfo(dtype).eps
    compiling = torch.compiler.is_compiling()  # Dynamo cannot trace out= into a view
    # At most max_iter - 2 updates happen (none after the first and the last evaluation).
    slots = max(1, min(memory, max_iter - 2))

    nfe = 0
    used = 0  # slots holding updates since the last (re)start from B = -I
    step = g_prev = None
    direction = fz = None  # with ls: -B g of the last step (step = s * direction), f(z)
    # Only the first ``used`` slots are ever read, so the buffer needs no zeroing.
    with scratch((batch, 2 * slots, dim), dtype, device) as uv:
        us, vs = uv[:, :slots], uv[:, slots:]
        # Views made once (indexing is itself an operation, as costly as arithmetic on cheap
        # cells): per slot, and per number n of slots in use (u, v, u^T, v^T).
        u_slot, v_slot = us.unbind(1), vs.unbind(1)
        in_use = [
            (us[:, :n], vs[:, :n], us[:, :n].transpose(1, 2), vs[:, :n].transpose(1, 2))
            for n in range(slots + 1)
        ]
        for k in range(max_iter):
            if fz is None:  # (a line search evaluated f at the new iterate already)
                fz = f_flat(z)
                nfe += 1
            gz = fz - z
            if track.step(k, z, fz, gz, nfe) or k == max_iter - 1:
                break
            restarted = used == memory
            if restarted:  # all slots used: start again from B = -I
                used = 0
            u_used, v_used, u_used_t, v_used_t = in_use[used]
            bg = low_rank_apply(v_used_t, u_used, gz)  # B g_k = -g_k + sum_i u_i (v_i . g_k)
            if step is None:  # the first step, with B = -I
                step = bg.neg_()
            else:
                u, v = u_slot[used], v_slot[used]
                dg = gz - g_prev
                v.copy_(low_rank_apply(u_used_t, v_used, step))  # v^T = dz^T B
                den = _dot(v, dg)
                dg_norm = torch.linalg.vector_norm(dg, dim=1, keepdim=True)
                scale = torch.linalg.vector_norm(v, dim=1, keepdim=True) * dg_norm
                # Usable: |den| above rounding level and finite (NaN fails both comparisons),
                # and dg resolved above the rounding error of the residuals themselves
                # (~eps ||f||): a residual that merely stagnates carries no secant information.
                den_abs = den.abs()
                ok = (den_abs > scale.mul_(eps)).logical_and_(den_abs < float("inf"))
                ok.logical_and_(dg_norm > track.fz_norm.unsqueeze(1) * (16 * eps))
                inv_den = torch.where(ok, den.reciprocal(), 0.0)
                # u = (dz - B dg) / den with B dg = B g_k - B g_{k-1}. When B made the last
                # step, B g_{k-1} = -dz and u = -B g_k / den: no new vector to form. After a
                # restart B = -I, so B g_{k-1} = -g_{k-1}.
                if restarted:
                    numerator, factor = step - bg - g_prev, inv_den
                elif ls:  # the step was s * direction: B g_{k-1} = -direction
                    numerator, factor = step - bg - direction, inv_den
                else:
                    numerator, factor = bg, -inv_den
                if compiling:
                    u.copy_(numerator * factor)
                else:
                    torch.mul(numerator, factor, out=u)
                set_rows_(v, ~ok.squeeze(1), 0.0, track.on_cpu)  # skipped: u = v = 0
                used += 1
                # The step -B_new g_k with B_new g_k = B g_k + u (v . g_k); without a restart
                # u is parallel to B g_k and that is a rescale.
                vg = _dot(v, gz)
                if restarted or ls:
                    step = torch.addcmul(bg, u, vg).neg_()
                else:
                    step = bg * (vg * inv_den - 1.0)
            if ls:
                direction = step
                z, fz, size, evals = armijo_step(f_flat, z, gz, direction)
                step = direction * size
                nfe += evals
            else:
                z = z + step
                fz = None
            g_prev = gz
        factors = (us[:, :used].clone(), vs[:, :used].clone()) if keep_inverse else None
    res = run.result(nfe)
    if factors is not None:
        res.aux["inverse_jacobian"] = factors
    return res


broyden = torch.no_grad()(broyden)  # the decorator, written out: see fixed_point.py
