"""The argument and result checks every solver shares, with the stop modes they accept."""

from __future__ import annotations

import torch
from torch import Tensor

# When a solve stops, and which iterate it returns. Per sample (abs, rel): each sample stops, and
# is frozen, once its own residual ||f(z) - z|| (rel: divided by ||f(z)||) is below tol; the batch
# stops when every sample has; each sample returns its own best iterate. Per batch (batch_abs,
# batch_rel): the batch is one system, as in the implicit-layers tutorial and the DEQ reference
# code: the norm is taken over the whole batch, the batch stops once it is below tol even if a few
# samples are not, and the solve returns the iterate at which the whole batch's residual was lowest.
# Per sample suits evaluation (each prediction is what solving that sample alone gives); per batch
# trades a few unconverged samples for not waiting on the slowest one.
STOP_MODES = ("abs", "rel", "batch_abs", "batch_rel")


def check_common(max_iter: int, tol: float | None, stop_mode: str, check_every: int = 1) -> None:
    if stop_mode not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {stop_mode!r}")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if tol is not None and not tol >= 0:
        raise ValueError(f"tol must be >= 0 (or None for a fixed iteration count), got {tol!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(
            f"check_every must be a positive int (steps between convergence tests), got "
            f"{check_every!r}"
        )


def check_finite_start(best_residual: Tensor, solver: str) -> None:
    """Raise if some sample's best residual is non-finite: f was non-finite from z0 on."""
    if not bool(torch.isfinite(best_residual).all()):
        bad = (~torch.isfinite(best_residual)).nonzero().flatten()
        first = ", ".join(str(i) for i in bad[:5].tolist())
        more = ", ..." if len(bad) > 5 else ""
        raise FloatingPointError(
            f"{solver}: f returned non-finite values for {len(bad)} of {len(best_residual)} "
            f"samples (indices {first}{more}) at every iterate, "
            "starting from z0; check the input injection and the cell's weights (a "
            "learning rate too high, or missing weight/spectral normalization)."
        )
