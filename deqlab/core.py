"""DEQ cores: solve z* = f(z*) without a tape, then build the training graph around it.

deq = DEQ(solver={"name": "anderson", "max_iter": 30, "tol": 1e-3},
          grad={"name": "ift", "max_iter": 30})
z_star, info = deq(lambda z: cell(z, x), torch.zeros_like(x))

A core is any module with this call (the :class:`Core` protocol); the built-in ones follow
TorchDEQ's two training-graph strategies (Geng & Kolter, 2023, "TorchDEQ"):

- ``indexing`` (:class:`DEQ`): one solve; the gradient mode is attached beside the trajectory
  at the sampled states (``n_states`` evenly spaced, or the steps in ``indexing``).
- ``sliced`` (:class:`SlicedDEQ`): the solve is cut into segments; the gradient mode is applied
  at each segment's end and the next segment resumes from its output, so the gradient
  function sits inside the trajectory (budget ``max_iter`` + the gradient steps).

Both are the same at test time: one solve with the eval budget.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .grad import GRAD_MODES, DivergenceWarning, GradConfig, evaluate
from .registry import Registry
from .regularize import jacobian_loss
from .settings import to_config
from .solvers import SolverConfig, SolverResult, get_solver
from .solvers.capture import CapturedSolver
from .solvers.catalog import takes
from .solvers.fallback import fall_back
from .state import State, as_tuple, leaf


@dataclass
class CoreConfig:
    """How the training graph is built around the solve (the ``core`` config group).

    ``name``: ``indexing``, ``sliced``, ``torchdeq``, one added with :func:`register_core`, or
    an import path ``pkg.module:Class``. ``n_states`` > 1 samples that many states evenly over
    the budget; otherwise ``indexing`` lists the solver steps to sample (TorchDEQ's rule:
    n_states wins). The last state is always the equilibrium. ``options`` go to a user's core.
    """

    name: str = "indexing"
    n_states: int = 1
    indexing: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_states < 1:
            raise ValueError(
                f"core.n_states must be >= 1 (1: the equilibrium only), got {self.n_states}"
            )
        steps = list(self.indexing)
        if any(k < 1 for k in steps) or steps != sorted(set(steps)):
            raise ValueError(f"core.indexing lists increasing solver steps >= 1, got {steps}")

    def sampled(self) -> int:
        """How many states are sampled (the equilibrium included)."""
        return self.n_states if self.n_states > 1 else len(self.indexing) + 1


@dataclass
class DEQInfo(SolverResult):
    """The forward :class:`SolverResult`, plus what the gradient mode adds.

    ``states``: the states the loss reads (with gradients in training), the last being the
    returned z*; ``jac_loss``: the Hutchinson Jacobian penalty when requested; ``backward``:
    the ift backward solves' statistics, appended by ``backward()``; ``sradius``: the spectral
    radius of J_f at z*, per sample, when the caller asks for it.
    """

    states: list[State] = field(default_factory=list)
    jac_loss: Tensor | None = None
    backward: list[SolverResult] = field(default_factory=list)
    sradius: Tensor | None = None

    @classmethod
    def from_result(cls, res: SolverResult, **extra: Any) -> DEQInfo:
        """The forward solve's statistics, with ``extra`` DEQInfo fields."""
        return cls(**{k.name: getattr(res, k.name) for k in fields(SolverResult)}, **extra)


@runtime_checkable  # not mutated (make mutate): mutmut's attributes would join the protocol
class Core(Protocol):  # pragma: no mutate block
    """What a LightningModule asks of a DEQ core.

    ``core(f, z0, max_iter=..., jac_vecs=..., **solver_options)`` returns ``(z, info)``:
    ``info.states`` the states the loss reads (last = z), ``info.nfe``, ``info.abs_residual``
    and ``info.rel_residual`` (per sample), ``info.trace`` ((steps, B) relative residuals),
    ``info.backward`` (backward solves, filled in during ``backward()``) and ``info.jac_loss``
    (when ``jac_vecs`` > 0). ``max_iter`` overrides the budget for this call, and
    ``solver_options`` (``tol=``, ``m=``, ...) the solver's settings;
    ``max_iter_for_training()`` is the training budget. In eval mode a core only solves.
    """

    training: bool

    def __call__(
        self,
        f: Callable[[State], State],
        z0: State,
        *,
        max_iter: int | None = None,
        jac_vecs: int = 0,
        **solver_options: Any,
    ) -> tuple[State, DEQInfo]: ...

    def max_iter_for_training(self) -> int: ...


