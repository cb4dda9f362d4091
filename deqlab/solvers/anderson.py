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

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .base import FlatState, SolverResult, State, Tracker, scratch
from .checks import check_common


def history_products(x: Tensor, iters: int, m: int = 5) -> Callable[[], None]:
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


def anderson(
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
    m: int = 5,
    lam: float = 1e-4,
    tau: float = 1.0,
    lam_mode: str = "relative",
) -> SolverResult:
    """Anderson acceleration with memory ``m``, regularisation ``lam`` (``lam_mode``:
    ``relative`` to the residuals' scale, or ``absolute``) and mixing ``tau``."""
    check_common(max_iter, tol, stop_mode, check_every)
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
    state = FlatState(z0)
    f_flat = state.flat_fn(f)
    z = state.flatten(z0)
    batch, dim = z.shape
    dtype, device = z.dtype, z.device
    track = Tracker(z, max_iter, tol, stop_mode, save_at, return_final, check_every, budgets)
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
    return track.result(state, nfe, "anderson")


anderson = torch.no_grad()(anderson)  # the decorator, written out: see fixed_point.py
