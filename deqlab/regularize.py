"""Regularizers and diagnostics of the equilibrium.

- Jacobian regularization (Bai, Koltun & Kolter, "Stabilizing Equilibrium Models by Jacobian
  Regularization", ICML 2021): penalise ||J_f(z*)||_F^2, estimated with Hutchinson's
  E_v ||v^T J||^2 = ||J||_F^2 for v ~ N(0, I).
- Spectral radius of J_f(z*) by the power method, per sample: < 1 means the fixed point is
  locally attracting for plain iteration.
- Fixed-point correction (Bai et al., "Deep Equilibrium Optical Flow Estimation", CVPR 2022):
  a weighted loss over states sampled along the solver trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .state import State, as_tuple, leaf


def jacobian_loss(fz: State, z: State, vecs: int = 1) -> Tensor:
    """Hutchinson estimate of ||J_f(z)||_F^2 / dim, averaged over the batch; differentiable.

    ``z`` must require grad and ``fz = f(z)`` must have been recorded from it.
    """
    fz_parts, z_parts = as_tuple(fz), as_tuple(z)
    if not all(p.requires_grad for p in z_parts):
        raise ValueError("jacobian_loss needs z to require grad and fz = f(z) recorded from it")
    total = fz_parts[0].new_zeros(())
    batch = fz_parts[0].shape[0]
    sizes = [p[0].numel() for p in fz_parts]
    for _ in range(vecs):
        # one (batch, dim) draw per probe, split over the parts: the draws of the reference
        # code, which flattens a multi-scale state into one vector first
        flat = torch.randn(batch, sum(sizes), dtype=fz_parts[0].dtype, device=fz_parts[0].device)
        v = tuple(c.reshape(p.shape) for c, p in zip(flat.split(sizes, dim=1), fz_parts))
        vj = torch.autograd.grad(fz_parts, z_parts, v, retain_graph=True, create_graph=True)
        # at least float32 (a bf16 cell's squares overflow), never below the state's precision
        total = total + sum(
            t.to(torch.promote_types(t.dtype, torch.float32)).pow(2).sum() for t in vj
        )
    numel = sum(p.numel() for p in z_parts)
    return total / (vecs * numel)


def spectral_radius(f: Callable[[State], State], z: State, iters: int = 20) -> Tensor:
    """Power-method estimate of the spectral radius of J_f(z), per sample, shape (B,).

    Iterates v <- J^T v / ||J^T v|| (J^T has the spectrum of J) and returns ||J^T v||.
    """
    zz = leaf(z, True)
    z_parts = as_tuple(zz)
    batch = z_parts[0].shape[0]
    with torch.enable_grad():
        fz_parts = as_tuple(f(zz))
    v = [torch.randn_like(p) for p in z_parts]
    radius = z_parts[0].new_zeros(batch)

    def norm(vs: Sequence[Tensor]) -> Tensor:
        return torch.sqrt(sum(t.reshape(batch, -1).pow(2).sum(1) for t in vs))

    for _ in range(iters):
        n = norm(v).clamp_min(torch.finfo(radius.dtype).tiny)
        v = [t / n.view(-1, *[1] * (t.dim() - 1)) for t in v]
        v = list(torch.autograd.grad(fz_parts, z_parts, v, retain_graph=True))
        radius = norm(v)
    return radius.detach()


def fp_correction(
    criterion: Callable[[State, Tensor], Tensor],
    states: Sequence[State],
    target: Tensor,
    weight: str = "exp",
    gamma: float | None = None,
    bias: float = 0.0,
    normalize: bool = False,
) -> Tensor:
    """Weighted sum of ``criterion(state, target)`` over trajectory states, as TorchDEQ's
    ``fp_correction`` weighs them (Bai et al., 2022; Geng & Kolter, 2023).

    Weights w_i for state i of n (the last, i = n - 1, is the equilibrium): ``exp``:
    gamma^(n-1-i), gamma 0.8 by default; ``linear``: 1 - (n-1-i)/n * gamma + bias, gamma 0.9 by
    default; ``const``: 1. The loss is sum_i w_i L_i, or with ``normalize`` the weighted mean
    sum_i w_i L_i / sum_i w_i (deqlab's earlier convention, which keeps the loss on the
    criterion's scale whatever n is).
    """
    n = len(states)
    if n == 0:
        raise ValueError("fp_correction needs at least one state")
    if weight == "exp":
        g = 0.8 if gamma is None else gamma
        w = [g ** (n - 1 - i) for i in range(n)]
    elif weight == "linear":
        g = 0.9 if gamma is None else gamma
        w = [1 - (n - 1 - i) / n * g + bias for i in range(n)]
    elif weight == "const":
        w = [1.0] * n
    else:
        raise ValueError(f"fp_correction weight must be 'exp', 'linear' or 'const', got {weight!r}")
    total = sum(w) if normalize else 1.0
    return sum(wi / total * criterion(s, target) for wi, s in zip(w, states))