def _warn_nonfinite(res: SolverResult, solver: str) -> None:
    if res.nonfinite:
        warnings.warn(
            f"DEQ forward solve ({solver}) met non-finite iterates; returning each sample's "
            "best finite iterate (see info.rel_residual). Consider weight/spectral "
            "normalization, Jacobian regularization or a smaller learning rate.",
            DivergenceWarning,
            stacklevel=3,
        )


def check_budgets(budgets: list[int], budget: int, training: bool, cfg: SolverConfig) -> None:
    """Raise unless ``budgets`` are step counts a budget curve can read from this solve."""
    solver = cfg.name
    if cfg.fallback:
        raise ValueError(
            "budgets: with solver.fallback a shorter budget would also cut the fallback's "
            "solve, which one solve cannot show; set solver.fallback=[] for a budget curve"
        )
    if not takes(solver, "budgets"):
        raise ValueError(
            f"solver {solver!r} takes no `budgets` option, so it cannot keep what each budget "
            "returns (pass budgets=... on to deqlab.solvers.base.Tracker to add it)"
        )
    if training:
        raise ValueError(
            "budgets: a budget curve is read from a solve without a gradient (evaluation, or "
            "under torch.no_grad()); a training solve keeps no per-budget states"
        )
    if not all(isinstance(k, int) and 1 <= k <= budget for k in budgets):
        raise ValueError(
            f"budgets must be step counts from 1 to this solve's budget {budget}, got "
            f"{list(budgets)} (raise solver.eval_max_iter to read larger budgets)"
        )


