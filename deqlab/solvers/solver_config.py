"""The forward solver's settings (the ``solver`` config group)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .catalog import SOLVERS, solver_options
from .checks import check_common
from .reversible import check_beta

# The settings every solver config has; its other fields are options of some solvers.
SHARED_FIELDS = (
    "name",
    "max_iter",
    "tol",
    "stop_mode",
    "eval_max_iter",
    "eval_factor",
    "return_final",
    "check_every",
    "capture",
    "fallback",
    "options",
)


@dataclass
class SolverConfig:
    """Forward solver settings (the ``solver`` config group).

    The named options go to the solvers that take them (anderson: m, lam, lam_mode, tau;
    fixed_point: tau; broyden: memory, ls (a line search along each step); reversible: beta,
    its relaxation; all: return_final); ``options`` holds extra options for
    solvers registered by the user. The budget in eval mode is ``eval_max_iter`` if set, else
    ``max_iter * eval_factor`` (TorchDEQ's two options). ``tol: null`` runs exactly
    ``max_iter`` steps with no convergence test (no host syncs).

    ``check_every`` = k tests convergence on the device every step but reads the result back
    every k steps only (the same statistics, up to k - 1 more evaluations). ``capture`` replays
    the forward solve as CUDA graphs, one per k steps (:mod:`deqlab.solvers.capture`); on a
    CPU the solve runs eagerly, with a warning.

    ``fallback``: solvers tried in turn on the samples a solve leaves unconverged (stalled,
    non-finite, a singular Anderson system): each starts from the previous solve's result
    (every sample's best iterate) with the same budget, tol and stop rule, and the named
    options it takes; a sample converged already converges again at its first step and keeps
    its iterate. ``SolverResult.fallbacks`` counts the samples handed to each.
    """

    name: str = "anderson"
    max_iter: int = 30
    tol: float | None = 1e-3
    stop_mode: str = "rel"
    eval_max_iter: int | None = None
    eval_factor: float = 1.0
    m: int = 5
    lam: float = 1e-4
    tau: float = 1.0
    lam_mode: str = "relative"
    memory: int = 30
    ls: bool = False
    beta: float = 0.5
    return_final: bool = False
    check_every: int = 1
    capture: bool = False
    fallback: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        accepted = solver_options(self.name)  # raises for an unknown solver name
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
        if self.ls and "ls" not in accepted:
            raise ValueError(f"solver.ls is Broyden's line search; solver {self.name!r} has none")
        if self.ls and (self.check_every != 1 or self.capture):
            raise ValueError(
                "solver.ls reads its Armijo test back at every trial: set solver.check_every=1 "
                "and solver.capture=false, or solver.ls=false"
            )
        if self.beta != SolverConfig.beta and "beta" not in accepted:
            raise ValueError(f"solver.beta is the reversible solver's; {self.name!r} takes none")
        if "beta" in accepted:
            check_beta(self.beta)
        if not self.eval_factor > 0:
            raise ValueError(f"solver.eval_factor must be > 0, got {self.eval_factor}")
        if self.fallback and self.tol is None:
            raise ValueError(
                "solver.fallback re-solves the samples that did not converge, which needs a "
                "tol: set solver.tol, or solver.fallback=[]"
            )
        self.fallback_configs()  # raises for an unknown solver name
        # A named option set away from its default that neither this solver nor a fallback
        # takes would be ignored without a word (solver=broyden solver.m=8): refuse it.
        takers = set(accepted).union(*(solver_options(n) for n in self.fallback))
        for f in fields(self):
            if f.name in SHARED_FIELDS or f.name in takers or getattr(self, f.name) == f.default:
                continue
            readers = sorted(n for n in SOLVERS.entries if f.name in solver_options(n))
            raise ValueError(
                f"solver.{f.name}={getattr(self, f.name)!r}: solver {self.name!r} takes no "
                f"{f.name} (its options: {', '.join(sorted(accepted))}); {f.name} is an option "
                f"of {', '.join(readers)}"
            )
        unknown = sorted(set(self.options) - set(accepted))
        if unknown:
            raise ValueError(
                f"solver {self.name!r} takes no option(s) {unknown}; its options are "
                f"{sorted(accepted)}"
            )

    def solver_kwargs(self) -> dict[str, Any]:
        """The options the selected solver accepts, from the named fields and ``options``."""
        accepted = solver_options(self.name)
        common = {f.name for f in fields(SolverConfig)} - {"options"}
        named = {k: getattr(self, k) for k in accepted if k in common}
        return {**named, **self.options}

    def fallback_configs(self) -> list[SolverConfig]:
        """Each fallback solver's settings: this config's budget, tol, stop rule and the
        named options that solver takes; its own defaults for the rest."""
        shared = ("max_iter", "tol", "stop_mode", "eval_max_iter", "eval_factor")
        out = []
        for name in self.fallback:
            accepted = solver_options(name)
            keep = {
                f.name: getattr(self, f.name)
                for f in fields(self)
                if f.name in shared or (f.name in accepted and f.name != "options")
            }
            out.append(SolverConfig(name=name, **keep))
        return out

    def eval_budget(self) -> int:
        if self.eval_max_iter is not None:
            return self.eval_max_iter
        return max(1, int(self.max_iter * self.eval_factor))
