"""Gradient modes: how the loss gradient reaches f's parameters and inputs through z*.

All modes start from the same pair: z (z* detached, as a fresh leaf) and fz = f(z), the one
f evaluation recorded on the autograd tape.

- ``ift``: exact implicit gradient (Bai et al., 2019). With u = dL/dz*, the backward pass
  solves the linear fixed point g = J_f(z*)^T g + u with a root solver, using vector-Jacobian
  products of the recorded fz, then sends g through fz to the parameters and inputs. The
  returned value is z* itself, so the forward statistics describe exactly what is returned.
- ``phantom``: k damped unrolled steps z <- tau f(z) + (1 - tau) z from z*, differentiated by
  ordinary backprop through those k steps only (Geng et al., 2021). Returns the k-th step.
- ``onestep``: Jacobian-free backprop, one step of f at z* (Fung et al., 2022). Returns f(z*).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .solvers import STOP_MODES, SolverResult, State, get_solver

GRAD_MODES = ("ift", "phantom", "onestep")


class DivergenceWarning(UserWarning):
    """A solve met non-finite iterates; the best finite iterate was used instead."""


@dataclass
class GradConfig:
    """Gradient mode settings (the ``grad`` config group).

    ``solver``, ``max_iter``, ``tol`` and ``stop_mode`` configure the ``ift`` backward solve;
    ``steps`` and ``tau`` configure ``phantom``.
    """

    name: str = "ift"
    solver: str = "anderson"
    max_iter: int = 30
    tol: float = 1e-4
    stop_mode: str = "rel"
    steps: int = 5
    tau: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in GRAD_MODES:
            raise ValueError(f"unknown gradient mode {self.name!r}; choose one of {GRAD_MODES}")
        get_solver(self.solver)  # raises with the list of known solvers
        if self.stop_mode not in STOP_MODES:
            raise ValueError(f"grad.stop_mode must be one of {STOP_MODES}, got {self.stop_mode!r}")
        if self.max_iter < 1 or self.steps < 1:
            raise ValueError("grad.max_iter and grad.steps must be >= 1")
        if not self.tol > 0:
            raise ValueError(f"grad.tol must be > 0, got {self.tol}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"grad.tau must lie in (0, 1], got {self.tau}")


def as_tuple(z: State) -> tuple[Tensor, ...]:
    return (z,) if isinstance(z, Tensor) else tuple(z)


def like(template: State, parts: tuple[Tensor, ...] | list[Tensor]) -> State:
    """``parts`` in the structure of ``template`` (a tensor or a tuple)."""
    return parts[0] if isinstance(template, Tensor) else tuple(parts)


def leaf(z: State, requires_grad: bool) -> State:
    return like(z, [p.detach().requires_grad_(requires_grad) for p in as_tuple(z)])


def mix(z: State, fz: State, tau: float) -> State:
    """tau fz + (1 - tau) z on states of any structure."""
    if tau == 1.0:
        return fz
    # Not torch.lerp: under autocast f may return another dtype than z, and this promotes.
    return like(z, [a + (b - a) * tau for a, b in zip(as_tuple(z), as_tuple(fz))])


class _ImplicitGrad(torch.autograd.Function):
    """Returns z* in the forward pass; in the backward pass maps dL/dz* to the IFT vector g
    and hands it to fz, whose recorded graph carries it on to the parameters and inputs."""

    @staticmethod
    def forward(ctx, backward_solve, z_star, *fz):  # type: ignore[override]
        ctx.backward_solve = backward_solve
        return tuple(z.clone() for z in z_star)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        return (None, None, *ctx.backward_solve(grads))


def implicit(
    z_star: State,
    z: State,
    fz: State,
    cfg: GradConfig,
    on_backward: Callable[[SolverResult], None],
) -> State:
    """Attach the exact implicit gradient to z* (see module docstring).

    ``z`` must be a leaf that requires grad and ``fz = f(z)`` its recorded image;
    ``on_backward`` receives the backward solve's statistics.
    """
    z_parts, fz_parts = as_tuple(z), as_tuple(fz)
    solve = get_solver(cfg.solver)

    def backward_solve(grads: tuple[Tensor | None, ...]) -> tuple[Tensor, ...]:
        u = tuple(torch.zeros_like(p) if g is None else g for p, g in zip(z_parts, grads))

        def vjp_plus_u(g: State) -> State:
            jt_g = torch.autograd.grad(fz_parts, z_parts, as_tuple(g), retain_graph=True)
            return like(z, [a + b for a, b in zip(jt_g, u)])

        res = solve(
            vjp_plus_u, like(z, u), max_iter=cfg.max_iter, tol=cfg.tol, stop_mode=cfg.stop_mode
        )
        if res.nonfinite:
            warnings.warn(
                "DEQ backward (ift) solve met non-finite iterates; using the best finite one. "
                "The equilibrium may be unstable: consider Jacobian regularization or a "
                "smaller learning rate.",
                DivergenceWarning,
                stacklevel=2,
            )
        on_backward(res)
        return as_tuple(res.z)

    out = _ImplicitGrad.apply(backward_solve, as_tuple(z_star), *fz_parts)
    return like(z_star, out)


def phantom(f: Callable[[State], State], z: State, fz: State, cfg: GradConfig) -> State:
    """``cfg.steps`` damped steps from z, the first of which reuses fz = f(z)."""
    out = mix(z, fz, cfg.tau)
    for _ in range(cfg.steps - 1):
        out = mix(out, f(out), cfg.tau)
    return out
