"""``grad=reversible``: the exact gradient of the reversible solver's returned iterate, by
running its iteration backwards (McCallum, Arora & Foster, 2025, "Reversible Deep Equilibrium
Models", arXiv 2509.12917; the iteration is in :mod:`deqlab.solvers.reversible`).

Step n maps (y_n, z_n) to y_{n+1} = (1 - b) y_n + b f(z_n), z_{n+1} = (1 - b) z_n + b f(y_{n+1}).
Given the adjoints (a_y, a_z) of (y_{n+1}, z_{n+1}), one reverse step recomputes f at
y_{n+1}, recovers z_n = (z_{n+1} - b f(y_{n+1})) / (1 - b), recomputes f at z_n, recovers
y_n = (y_{n+1} - b f(z_n)) / (1 - b), and takes the vector-Jacobian products of those two
evaluations:

    a_y' = a_y + b J_f(y_{n+1})^T a_z,   a_z <- (1 - b) a_z + b J_f(z_n)^T a_y',   a_y <- (1 - b) a_y'

while b (df/dtheta)^T a_z at y_{n+1} and b (df/dtheta)^T a_y' at z_n add up into the gradients
of f's parameters and inputs. The reverse pass holds two states and two adjoints whatever
the step count (memory O(1) in depth) and costs what the forward did: two f evaluations per
step, with their products. Each sample is reversed from its own returned step.

Recovering a state divides by 1 - b, and the reverse step's error grows by about
(1 + b L) / |1 - b| per step for an f of Lipschitz constant L: in exact arithmetic the gradient
is exact, in floating point the recovered states drift from the forward's. The drift is
measured, not assumed: the reverse pass ends at (y_0, z_0), which must equal the known start,
and its distance from it (relative to the returned state's norm) is the backward statistic
``rel_residual`` (``deq/bwd_rel_residual``); above ``grad.tol`` a
:class:`DivergenceWarning` says so. It is a cautious proxy: the start is where the gradient
depends least on the states (a contraction forgets it), and on the tutorial's conv cell the
gradient's relative error measured about the drift's size, or less. Few steps, a small beta,
or a float64 cell keep it small (``tests/test_reversible.py`` measures both).

What f reads must be known to hand back its gradients: f is a :class:`deqlab.Bound` (``Bound(cell,
*inputs)``: the cell's parameters when it is a module, and the inputs that require grad) or an
``nn.Module`` z -> z. The initial state gets no gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .bound import differentiable_inputs
from .grad import DivergenceWarning, GradConfig, GradMode
from .solvers import SolverResult
from .solvers.base import REL_EPS, FlatState
from .state import State


def report_drift(
    y: Tensor,
    z: Tensor,
    start: Tensor,
    z_ret: Tensor,
    steps: Tensor,
    tol: float | None,
    on_backward: Callable[[SolverResult], None],
) -> None:
    """Hand over how far the reversed iteration ended from its known start (y_0 = z_0 =
    ``start``), per sample and relative to the returned state; warn above ``tol``."""
    drift = torch.linalg.vector_norm(torch.cat([y - start, z - start], dim=1), dim=1)
    rel = drift / (torch.linalg.vector_norm(z_ret, dim=1) + REL_EPS)
    worst = float(rel.max()) if len(rel) else 0.0
    on_backward(
        SolverResult(
            z=z,
            abs_residual=drift,
            rel_residual=rel,
            nfe=2 * int(steps.max()) if len(steps) else 0,
            best_step=steps,
            converged=rel <= (tol if tol is not None else float("inf")),
            trace=rel.unsqueeze(0),
            nonfinite=not math.isfinite(worst),
        )
    )
    if tol is not None and not worst <= tol:
        warnings.warn(
            f"grad=reversible: the reversed iteration ended {worst:.2e} (relative) from its "
            f"start, above grad.tol={tol:g}: rounding errors grew while recovering the states, "
            "so the gradient is inexact. Lower solver.beta or solver.max_iter, or run the cell "
            "in float64.",
            DivergenceWarning,
            stacklevel=2,
        )


class _Reversed(torch.autograd.Function):
    """Returns the solve's z in the forward pass; in the backward pass runs ``reverse`` and
    hands its gradients to the tensors f reads."""

    @staticmethod
    def forward(ctx, reverse, z_flat, *tensors):  # type: ignore[override]
        ctx.reverse = reverse
        return z_flat.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True
            raise RuntimeError(
                "grad=reversible gives first derivatives only: its reverse pass is not itself "
                "differentiated, so create_graph=True would return a wrong second derivative. "
                "Use grad=ift (exact, f a deqlab.Bound or an nn.Module), phantom or onestep"
            )
        return (None, None, *ctx.reverse(grad))


def reverse_gradient(
    f: Callable[[State], State],
    z0: State,
    res: SolverResult,
    cfg: GradConfig,
    on_backward: Callable[[SolverResult], None],
) -> State:
    """``res.z`` (the reversible solver's result) with the exact gradient of the iteration
    that produced it attached; ``on_backward`` receives the reverse pass's statistics (its
    drift from z0 as the residual): see the module docstring."""
    g, tensors = differentiable_inputs(f)
    state = FlatState(z0)
    beta = float(res.aux["beta"])
    steps = res.best_step.to(torch.long)
    z_ret, y_ret = state.flatten(res.z), state.flatten(res.aux["y"])
    start = state.flatten(z0).detach()

    def f_flat(z: Tensor, inputs: list[Tensor]) -> Tensor:
        return state.flatten(g(state.unflatten(z), inputs))

    def vjp(at: Tensor, weight: Tensor, inputs: list[Tensor]) -> tuple[Tensor, Tensor, list]:
        """f(at) (detached), and J_f(at)^T weight with the inputs' products."""
        with torch.enable_grad():
            leaf = at.detach().requires_grad_()
            out = f_flat(leaf, inputs)
            grads = torch.autograd.grad(out, [leaf, *inputs], weight, allow_unused=True)
        return out.detach(), grads[0], list(grads[1:])

    def reverse(grad_z: Tensor) -> list[Any]:
        y, z = y_ret.clone(), z_ret.clone()
        a_y, a_z = torch.zeros_like(y), grad_z.to(z.dtype).clone()
        totals: list[Tensor | None] = [None] * len(tensors)

        def add(grads: list[Tensor | None]) -> None:
            for i, gi in enumerate(grads):
                if gi is not None:
                    totals[i] = gi if totals[i] is None else totals[i] + gi

        for n in reversed(range(int(steps.max()) if len(steps) else 0)):
            active = (steps > n).unsqueeze(1)  # samples whose returned iterate is past step n
            # undo z_{n+1} = (1 - b) z_n + b f(y_{n+1})
            fy, jt, grads = vjp(y, torch.where(active, a_z, 0.0) * beta, tensors)
            add(grads)
            a_y = a_y + jt  # zero where inactive: their weight was zero
            z = torch.where(active, (z - beta * fy) / (1 - beta), z)
            a_z = torch.where(active, (1 - beta) * a_z, a_z)
            # undo y_{n+1} = (1 - b) y_n + b f(z_n)
            fz, jt, grads = vjp(z, torch.where(active, a_y, 0.0) * beta, tensors)
            add(grads)
            a_z = a_z + jt
            y = torch.where(active, (y - beta * fz) / (1 - beta), y)
            a_y = torch.where(active, (1 - beta) * a_y, a_y)
        report_drift(y, z, start, z_ret, steps, cfg.tol, on_backward)
        return [t if t is not None else torch.zeros_like(x) for t, x in zip(totals, tensors)]

    out = _Reversed.apply(reverse, z_ret.detach(), *tensors)
    return state.unflatten(out)


REVERSIBLE = GradMode(
    lambda f, z0, res, cfg, on_backward: [reverse_gradient(f, z0, res, cfg, on_backward)],  # type: ignore[arg-type]
    solver="reversible",
    settings=("tol",),  # the reverse pass's drift bound
)
