"""The solver registry: names (or import paths ``pkg.mod:fn``) to solver functions, and
the options each solver takes (its keyword-only arguments beyond the common ones)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from ..registry import Registry
from .base import SolverResult

Solver = Callable[..., SolverResult]

# Arguments every solver takes; everything else keyword-only is a solver option, except
# OPTIONAL_ARGS: what a core may ask of a solver that takes it (``budgets``: keep what each
# shorter budget returns, for a budget curve).
COMMON_ARGS = ("max_iter", "tol", "stop_mode", "save_at")
OPTIONAL_ARGS = ("budgets",)


def _check_solver(name: str, fn: Solver) -> None:
    if not callable(fn):
        raise TypeError(f"solver {name!r} must be a function, got {type(fn).__name__}")
    try:
        params = inspect.signature(fn).parameters
    except ValueError:  # a builtin without a Python signature
        params = {}  # type: ignore[assignment]
    missing = [a for a in COMMON_ARGS if a not in params]
    if missing:
        raise TypeError(f"solver {name!r} must accept the keyword arguments {missing}")


SOLVERS: Registry[Solver] = Registry(
    "solver", "add your own with deqlab.register_solver", _check_solver
)


def register_solver(name: str, fn: Solver) -> Solver:
    """Make ``fn`` available as ``get_solver(name)`` (and as ``solver.name`` in configs)."""
    return SOLVERS.register(name, fn)


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``, or the function at import path ``pkg.mod:fn``."""
    return SOLVERS.get(name)


def solver_options(name: str) -> dict[str, object]:
    """The options (keyword-only arguments beyond the common ones) of a solver, with defaults."""
    params = inspect.signature(get_solver(name)).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in COMMON_ARGS + OPTIONAL_ARGS
    }


def takes(name: str, arg: str) -> bool:
    """Whether the solver ``name`` accepts the keyword argument ``arg``."""
    return arg in inspect.signature(get_solver(name)).parameters