class DEQ(nn.Module):
    """Deep equilibrium layer, TorchDEQ's ``indexing`` core: ``z_star, info = deq(f, z0)``
    with f any callable z -> z.

    The forward solve runs without recording a graph (memory does not grow with the number
    of iterations); the gradient mode then records what it needs (one f evaluation for ift
    and onestep, k for phantom) at each sampled state. Under ``torch.no_grad()`` it only
    solves. In eval mode the budget is the solver's eval budget. Parametrized weights
    (``deqlab.apply_norm``) are computed once per solve, not once per f evaluation.

    Args:
        solver: the forward solver's settings (:class:`~deqlab.solvers.SolverConfig`, or a
            mapping of its fields); None: Anderson's defaults.
        grad: the gradient mode's settings (:class:`~deqlab.grad.GradConfig`, or a mapping);
            None: the exact implicit gradient (``ift``).
        n_states: sample this many states along the solve (evenly), each given the gradient
            mode (phantom gradient before the last): TorchDEQ's ``n_states``.
        indexing: or sample the states at these steps (TorchDEQ's ``indexing``).

    Example:
        >>> cell = torch.nn.Linear(4, 4)
        >>> deq = DEQ(solver={"name": "anderson", "max_iter": 40, "tol": 1e-6})
        >>> x = torch.randn(2, 4)
        >>> z_star, info = deq(lambda z: torch.tanh(0.5 * cell(z) + x), torch.zeros(2, 4))
        >>> z_star.shape, bool(info.converged.all())
        (torch.Size([2, 4]), True)
    """

    def __init__(
        self,
        solver: SolverConfig | Mapping[str, Any] | None = None,
        grad: GradConfig | Mapping[str, Any] | None = None,
        n_states: int = 1,
        indexing: list[int] | tuple[int, ...] = (),
    ):
        super().__init__()
        self.solver_cfg = to_config(SolverConfig, solver, "solver")
        self.grad_cfg = to_config(GradConfig, grad, "grad")
        self.core_cfg = CoreConfig(n_states=n_states, indexing=list(indexing))
        self.grad_cfg.steps_for(self.core_cfg.sampled())  # one step count, or one per state
        self.solve = get_solver(self.solver_cfg.name)
        self.solver_kwargs = self.solver_cfg.solver_kwargs()
        self.captured = (
            CapturedSolver(self.solve, self.solver_cfg.name) if self.solver_cfg.capture else None
        )
        self._warned_capture = False  # capture asked for on a CPU: said once per layer
        self.mode = GRAD_MODES.get(self.grad_cfg.name)
        if self.mode.solver is not None:  # the mode differentiates that solver's iteration
            if self.solver_cfg.name != self.mode.solver:
                raise ValueError(
                    f"grad={self.grad_cfg.name} differentiates the {self.mode.solver} solver's own "
                    f"iteration: set solver.name={self.mode.solver}, not {self.solver_cfg.name}"
                )
            if self.core_cfg.sampled() > 1:
                raise ValueError(
                    f"grad={self.grad_cfg.name} returns one state, the solve's own: set "
                    "core.n_states=1 and core.indexing=[]"
                )
            self.solver_kwargs = {**self.solver_kwargs, **self.mode.solver_options}

    def extra_repr(self) -> str:
        s, g, c = self.solver_cfg, self.grad_cfg, self.core_cfg
        return (
            f"solver={s.name}(max_iter={s.max_iter}, tol={s.tol}), grad={g.name}, "
            f"n_states={c.n_states}, indexing={c.indexing}"
        )

    def max_iter_for_training(self) -> int:
        return self.solver_cfg.max_iter

    def keeps_budgets(self) -> bool:
        """Whether an evaluation solve can keep per-budget states (``budgets=``): its solver
        takes the option, and the solve is not replayed from CUDA graphs."""
        s = self.solver_cfg
        return self.captured is None and not s.fallback and takes(s.name, "budgets")

    def budget(self, cfg: SolverConfig | None = None) -> int:
        cfg = cfg or self.solver_cfg
        return cfg.max_iter if self.training else cfg.eval_budget()

    def call_config(self, options: Mapping[str, Any]) -> SolverConfig:
        """This call's solver settings: the layer's, with ``options`` in place of its fields
        (``tol``, ``stop_mode``, ``m``, ``tau``, ...; a solver's own options join
        ``options``), checked as a config is. The solver itself is the layer's."""
        if not options:
            return self.solver_cfg
        fixed = sorted(
            {"name", "capture", "options", "fallback", "fallback_options", "per_solver"}
            & set(options)
        )
        if fixed:
            raise ValueError(
                f"{fixed} cannot change per call: they are the layer's (build another DEQ, "
                "or set them in its solver config)"
            )
        named = {f.name for f in fields(self.solver_cfg)}
        own = {k: v for k, v in options.items() if k not in named}
        return replace(
            self.solver_cfg,
            **{k: v for k, v in options.items() if k in named},
            options={**self.solver_cfg.options, **own},
        )

    def sample_steps(self, budget: int) -> list[int]:
        """Solver steps of the sampled states, TorchDEQ's rule; the last is the budget."""
        c = self.core_cfg
        if c.n_states > 1:
            n = min(budget, c.n_states)
            delta = budget // n
            return [budget - (n - k - 1) * delta for k in range(n)]
        return [k for k in c.indexing if k < budget] + [budget]

    def run_solver(
        self,
        f: Callable[[State], State],
        z0: State,
        budget: int,
        save_at: list[int],
        cfg: SolverConfig | None = None,
        budgets: list[int] | None = None,
    ) -> SolverResult:
        s = cfg or self.solver_cfg
        kwargs = self.solver_kwargs if s is self.solver_cfg else s.solver_kwargs()
        if budgets:
            kwargs = {**kwargs, "budgets": budgets}
        solve = self.solve
        if self.captured is not None:
            if as_tuple(z0)[0].is_cuda:
                solve = self.captured
            elif not self._warned_capture:
                warnings.warn(
                    "solver.capture: CUDA graphs need a CUDA device; on "
                    f"{as_tuple(z0)[0].device.type} the solve runs eagerly (testing every "
                    f"{s.check_every} steps)",
                    stacklevel=3,
                )
                self._warned_capture = True
        with torch.no_grad():
            res = solve(
                f,
                leaf(z0, False),
                max_iter=budget,
                tol=s.tol,
                stop_mode=s.stop_mode,
                save_at=save_at,
                **kwargs,
            )
        _warn_nonfinite(res, s.name)
        if s.fallback and not bool(res.converged.all()):
            with torch.no_grad():
                res = fall_back(f, res, budget, s)
            if res.nonfinite:
                _warn_nonfinite(res, f"{s.name} and its fallbacks {s.fallback}")
        return res

    def attach(
        self,
        f: Callable[[State], State],
        z_star: State,
        info: DEQInfo,
        steps: int,
        last: bool,
        jac_vecs: int,
    ) -> list[State]:
        """The gradient mode at one sampled state; ``last``: the equilibrium itself."""
        mode = self.mode if last or not self.mode.at_equilibrium else GRAD_MODES.get("phantom")
        jac = last and jac_vecs > 0
        z = leaf(z_star, mode.needs_z_grad or jac)
        # ift's backward solve takes many products through f(z*): recomputing f for each
        # would cost more than it saves, so only the unrolled modes checkpoint f
        fz = evaluate(f, z, self.grad_cfg.mem_gc and not mode.at_equilibrium and not jac)
        if jac:
            info.jac_loss = jacobian_loss(fz, z, vecs=jac_vecs)
        return mode.fn(f, z, fz, self.grad_cfg, steps, info.backward.append)

    def forward(
        self,
        f: Callable[[State], State],
        z0: State,
        *,
        max_iter: int | None = None,
        jac_vecs: int = 0,
        **solver_options: Any,
    ) -> tuple[State, DEQInfo]:
        """Solve z* = f(z*) from z0 and attach the configured gradient.

        Args:
            f: the map whose fixed point is sought (a cell with its input bound:
                :class:`~deqlab.bound.Bound`, or any callable z -> z).
            z0: the initial state: a tensor, or a tuple/list of tensors sharing the batch dim.
            max_iter: overrides this call's forward budget (e.g. a jittered budget).
            jac_vecs: if > 0, ``info.jac_loss`` holds the Hutchinson estimate of
                ||J_f(z*)||_F^2 / dim with this many probe vectors, differentiable.
            solver_options: this call's solver settings in place of the layer's, e.g.
                ``deq(f, z0, tol=1e-6, m=8)`` (see :meth:`call_config`), and ``budgets``:
                without a gradient, step counts k <= the budget for which ``info.at_budget[k]``
                holds what a solve with ``max_iter=k`` returns (a budget curve in one solve).

        Returns:
            The equilibrium (with the gradient attached when grad is enabled) and a
            :class:`DEQInfo`: the solve's statistics, the sampled ``states`` the loss reads,
            and the backward solves' statistics once ``backward()`` has run.
        """
        budgets = solver_options.pop("budgets", None)
        cfg = self.call_config(solver_options)
        budget = max_iter or self.budget(cfg)
        track = torch.is_grad_enabled()
        if budgets:
            check_budgets(budgets, budget, track, cfg)
        at = self.sample_steps(budget) if track else [budget]
        with parametrize.cached():
            res = self.run_solver(f, z0, budget, at[:-1], cfg, budgets)
        info = DEQInfo.from_result(res)
        if not track:
            info.states = [res.z]
            return res.z, info
        if self.mode.solver is not None:  # the solver's own iteration, differentiated
            with parametrize.cached():
                if jac_vecs > 0:
                    z = leaf(res.z, True)
                    info.jac_loss = jacobian_loss(f(z), z, vecs=jac_vecs)
            info.states = self.mode.fn(f, z0, res, self.grad_cfg, info.backward.append)  # type: ignore[call-arg]
            return info.states[-1], info
        steps = self.grad_cfg.steps_for(len(at))
        # A second cache: the solve above ran without a tape, so its cached weights carry no
        # graph; these do, and serve every recorded f evaluation below.
        with parametrize.cached():
            for i, z_k in enumerate([*res.saved, res.z]):
                info.states += self.attach(f, z_k, info, steps[i], i == len(at) - 1, jac_vecs)
        return info.states[-1], info


