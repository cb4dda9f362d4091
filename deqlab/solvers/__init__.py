"""Root solvers for z = f(z), their registry and their settings.

Every solver is called as ``solver(f, z0, *, max_iter, tol, stop_mode="rel", save_at=(),
**options) -> SolverResult``: the settings every solver shares are :class:`SolveSpec`'s, the
rest are the solver's own options (:func:`solver_options`). A new solver is its update rule
inside a :class:`SolveLoop`; see :mod:`deqlab.solvers.base` for what the result holds.
"""

from __future__ import annotations

from .anderson import anderson
from .base import FlatState, SolveLoop, SolverResult, SolveSpec, State
from .broyden import broyden
from .catalog import COMMON_ARGS, SOLVERS, Solver, get_solver, register_solver, solver_options
from .checks import STOP_MODES
from .fixed_point import fixed_point
from .gmres import gmres
from .newton_krylov import newton_krylov
from .reversible import reversible
from .solver_config import SolverConfig

for _name, _fn in (
    ("fixed_point", fixed_point),
    ("anderson", anderson),
    ("broyden", broyden),
    ("reversible", reversible),
    ("gmres", gmres),
    ("newton_krylov", newton_krylov),
):
    register_solver(_name, _fn)

__all__ = [
    "COMMON_ARGS",
    "SOLVERS",
    "STOP_MODES",
    "FlatState",
    "SolveLoop",
    "SolveSpec",
    "Solver",
    "SolverConfig",
    "SolverResult",
    "State",
    "anderson",
    "broyden",
    "fixed_point",
    "get_solver",
    "gmres",
    "newton_krylov",
    "register_solver",
    "reversible",
    "solver_options",
]
