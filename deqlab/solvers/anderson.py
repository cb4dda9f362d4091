"""Type-II Anderson acceleration (Walker & Ni, 2011), batched per sample.

With the last n <= m iterates x_i and images f_i = f(x_i), residuals g_i = f_i - x_i, it picks
mixing weights

    alpha = argmin ||sum_i alpha_i g_i||^2 + lam_rel ||alpha||^2   s.t.  sum_i alpha_i = 1,

i.e. alpha = H^-1 1 / (1^T H^-1 1) with H = G G^T + lam_rel I, and steps to

    z_{k+1} = tau sum_i alpha_i f_i + (1 - tau) sum_i alpha_i x_i,

except the first step, which is the plain z_1 = f(z_0), as in the implicit-layers tutorial,
the DEQ reference code and TorchDEQ (their two plain starting iterations).

tau < 1 damps the step; tau > 1 over-projects it (the implicit-layers tutorial's beta > 1),
which puts a negative weight on the past iterates and can converge faster.

The Gram matrix G G^T is updated one row per step (O(m D)) rather than recomputed (O(m^2 D)).
The Tikhonov term is relative by default, lam_rel = lam * trace(G G^T) / n, so it keeps its
meaning as the residuals shrink by orders of magnitude; ``lam_mode="absolute"`` adds lam itself,
as the implicit-layers tutorial and the DEQ reference code (locuslab/deq, lib/solvers.py) do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .base import SolveLoop, SolverResult, State, scratch


def anderson(
    f: Callable[[State], State],
    z0: State,
    *,
    m: int = 5,
    lam: float = 1e-4,
    tau: float = 1.0,
    lam_mode: str = "relative",
    **common: Any,
) -> SolverResult:
    """Anderson acceleration (module docstring).

    Args:
        f: the map whose fixed point is sought, on states shaped as ``z0``.
        z0: the initial state: a tensor, or a tuple/list of tensors sharing the batch dim.
        m: memory, the number of past iterates mixed.
        lam: Tikhonov regularisation of the mixing least-squares problem.
        tau: mixing; < 1 damps the step, > 1 over-projects it.
        lam_mode: ``relative`` (lam scaled by the residuals' size) or ``absolute``.
        **common: the settings every solver shares (:class:`~deqlab.solvers.SolveSpec`):
            ``max_iter`` and ``tol`` (required), ``stop_mode``, ``save_at``,
            ``return_final``, ``check_every``, ``budgets``.

    Returns:
        A :class:`~deqlab.solvers.SolverResult`: each sample's best iterate and residuals.

    Example:
        >>> W = 0.5 * torch.eye(4)
        >>> res = anderson(lambda z: z @ W + 1.0, torch.zeros(2, 4), max_iter=20, tol=1e-6)
        >>> bool(res.converged.all()), round(res.z[0, 0].item(), 4)
        (True, 2.0)
    """
    if m < 1:
        raise ValueError(f"anderson: memory m must be >= 1, got {m}")
    if not tau > 0:
        raise ValueError(
            f"anderson: mixing tau must be > 0 (< 1 damps, > 1 over-projects), got {tau}"
        )
    if lam < 0:
        raise ValueError(f"anderson: regularisation lam must be >= 0, got {lam}")
    if lam_mode not in ("relative", "absolute"):
        raise ValueError(f"anderson: lam_mode must be relative or absolute, got {lam_mode!r}")
    relative = lam_mode == "relative"
    run = SolveLoop("anderson", f, z0, common)
    f_flat, track, max_iter = run.f, run.tracker, run.spec.max_iter
    z = run.z0
    batch, dim = z.shape
    dtype, device = z.dtype, z.device
    gram = torch.empty(batch, m, m, dtype=dtype, device=device)
    ones = torch.ones(batch, m, 1, dtype=dtype, device=device)
    tiny = torch.finfo(dtype).tiny
    compiling = torch.compiler.is_compiling()

    nfe = 0
    # Slot j of the history holds f_i (first m rows) and g_i (last m rows). The first m steps
    # use the n < m filled slots only: shapes depend on k alone, never on data, so a CUDA
    # graph of a fixed-iteration solve replays them, and unused slots need no zeroing.
    with scratch((batch, 2 * m, dim), dtype, device) as fg:
        f_hist, g_hist = fg[:, :m], fg[:, m:]
        # Every view the loop needs, made once: on cheap cells each indexing operation costs
        # about as much as the arithmetic. Index n - 1 holds the view for n filled slots.
        f_slot, g_slot = f_hist.unbind(1), g_hist.unbind(1)
        gram_row, gram_col = gram.unbind(1), gram.unbind(2)
        filled = [
            (f_hist[:, :n], g_hist[:, :n].transpose(1, 2), gram[:, :n, :n], ones[:, :n])
            for n in range(1, m + 1)
        ]
        for k in range(max_iter):
            fz = f_flat(z)
            nfe += 1
            j, n = k % m, min(k + 1, m)
            # The residual goes straight into its slot (Dynamo cannot trace out= into a view).
            diff = g_slot[j].copy_(fz - z) if compiling else torch.sub(fz, z, out=g_slot[j])
            if track.step(k, z, fz, diff) or k == max_iter - 1:
                break
            f_slot[j].copy_(fz)
            f_n, g_n_t, gram_n, ones_n = filled[n - 1]
            # <g_i, g_new> as a row vector times G^T: a batched gemv in this orientation runs
            # several times faster on CPU than G times a column vector.
            row = torch.bmm(diff.unsqueeze(1), g_n_t).squeeze(1)
            gram_row[j][:, :n] = row
            gram_col[j][:, :n] = row
            h = gram_n.clone()
            h_diag = h.diagonal(dim1=1, dim2=2)
            if relative:
                h_diag.add_(h_diag.sum(1, keepdim=True), alpha=lam / n).add_(tiny)
            else:
                h_diag.add_(lam + tiny)
            x = torch.linalg.solve_ex(h, ones_n)[0]  # H is SPD: no error check (a sync)
            alpha = (x / x.sum(1, keepdim=True)).transpose(1, 2)  # (B, 1, n)
            z = torch.bmm(alpha, f_n)
            if tau != 1.0 and k > 0:  # tau sum a_i f_i + (1 - tau) sum a_i x_i, x_i = f_i - g_i
                z = torch.baddbmm(z, alpha, g_n_t.transpose(1, 2), alpha=tau - 1.0)
            z = z.squeeze(1)
    return run.result(nfe)


anderson = torch.no_grad()(anderson)  # the decorator, written out: see fixed_point.py