class SlicedDEQ(DEQ):
    """TorchDEQ's ``sliced`` core: the budget is cut into segments (``n_states`` equal ones,
    or at the steps in ``indexing``); each segment is solved without a tape from where the
    previous one ended, the gradient mode is applied at its end, and the next segment starts
    from that output. Each segment's graph is its own: the solve between segments records
    nothing. The returned statistics are the last segment's, with ``nfe`` and ``trace`` over
    all segments. In eval mode it is one solve, exactly as :class:`DEQ`.

    Args:
        *args: as :class:`DEQ` (``solver``, ``grad``, ``n_states``, ``indexing``).
        **kwargs: as :class:`DEQ`.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.mode.solver is not None:
            raise ValueError(
                f"grad={self.grad_cfg.name} reverses one solve from its start; core=sliced "
                "restarts the solve between segments: use core=indexing"
            )

    def segments(self, budget: int) -> list[int]:
        c = self.core_cfg
        if c.n_states > 1:
            return [max(1, budget // c.n_states)] * c.n_states
        ends = [k for k in c.indexing if k < budget] + [budget]
        return [b - a for a, b in zip([0, *ends[:-1]], ends)]

    def forward(
        self,
        f: Callable[[State], State],
        z0: State,
        *,
        max_iter: int | None = None,
        jac_vecs: int = 0,
        **solver_options: Any,
    ) -> tuple[State, DEQInfo]:
        """Solve segment by segment (class docstring).

        Args:
            f: the map whose fixed point is sought.
            z0: the initial state.
            max_iter: overrides this call's forward budget, shared out over the segments.
            jac_vecs: probe vectors of the Jacobian penalty at each segment's end (0: none).
            **solver_options: this call's solver settings, as for :meth:`DEQ.forward`.

        Returns:
            The last segment's output and its :class:`DEQInfo` (``nfe``, ``trace`` and
            ``states`` over all segments).
        """
        if not torch.is_grad_enabled():
            return super().forward(f, z0, max_iter=max_iter, **solver_options)
        cfg = self.call_config(solver_options)
        segments = self.segments(max_iter or self.budget(cfg))
        steps = self.grad_cfg.steps_for(len(segments))
        states: list[State] = []
        nfe, traces, backward = 0, [], []
        z = z0
        for i, budget in enumerate(segments):
            with parametrize.cached():
                res = self.run_solver(f, z, budget, [], cfg)
            nfe, traces = nfe + res.nfe, [*traces, res.trace]
            info = DEQInfo.from_result(res, backward=backward)  # one list for every segment
            with parametrize.cached():
                out = self.attach(f, res.z, info, steps[i], i == len(segments) - 1, jac_vecs)
            states += out
            z = out[-1]
        info.nfe, info.trace, info.states = nfe, torch.cat(traces), states
        return states[-1], info


def _check_core(name: str, cls: Any) -> None:
    if not (isinstance(cls, type) and callable(cls)):
        raise TypeError(f"core {name!r} must be a class, got {type(cls).__name__}")


CORES: Registry[type] = Registry("core", "add your own with deqlab.register_core", _check_core)


def register_core(name: str, cls: type) -> type:
    """Make ``cls`` available as ``core=<name>`` / ``core.name=<name>``.

    Args:
        name: the name configs use.
        cls: a class built as ``cls(solver=SolverConfig, grad=GradConfig, n_states=...,
            indexing=..., **options)`` whose instances implement :class:`Core`.

    Returns:
        ``cls``.
    """
    return CORES.register(name, cls)


def build_core(
    core: CoreConfig | Mapping[str, Any] | nn.Module | None,
    solver: SolverConfig | Mapping[str, Any] | None,
    grad: GradConfig | Mapping[str, Any] | None,
) -> nn.Module:
    """The core a config names.

    Args:
        core: the ``core`` settings (:class:`CoreConfig` or a mapping; None: ``indexing``),
            or a built core (e.g. from a ``_target_``), which passes through.
        solver: the forward solver's settings.
        grad: the gradient mode's settings.

    Returns:
        The core, an ``nn.Module`` implementing :class:`Core`.
    """
    if isinstance(core, nn.Module):
        if not isinstance(core, Core):
            raise TypeError(
                f"{type(core).__name__} is not a DEQ core: it needs forward(f, z0, *, max_iter, "
                "jac_vecs, **solver_options) -> (z, DEQInfo) and max_iter_for_training() (see "
                "deqlab.core.Core)"
            )
        return core
    c = to_config(CoreConfig, core, "core")
    cls = CORES.get(c.name)
    built = cls(
        solver=to_config(SolverConfig, solver, "solver"),
        grad=to_config(GradConfig, grad, "grad"),
        n_states=c.n_states,
        indexing=c.indexing,
        **c.options,
    )
    return build_core(built, None, None)


register_core("indexing", DEQ)
register_core("sliced", SlicedDEQ)
# TorchDEQ itself behind the same interface, loaded when first asked for (it imports this module)
CORES.register_lazy("torchdeq", "deqlab.compat.torchdeq:TorchDEQCore")
