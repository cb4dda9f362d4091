"""``grad=shine``: the implicit gradient from the forward solve's own inverse Jacobian (SHINE:
Ramzi, Mannel, Bai, Starck, Ciuciu and Moreau, ICLR 2022, "SHINE: SHaring the INverse Estimate
from the forward pass for bi-level optimization and implicit models").

The implicit backward needs g = (I - J^T)^-1 u, u = dL/dz*. Broyden's forward solve of
g(z) = f(z) - z ends with an estimate B ~ (J - I)^-1 = -(I - J)^-1, so g ~ -B^T u, at the cost
of a few inner products instead of a backward solve. The estimate is only as good as the
secant information of the forward solve: exact along the directions the solve explored,
-I elsewhere. The paper's refinement continues from it with the backward iteration: here the
backward solve of ``grad=ift`` (its ``solver``, ``max_iter``, ``tol``) started from -B^T u
instead of from u. ``grad.max_iter=1 grad.tol=null`` is the estimate itself (a budget of one
evaluation returns the start, its residual measured by one vector-Jacobian product); a
larger budget refines it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .grad import BACKWARD_SETTINGS, GradConfig, GradMode, implicit
from .solvers import SolverResult
from .solvers.base import FlatState
from .solvers.broyden import low_rank_apply
from .state import State, as_tuple, leaf, like

SHINE_TWICE = (
    "grad=shine gives first derivatives only (its backward solve starts from Broyden's "
    "estimate, an approximation with no derivative of its own): use grad=ift for second "
    "derivatives"
)


def shine_gradient(
    f: Callable[[State], State],
    z0: State,
    res: SolverResult,
    cfg: GradConfig,
    on_backward: Callable[[SolverResult], None],
) -> State:
    """z* with the implicit gradient whose backward solve starts from -B^T u (module
    docstring); ``res`` is the Broyden solve, with its ``aux["inverse_jacobian"]``."""
    if "inverse_jacobian" not in res.aux:
        raise ValueError(
            "grad=shine reads the forward Broyden solve's inverse Jacobian estimate, and this "
            "solve returned none: use solver=broyden (through deqlab.DEQ, which asks for it)"
        )
    left, right = res.aux["inverse_jacobian"]  # B = -I + sum_i left_i right_i^T, (B, n, D)
    state = FlatState(res.z)
    left_t = left.transpose(1, 2)

    def start(u: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        flat = state.flatten(like(res.z, u))
        # B^T u = -u + sum_i right_i (left_i . u), and g = -B^T u
        estimate = low_rank_apply(left_t, right, flat).neg_()
        return as_tuple(state.unflatten(estimate))

    z = leaf(res.z, True)
    return implicit(res.z, z, f(z), cfg, on_backward, f, start=start, refuse_twice=SHINE_TWICE)


SHINE = GradMode(
    lambda f, z0, res, cfg, on_backward: [shine_gradient(f, z0, res, cfg, on_backward)],  # type: ignore[arg-type]
    solver="broyden",
    settings=(*BACKWARD_SETTINGS, "output", "jacobian_at"),
    solver_options={"keep_inverse": True},
)
