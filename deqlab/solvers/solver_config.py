"""The forward solver's settings (the ``solver`` config group).

:class:`SolverConfig` holds the settings every solver shares. Each solver's own options
(Anderson's ``m``, Broyden's ``memory``, ...) come from its function's signature: for each
solver, :func:`solver_schema` builds a subclass with those options as fields, annotated and
defaulted as the signature has them, and ``SolverConfig(name=..., ...)`` returns an instance
of it. The config tree stores the same classes (``solver/<name>_schema``), so
``solver=broyden solver.m=8`` fails when the config is composed, naming the key.
"""

from __future__ import annotations

import copy
import inspect
import re
from dataclasses import MISSING, dataclass, field, fields, make_dataclass
from typing import Any

from .catalog import SOLVERS, Solver, get_solver, solver_option_types, solver_options
from .checks import check_common
from .reversible import check_beta

# The settings a fallback solver takes from the main solver's (the budget and the stop rule).
FALLBACK_SHARES = ("max_iter", "tol", "stop_mode", "eval_max_iter", "eval_factor")
# The shared settings that are options of a solver written on SolveLoop (SolveSpec's).
SPEC_OPTIONS = ("return_final", "check_every")


@dataclass
class SolverConfig:
    """Forward solver settings (the ``solver`` config group).

    ``SolverConfig(name="broyden", memory=12)`` is an instance of the Broyden solver's own
    schema (:func:`solver_schema`): the shared settings below, and Broyden's options. A
    keyword the named solver does not take is refused, naming the solvers that take it.
    ``options`` is the other way to pass a solver's own options (a mapping, as a config file
    of a solver known only by its import path may hold them).

    The budget in eval mode is ``eval_max_iter`` if set, else ``max_iter * eval_factor``
    (TorchDEQ's two options). ``tol: null`` runs exactly ``max_iter`` steps with no
    convergence test (no host syncs).

    ``check_every`` = k tests convergence on the device every step but reads the result back
    every k steps only (the same statistics, up to k - 1 more evaluations). ``capture`` replays
    the forward solve as CUDA graphs, one per k steps (:mod:`deqlab.solvers.capture`); on a
    CPU the solve runs eagerly, with a warning.

    ``fallback``: solvers tried in turn on the samples a solve leaves unconverged (stalled,
    non-finite, a singular Anderson system): each starts from the previous solve's result
    (every sample's best iterate) with the same budget, tol and stop rule, the main solver's
    options it also takes (``tau`` from anderson to fixed_point), and its own options from
    ``fallback_options[<name>]`` (``solver.fallback_options.broyden.memory=12``); a sample
    converged already converges again at its first step and keeps its iterate.
    ``SolverResult.fallbacks`` counts the samples handed to each.

    ``per_solver``: options that apply only when the named solver runs, as the main solver
    (to each option whose field is left at its default) or as a fallback (before
    ``fallback_options``). A published recipe gives its solver's options this way, so that
    ``experiment=cifar_tutorial solver=broyden`` composes: the recipe's Anderson options wait
    under ``per_solver.anderson`` while its budget and stop rule, shared by every solver, apply.
    """

    name: str = "anderson"
    max_iter: int = 30
    tol: float | None = 1e-3
    stop_mode: str = "rel"
    eval_max_iter: int | None = None
    eval_factor: float = 1.0
    return_final: bool = False
    check_every: int = 1
    capture: bool = False
    fallback: list[str] = field(default_factory=list)
    fallback_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_solver: dict[str, dict[str, Any]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def __new__(cls, *args: Any, **kwargs: Any) -> SolverConfig:
        # SolverConfig(name=...) is the named solver's schema, built from its signature
        if cls is SolverConfig:
            if args:
                raise TypeError("SolverConfig takes keyword arguments (name=..., max_iter=...)")
            cls = solver_schema(kwargs.get("name", SolverConfig.name))
            _refuse_foreign(cls, kwargs)
        return super().__new__(cls)

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled and copied by value: the schema class is rebuilt from the solver's name
        return (_rebuild, ({f.name: getattr(self, f.name) for f in fields(self)},))

    @classmethod
    def from_mapping(cls, value: Any, what: str = "solver") -> SolverConfig:
        """The settings a composed or saved config holds, as the named solver's schema.

        A key the solver does not take is accepted in two cases, both of configs written
        without it in mind: at another solver's default (``solver.name=<import path>`` over
        the default ``anderson`` group file; a run folder or checkpoint written when one schema
        held every built-in option), and, away from its default, when a fallback takes it
        (such a config gave the fallback its options that way): it moves to
        ``fallback_options``. Anything else is refused by name.
        """
        kwargs = {k: (dict(v) if hasattr(v, "items") else v) for k, v in value.items()}
        schema = solver_schema(kwargs.get("name", SolverConfig.name))
        own = {f.name for f in fields(schema)}
        fallback_options = {n: dict(o) for n, o in kwargs.get("fallback_options", {}).items()}
        for key in [k for k in kwargs if k not in own]:
            v = kwargs[key]
            takers = [n for n in kwargs.get("fallback", []) if key in solver_options(n)]
            if any(solver_options(n).get(key, MISSING) == v for n in SOLVERS.entries):
                del kwargs[key]
            elif takers:
                for n in takers:
                    fallback_options.setdefault(n, {}).setdefault(key, v)
                del kwargs[key]
        if fallback_options:
            kwargs["fallback_options"] = fallback_options
        _refuse_foreign(schema, kwargs, what)
        return schema(**kwargs)

    def __post_init__(self) -> None:
        accepted = solver_options(self.name)
        if type(self) is not solver_schema(self.name):
            raise ValueError(
                f"{type(self).__name__} is another solver's settings class, not {self.name!r}'s: "
                f"build SolverConfig(name={self.name!r}, ...)"
            )
        self._apply_per_solver()
        if self.tol is not None and not self.tol > 0:
            raise ValueError(
                f"solver.tol must be > 0 (or null: exactly max_iter steps), got {self.tol}"
            )
        try:
            check_common(self.max_iter, self.tol, self.stop_mode, self.check_every)
            if self.eval_max_iter is not None:
                check_common(self.eval_max_iter, self.tol, self.stop_mode)
        except ValueError as e:
            raise ValueError(f"solver.{e}") from None
        if (self.check_every != 1 or self.capture) and "check_every" not in accepted:
            raise ValueError(
                f"solver {self.name!r} takes no check_every, so it can neither defer its "
                "convergence tests nor be captured; set solver.check_every=1 and "
                "solver.capture=false"
            )
        if self.name == "broyden" and self.option("ls") and (self.check_every != 1 or self.capture):
            raise ValueError(
                "solver.ls reads its Armijo test back at every trial: set solver.check_every=1 "
                "and solver.capture=false, or solver.ls=false"
            )
        if self.name == "reversible":
            check_beta(self.option("beta"))
        if not self.eval_factor > 0:
            raise ValueError(f"solver.eval_factor must be > 0, got {self.eval_factor}")
        if self.fallback and self.tol is None:
            raise ValueError(
                "solver.fallback re-solves the samples that did not converge, which needs a "
                "tol: set solver.tol, or solver.fallback=[]"
            )
        stray = sorted(set(self.fallback_options) - set(self.fallback))
        if stray:
            raise ValueError(
                f"solver.fallback_options names {stray}, which solver.fallback={self.fallback} "
                "does not list"
            )
        self.fallback_configs()  # raises for an unknown solver name or option
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise ValueError(
                f"solver {self.name!r} takes no option(s) {unknown}; its options are "
                f"{sorted(accepted)}"
            )

    def _apply_per_solver(self) -> None:
        """Check every ``per_solver`` entry against its solver's options, then give this
        solver's entry to the fields still at their defaults (the rest go to ``options``)."""
        for name, opts in self.per_solver.items():
            theirs = solver_options(name)  # raises for an unknown solver, listing the known
            unknown = sorted(set(opts) - set(theirs))
            if unknown:
                raise ValueError(
                    f"solver.per_solver.{name} sets {unknown}, which solver {name!r} does not "
                    f"take; its options are {sorted(theirs)}"
                )
        defaults = {f.name: _default_of(f) for f in fields(self)}
        for key, value in self.per_solver.get(self.name, {}).items():
            if key not in defaults:  # a solver known by import path keeps them in options
                self.options.setdefault(key, value)
            elif getattr(self, key) == defaults[key]:
                setattr(self, key, copy.deepcopy(value))

    def option(self, key: str) -> Any:
        """The value this config gives the solver's option ``key`` (field or ``options``)."""
        return self.solver_kwargs()[key]

    def solver_kwargs(self) -> dict[str, Any]:
        """The options the selected solver accepts, from the named fields and ``options``."""
        accepted = solver_options(self.name)
        shared = {f.name for f in fields(SolverConfig)} - set(SPEC_OPTIONS)
        named = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name in accepted and f.name not in shared
        }
        return {**named, **self.options}

    def fallback_configs(self) -> list[SolverConfig]:
        """Each fallback solver's settings: this config's budget, tol and stop rule, the
        options of this solver that it also takes, then its ``fallback_options``."""
        out = []
        for name in self.fallback:
            accepted = solver_options(name)
            keep = {k: v for k, v in self.solver_kwargs().items() if k in accepted}
            keep.update({k: getattr(self, k) for k in FALLBACK_SHARES})
            keep.update(self.per_solver.get(name, {}))
            keep.update(self.fallback_options.get(name, {}))
            out.append(SolverConfig(name=name, **keep))
        return out

    def eval_budget(self) -> int:
        if self.eval_max_iter is not None:
            return self.eval_max_iter
        return max(1, int(self.max_iter * self.eval_factor))


