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
    for _ in range(vecs):
        v = tuple(torch.randn_like(p) for p in fz_parts)
        vj = torch.autograd.grad(fz_parts, z_parts, v, retain_graph=True, create_graph=True)
        total = total + sum(t.float().pow(2).sum() for t in vj)
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
    gamma: float = 0.8,
) -> Tensor:
    """Weighted mean of ``criterion(state, target)`` over trajectory states.

    Weights for state i of n: ``exp``: gamma^(n-1-i) (later states count more), ``linear``:
    (i+1)/n, ``const``: 1. They are normalized to sum to one.
    """
    n = len(states)
    if n == 0:
        raise ValueError("fp_correction needs at least one state")
    if weight == "exp":
        w = [gamma ** (n - 1 - i) for i in range(n)]
    elif weight == "linear":
        w = [(i + 1) / n for i in range(n)]
    elif weight == "const":
        w = [1.0] * n
    else:
        raise ValueError(f"fp_correction weight must be 'exp', 'linear' or 'const', got {weight!r}")
    total = sum(w)
    return sum(wi / total * criterion(s, target) for wi, s in zip(w, states))
