"""The DEQ layer: solve z* = f(z*) without a tape, then attach a gradient mode.

deq = DEQ(solver={"name": "anderson", "max_iter": 30, "tol": 1e-3},
          grad={"name": "ift", "max_iter": 30})
z_star, info = deq(lambda z: cell(z, x), torch.zeros_like(x))
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .grad import DivergenceWarning, GradConfig, implicit, leaf, phantom
from .regularize import jacobian_loss
from .solvers import STOP_MODES, SolverResult, State, get_solver, solver_options


@dataclass
class SolverConfig:
    """Forward solver settings (the ``solver`` config group).

    ``m``, ``lam``, ``tau`` and ``memory`` go to the solvers that take them (anderson: m, lam,
    tau; fixed_point: tau; broyden: memory); ``options`` holds extra options for solvers
    registered by the user. ``eval_max_iter`` is the budget in eval mode (default max_iter).
    ``tol: null`` runs exactly ``max_iter`` steps with no convergence test (no host syncs).
    """

    name: str = "anderson"
    max_iter: int = 30
    tol: float | None = 1e-3
    stop_mode: str = "rel"
    eval_max_iter: int | None = None
    m: int = 5
    lam: float = 1e-4
    tau: float = 1.0
    memory: int = 30
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        accepted = solver_options(self.name)  # raises for an unknown solver name
        if self.stop_mode not in STOP_MODES:
            raise ValueError(
                f"solver.stop_mode must be one of {STOP_MODES}, got {self.stop_mode!r}"
            )
        if self.max_iter < 1 or (self.eval_max_iter is not None and self.eval_max_iter < 1):
            raise ValueError("solver.max_iter and solver.eval_max_iter must be >= 1")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(
                f"solver.tol must be > 0 (or null: exactly max_iter steps), got {self.tol}"
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
        named = {k: getattr(self, k) for k in ("m", "lam", "tau", "memory") if k in accepted}
        return {**named, **self.options}


C = TypeVar("C")


def to_config(cls: type[C], value: C | Mapping[str, Any] | None, what: str) -> C:
    """Build a config dataclass from a mapping, rejecting unknown keys by name."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} must be a mapping or {cls.__name__}, got {type(value).__name__}")
    valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    for key in value:
        if key not in valid:
            raise ValueError(f"unknown {what} key {key!r}; valid keys: {', '.join(valid)}")
    return cls(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in value.items()})


@dataclass
class DEQInfo(SolverResult):
    """The forward :class:`SolverResult`, plus what the gradient mode adds.

    ``states``: the states sampled along the trajectory (with gradients), last one being the
    returned z*; ``jac_loss``: the Hutchinson Jacobian penalty when requested;
    ``backward``: the ift backward solve's statistics, filled in by ``backward()``.
    """

    states: list[State] = field(default_factory=list)
    jac_loss: Tensor | None = None
    backward: SolverResult | None = None


class DEQ(nn.Module):
    """Deep equilibrium layer: ``z_star, info = deq(f, z0)`` with f any callable z -> z.

    The forward solve runs without recording a graph (memory does not grow with the number
    of iterations); the gradient mode then records what it needs (one f evaluation for ift
    and onestep, k for phantom). Under ``torch.no_grad()`` it only solves. In eval mode the
    budget is ``solver.eval_max_iter``. Parametrized weights (``deqlab.apply_norm``) are
    computed once per solve, not once per f evaluation.
    """

    def __init__(
        self,
        solver: SolverConfig | Mapping[str, Any] | None = None,
        grad: GradConfig | Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.solver_cfg = to_config(SolverConfig, solver, "solver")
        self.grad_cfg = to_config(GradConfig, grad, "grad")
        self.solve = get_solver(self.solver_cfg.name)
        self.solver_kwargs = self.solver_cfg.solver_kwargs()

    def extra_repr(self) -> str:
        s, g = self.solver_cfg, self.grad_cfg
        return f"solver={s.name}(max_iter={s.max_iter}, tol={s.tol}), grad={g.name}"

    def budget(self) -> int:
        s = self.solver_cfg
        return s.max_iter if self.training or s.eval_max_iter is None else s.eval_max_iter

    def forward(
        self,
        f: Callable[[State], State],
        z0: State,
        *,
        max_iter: int | None = None,
        n_states: int = 1,
        jac_vecs: int = 0,
    ) -> tuple[State, DEQInfo]:
        """Solve z* = f(z*) from z0 and attach the configured gradient.

        Args:
            max_iter: overrides this call's forward budget (e.g. a jittered budget).
            n_states: states returned in ``info.states``: n_states - 1 iterates evenly spaced
                over the budget (each with a one-step gradient, for fixed-point correction
                losses) followed by the returned z*.
            jac_vecs: if > 0, ``info.jac_loss`` holds the Hutchinson estimate of
                ||J_f(z*)||_F^2 / dim with this many probe vectors, differentiable.
        """
        s = self.solver_cfg
        budget = max_iter or self.budget()
        track = torch.is_grad_enabled()
        save_at = [round(budget * i / n_states) - 1 for i in range(1, n_states)] if track else []
        with torch.no_grad(), parametrize.cached():
            res = self.solve(
                f,
                leaf(z0, False),
                max_iter=budget,
                tol=s.tol,
                stop_mode=s.stop_mode,
                save_at=save_at,
                **self.solver_kwargs,
            )
        if res.nonfinite:
            warnings.warn(
                f"DEQ forward solve ({s.name}) met non-finite iterates; returning each sample's "
                "best finite iterate (see info.rel_residual). Consider weight/spectral "
                "normalization, Jacobian regularization or a smaller learning rate.",
                DivergenceWarning,
                stacklevel=2,
            )
        info = DEQInfo(**{f.name: getattr(res, f.name) for f in fields(SolverResult)})
        if not track:
            info.states = [res.z]
            return res.z, info

        g = self.grad_cfg
        # A second cache: the solve above ran without a tape, so its cached weights carry no
        # graph; these do, and serve every recorded f evaluation below.
        with parametrize.cached():
            z = leaf(res.z, g.name == "ift" or jac_vecs > 0)
            fz = f(z)
            if jac_vecs > 0:
                info.jac_loss = jacobian_loss(fz, z, vecs=jac_vecs)
            if g.name == "ift":
                out = implicit(res.z, z, fz, g, lambda r: setattr(info, "backward", r))
            elif g.name == "phantom":
                out = phantom(f, z, fz, g)
            else:
                out = fz
            info.states = [f(leaf(s_k, False)) for s_k in res.saved] + [out]
        return out, info