_SCHEMAS: dict[tuple[str, Solver], type[SolverConfig]] = {}


def solver_schema(name: str) -> type[SolverConfig]:
    """The settings class of the solver ``name``: :class:`SolverConfig`'s shared fields and one
    field per option of the solver's signature, with its annotation and default (a required
    option is a required field).

    Args:
        name: a registered name or an import path, as for :func:`~deqlab.solvers.get_solver`.

    Returns:
        A dataclass subclass of :class:`SolverConfig` (built once per solver function).

    Example:
        >>> schema = solver_schema("broyden")
        >>> schema.__name__, schema(memory=12).solver_kwargs()["memory"]
        ('BroydenSolverConfig', 12)
    """
    fn = get_solver(name)  # raises for an unknown name, listing the known ones
    key = (name, fn)
    if key not in _SCHEMAS:
        shared = {f.name for f in fields(SolverConfig)}
        types = solver_option_types(name)
        own = [("name", str, field(default=name))] + [
            (k, types[k], _field(default))
            for k, default in solver_options(name).items()
            if k not in shared
        ]
        words = re.split(r"[^A-Za-z0-9]+", name)
        _SCHEMAS[key] = make_dataclass(
            "".join(w[:1].upper() + w[1:] for w in words) + "SolverConfig",
            own,
            bases=(SolverConfig,),
            namespace={"__module__": __name__, "__doc__": f"The {name!r} solver's settings."},
            kw_only=True,
        )
    return _SCHEMAS[key]


def _default_of(f: Any) -> Any:
    """A field's default (MISSING for a required one)."""
    if f.default is MISSING and f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def _field(default: Any) -> Any:
    if default is inspect.Parameter.empty:  # a required option
        return field()
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: copy.deepcopy(default))
    return field(default=default)


def _refuse_foreign(schema: type[SolverConfig], kwargs: dict[str, Any], what: str = "solver"):
    """Raise for a keyword ``schema`` has no field for, naming the solvers that take it."""
    own = [f.name for f in fields(schema)]
    for key in kwargs:
        if key in own:
            continue
        name = kwargs.get("name", SolverConfig.name)
        readers = sorted(n for n in SOLVERS.entries if key in solver_options(n))
        if not readers:
            raise ValueError(f"unknown {what} key {key!r}; valid keys: {', '.join(own)}")
        mine = sorted(solver_options(name))
        raise ValueError(
            f"{what}.{key}={kwargs[key]!r}: solver {name!r} takes no {key} (its options: "
            f"{', '.join(mine)}); {key} is an option of {', '.join(readers)} (a fallback's "
            f"options go in {what}.fallback_options.<name>)"
        )


def _rebuild(kwargs: dict[str, Any]) -> SolverConfig:
    return SolverConfig(**kwargs)
