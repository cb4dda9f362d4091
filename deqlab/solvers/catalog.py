"""The solver registry: names (or import paths ``pkg.mod:fn``) to solver functions, and
the options each solver takes (its keyword-only arguments beyond the shared settings)."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from dataclasses import MISSING, fields
from typing import Any

from ..registry import Registry
from .base import SPEC_FIELDS, SolverResult, SolveSpec

Solver = Callable[..., SolverResult]

# Arguments every solver takes; everything else keyword-only is a solver option, except
# OPTIONAL_ARGS: what a core may ask of a solver that takes it (``budgets``: keep what each
# shorter budget returns, for a budget curve). A solver written on deqlab's loop takes the
# shared settings as ``**common`` (:class:`SolveSpec`): all of these, and ``return_final`` and
# ``check_every`` as options.
COMMON_ARGS = ("max_iter", "tol", "stop_mode", "save_at")
OPTIONAL_ARGS = ("budgets",)


def _parameters(fn: Solver) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except ValueError:  # a builtin without a Python signature
        return {}


def _takes_spec(params: dict[str, inspect.Parameter]) -> bool:
    """Whether a solver takes the shared settings as ``**common``."""
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _check_solver(name: str, fn: Solver) -> None:
    if not callable(fn):
        raise TypeError(f"solver {name!r} must be a function, got {type(fn).__name__}")
    params = _parameters(fn)
    missing = [a for a in COMMON_ARGS if a not in params and not _takes_spec(params)]
    if missing:
        raise TypeError(f"solver {name!r} must accept the keyword arguments {missing}")


SOLVERS: Registry[Solver] = Registry(
    "solver", "add your own with deqlab.register_solver", _check_solver
)


def register_solver(name: str, fn: Solver) -> Solver:
    """Make ``fn`` available as ``get_solver(name)`` (and as ``solver.name`` in configs).

    Args:
        name: the name configs use (``solver.name=NAME``).
        fn: ``fn(f, z0, *, max_iter, tol, stop_mode, save_at, **options) -> SolverResult``;
            written on :class:`~deqlab.solvers.base.SolveLoop`, it takes the shared settings
            as ``**common``.

    Returns:
        ``fn``, so that it can be used as a decorator's last line.
    """
    return SOLVERS.register(name, fn)


def get_solver(name: str) -> Solver:
    """The solver registered as ``name``, or the function at import path ``pkg.mod:fn``.

    Args:
        name: a registered name (``anderson``) or an import path (``mypkg.solvers:newton``).

    Returns:
        The solver function; an unknown name raises a ``ValueError`` listing the known ones.
    """
    return SOLVERS.get(name)


def solver_options(name: str) -> dict[str, object]:
    """The options (keyword-only arguments beyond the common ones) of a solver, with defaults.

    Args:
        name: a registered name or an import path, as for :func:`get_solver`.

    Returns:
        Option name -> default (``inspect.Parameter.empty`` for a required one).
    """
    params = _parameters(get_solver(name))
    options = {
        p.name: p.default
        for p in params.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in COMMON_ARGS + OPTIONAL_ARGS
    }
    if _takes_spec(params):
        for f in fields(SolveSpec):
            if f.name not in COMMON_ARGS + OPTIONAL_ARGS and f.default is not MISSING:
                options.setdefault(f.name, f.default)
    return options


def solver_option_types(name: str) -> dict[str, Any]:
    """The annotated type of each of a solver's options (``Any`` where it has none or one a
    config cannot hold), for the schema :func:`~deqlab.solvers.solver_config.solver_schema`
    builds.

    Args:
        name: a registered name or an import path, as for :func:`get_solver`.

    Returns:
        Option name -> ``int``, ``float``, ``bool``, ``str``, ``X | None`` of one of those, or
        ``Any``.
    """
    fn = get_solver(name)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: the option is still an option
        hints = {}
    spec = typing.get_type_hints(SolveSpec)
    return {k: _config_type(hints.get(k, spec.get(k, Any))) for k in solver_options(name)}


def _config_type(tp: Any) -> Any:
    """``tp`` if a config can hold it (a scalar, or an optional scalar), else ``Any``."""
    scalars = (int, float, bool, str)
    if tp in scalars:
        return tp
    args = typing.get_args(tp)
    if len(args) == 2 and type(None) in args:
        (inner,) = (a for a in args if a is not type(None))
        if inner in scalars:
            return inner | None
    return Any


def takes(name: str, arg: str) -> bool:
    """Whether the solver ``name`` accepts the keyword argument ``arg``."""
    params = _parameters(get_solver(name))
    return arg in params or (_takes_spec(params) and arg in SPEC_FIELDS)
