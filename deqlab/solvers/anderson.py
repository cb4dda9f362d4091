"""Type-II Anderson acceleration (Walker & Ni, 2011), batched per sample.

With the last n <= m iterates x_i and images f_i = f(x_i), residuals g_i = f_i - x_i, it picks
mixing weights

    alpha = argmin ||sum_i alpha_i g_i||^2 + lam_rel ||alpha||^2   s.t.  sum_i alpha_i = 1,

i.e. alpha = H^-1 1 / (1^T H^-1 1) with H = G G^T + lam_rel I, and steps to

    z_{k+1} = tau sum_i alpha_i f_i + (1 - tau) sum_i alpha_i x_i.

The Gram matrix G G^T is updated one row per step (O(m D)) rather than recomputed (O(m^2 D)).
The Tikhonov term is relative, lam_rel = lam * trace(G G^T) / n, so it keeps its meaning as the
residuals shrink by orders of magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .base import FlatState, SolverResult, State, Tracker, check_common


@torch.no_grad()
def anderson(
    f: Callable[[State], State],
    z0: State,
    *,
    max_iter: int,
    tol: float | None,
    stop_mode: str = "rel",
    save_at: Sequence[int] = (),
    m: int = 5,
    lam: float = 1e-4,
    tau: float = 1.0,
) -> SolverResult:
    """Anderson acceleration with memory ``m``, regularisation ``lam`` and mixing ``tau``."""
    check_common(max_iter, tol, stop_mode)
    if m < 1:
        raise ValueError(f"anderson: memory m must be >= 1, got {m}")
    if not 0 < tau <= 1:
        raise ValueError(f"anderson: mixing tau must lie in (0, 1], got {tau}")
    if lam < 0:
        raise ValueError(f"anderson: regularisation lam must be >= 0, got {lam}")
    state = FlatState(z0)
    g = state.flat_fn(f)
    z = state.flatten(z0)
    batch, dim = z.shape
    dtype, device = z.dtype, z.device
    track = Tracker(z, max_iter, tol, stop_mode, save_at)

    # FG[:, :m] holds the images f_i, FG[:, m:] the residuals g_i; one buffer so that the
    # mixed step is a single batched matmul. Unused slots stay zero and drop out of H.
    fg = torch.zeros(batch, 2 * m, dim, dtype=dtype, device=device)
    f_hist, g_hist = fg[:, :m], fg[:, m:]
    gram = torch.zeros(batch, m, m, dtype=dtype, device=device)
    h = torch.empty_like(gram)
    # Unused slots get an identity row and a zero right-hand side, so their weight solves to
    # exactly zero and every step has the same shapes.
    diag = torch.ones(batch, m, dtype=dtype, device=device)
    rhs = torch.zeros(batch, m, 1, dtype=dtype, device=device)
    coef = torch.zeros(batch, 1, 2 * m, dtype=dtype, device=device)
    mix, hist = (coef, fg) if tau != 1.0 else (coef[:, :, :m], f_hist)
    tiny = torch.finfo(dtype).tiny

    nfe = 0
    for k in range(max_iter):
        fz = g(z)
        nfe += 1
        j, n = k % m, min(k + 1, m)
        diff = torch.sub(fz, z, out=g_hist[:, j])  # the residual goes straight into its slot
        if track.step(k, z, fz, diff) or k == max_iter - 1:
            break
        f_hist[:, j] = fz
        # (B, m): <g_i, g_new>, as a row vector times G^T: a batched gemv in this orientation
        # runs several times faster on CPU than G times a column vector.
        row = torch.bmm(diff.unsqueeze(1), g_hist.transpose(1, 2)).squeeze(1)
        gram[:, j, :] = row
        gram[:, :, j] = row
        rhs[:, n - 1] = 1.0
        diag[:, :n] = lam * gram.diagonal(dim1=1, dim2=2).sum(1, keepdim=True) / n + tiny
        h.copy_(gram).diagonal(dim1=1, dim2=2).add_(diag)
        x = torch.linalg.solve(h, rhs).squeeze(2)
        alpha = x / x.sum(1, keepdim=True)
        coef[:, 0, :m] = alpha
        if tau != 1.0:
            coef[:, 0, m:] = alpha * (tau - 1.0)
        z = torch.bmm(mix, hist).squeeze(1)
    return track.result(state, nfe, "anderson")
