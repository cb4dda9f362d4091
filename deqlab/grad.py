"""Gradient modes: how the loss gradient reaches f's parameters and inputs through z*.

All modes start from the same pair: z (z* detached, as a fresh leaf) and fz = f(z), the one
f evaluation recorded on the autograd tape.

- ``ift``: exact implicit gradient (Bai et al., 2019). With u = dL/dz*, the backward pass
  solves the linear fixed point g = J_f(z*)^T g + u with a root solver, using vector-Jacobian
  products of the recorded fz, then sends g through fz to the parameters and inputs. The
  returned value is z* itself, so the forward statistics describe exactly what is returned.
  The reference implementations differ in three details, each an option here so that a
  published recipe can be reproduced: they return one more step, f(z*) (``output: fz``; the
  DEQ and MDEQ code, TorchDEQ, the implicit-layers tutorial); the tutorial and TorchDEQ's
  default evaluate the backward Jacobian at that f(z*) (``jacobian_at: fz``, one more f
  evaluation in the backward pass); and all but the tutorial start the backward solve from 0
  (``solve_from: zeros``) where deqlab starts from u, one fixed-point step further.
- ``phantom``: k damped unrolled steps z <- tau f(z) + (1 - tau) z from z*, differentiated by
  ordinary backprop through those k steps only (Geng et al., 2021). Returns the k-th step.
- ``onestep``: Jacobian-free backprop, one step of f at z* (Fung et al., 2022). Returns f(z*).

Second derivatives (``create_graph=True``) are exact under ``ift`` when f is a
:class:`~deqlab.bound.Bound` or an ``nn.Module`` (:func:`differentiable_backward`); phantom and
onestep give their own steps' second derivatives, as ordinary autograd graphs.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .bound import differentiable_inputs
from .registry import Registry
from .solvers import SolverResult, get_solver, solver_options
from .solvers.capture import CapturedSolver, split_bound
from .solvers.checks import check_common
from .state import State, as_tuple, leaf, like, mix


class DivergenceWarning(UserWarning):
    """A solve met non-finite iterates; the best finite iterate was used instead."""


class UnreadSettingWarning(UserWarning):
    """A setting away from its default that the chosen gradient mode does not read."""


@dataclass
class GradConfig:
    """Gradient mode settings (the ``grad`` config group).

    ``solver``, ``max_iter``, ``tol``, ``stop_mode`` and ``solver_options`` (the backward
    solver's own options, e.g. ``{memory: 40}``) configure the ``ift`` backward solve;
    ``per_solver`` holds options by backward solver name, used when ``solver`` is that one (an
    experiment's way to give them so that ``grad.solver=<another>`` still composes; keys set in
    ``solver_options`` win); ``output``,
    ``jacobian_at`` and ``solve_from`` choose between deqlab's form and the references' (see
    the module docstring). ``steps`` and ``tau`` configure ``phantom`` (and, under ift, the
    states a core samples before the last, as in TorchDEQ). ``steps`` may be a list: one step
    count per sampled state. ``sup_gap`` / ``sup_loc`` make phantom return intermediate steps
    too: every ``sup_gap``-th step, or the steps listed in ``sup_loc`` (always ending with the
    last). ``options``: a user's gradient mode's own settings (it reads ``cfg.options``), so a
    new mode needs no field here.
    """

    name: str = "ift"
    solver: str = "anderson"
    max_iter: int = 30
    tol: float | None = 1e-4  # None: exactly max_iter backward steps
    stop_mode: str = "rel"
    solver_options: dict[str, Any] = field(default_factory=dict)
    per_solver: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: str = "z"  # z | fz
    jacobian_at: str = "z"  # z | fz
    solve_from: str = "grad"  # grad | zeros
    steps: Any = None  # int, or list[int]: one per sampled state; None: the mode's default
    tau: float | None = None  # None: the mode's default
    sup_gap: int = -1
    sup_loc: list[int] = field(default_factory=list)
    mem_gc: bool = False
    check_every: int = 1  # read the backward solve's convergence test every k steps
    capture: bool = False  # replay the backward solve as CUDA graphs (see implicit)
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        mode = GRAD_MODES.get(self.name)  # raises with the list of known modes
        unread = [
            f.name
            for f in fields(self)
            if not mode.reads(f.name) and getattr(self, f.name) != _default(f)
        ]
        if unread:
            # Not refused: the modes' settings nest (ift reads phantom's for sampled states),
            # experiments pin ift's backward solve, and grad=phantom on such an experiment is
            # an ablation a researcher runs. Said, so that nothing set is ignored unseen.
            warnings.warn(
                f"grad={self.name} does not read "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in unread)
                + f" (it reads {', '.join(mode.settings or ())}{' and ' if mode.settings else ''}"
                f"{', '.join(EVERY_MODE)}): those settings have no effect",
                UnreadSettingWarning,
                stacklevel=3,
            )
        if self.steps is None:
            self.steps = mode.defaults.get("steps", 1)
        if self.tau is None:
            self.tau = mode.defaults.get("tau", 1.0)
        for name, opts in self.per_solver.items():
            theirs = solver_options(name)  # raises with the list of known solvers
            stray = sorted(set(opts) - set(theirs))
            if stray:
                raise ValueError(
                    f"grad.per_solver.{name} sets {stray}, which solver {name!r} does not take; "
                    f"its options are {sorted(theirs)}"
                )
        self.solver_options = {**self.per_solver.get(self.solver, {}), **self.solver_options}
        accepted = solver_options(self.solver)  # raises with the list of known solvers
        unknown = sorted(set(self.solver_options) - set(accepted))
        if unknown:
            raise ValueError(
                f"grad.solver_options: backward solver {self.solver!r} takes no option(s) {unknown}; "
                f"its options are {sorted(accepted)}"
            )
        if "check_every" in self.solver_options:
            raise ValueError(
                "grad.solver_options.check_every: set grad.check_every (as solver.check_every)"
            )
        if (self.capture or self.check_every != 1) and "check_every" not in accepted:
            raise ValueError(
                f"grad.capture / grad.check_every: backward solver {self.solver!r} does not "
                "report its steps to deqlab's Tracker (it takes no check_every), so its tests "
                "can be neither deferred nor captured; set grad.check_every=1 and "
                "grad.capture=false, or use a built-in solver"
            )
        if (self.capture or self.check_every != 1) and self.solver_options.get("ls"):
            raise ValueError(
                "grad.solver_options.ls reads its Armijo test back at every trial: set "
                "grad.check_every=1 and grad.capture=false, or ls=false"
            )
        for key, allowed in (
            ("output", ("z", "fz")),
            ("jacobian_at", ("z", "fz")),
            ("solve_from", ("grad", "zeros")),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"grad.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        if self.jacobian_at == "fz" and self.output != "fz":
            raise ValueError(
                "grad.jacobian_at=fz evaluates J at the returned f(z*): set grad.output=fz"
            )
        if self.tol is not None and not self.tol > 0:
            raise ValueError(
                f"grad.tol must be > 0 (or null: exactly max_iter steps), got {self.tol}"
            )
        try:
            check_common(self.max_iter, self.tol, self.stop_mode, self.check_every)
        except ValueError as e:
            raise ValueError(f"grad.{e}") from None
        steps = self.step_list()
        if not steps or not all(isinstance(k, int) and k >= 1 for k in steps):
            raise ValueError(f"grad.steps must be an int >= 1 or a list of them, got {self.steps}")
        if not 0 < self.tau <= 1:
            raise ValueError(f"grad.tau must lie in (0, 1], got {self.tau}")
        if any(k < 1 for k in self.sup_loc):
            raise ValueError(f"grad.sup_loc lists steps >= 1, got {self.sup_loc}")

    def step_list(self) -> list[int]:
        return list(self.steps) if isinstance(self.steps, (list, tuple)) else [self.steps]

    def steps_for(self, n_states: int) -> list[int]:
        """Phantom steps for each of ``n_states`` sampled states (one value serves all)."""
        steps = self.step_list()
        if len(steps) == 1:
            return steps * n_states
        if len(steps) != n_states:
            raise ValueError(
                f"grad.steps lists {len(steps)} step counts for {n_states} sampled states; "
                "give one count, or one per state"
            )
        return steps


# The GradConfig fields every gradient mode has: mem_gc is read by the core and the unrolled
# pre-training, options by a user's mode.
EVERY_MODE = ("name", "mem_gc", "options")


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


class GradFn(Protocol):
    """A gradient mode: from z (z* detached, a fresh leaf) and fz = f(z) recorded from it,
    return the states the loss reads, the last being the layer's output. ``steps`` is this
    state's phantom step count; ``on_backward`` receives a backward solve's statistics."""

    def __call__(
        self,
        f: Callable[[State], State],
        z: State,
        fz: State,
        cfg: GradConfig,
        steps: int,
        on_backward: Callable[[SolverResult], None],
    ) -> list[State]: ...


@dataclass
class GradMode:
    """A registered gradient mode. ``needs_z_grad``: z must require grad (the mode
    differentiates f at z). ``at_equilibrium``: only valid at a fixed point (ift's linear
    solve); states sampled earlier on the trajectory get a phantom gradient instead.
    ``defaults``: the mode's own values of ``GradConfig`` fields left unset (``steps``,
    ``tau``), so ``grad={"name": m}`` in Python and ``grad=m`` on the command line agree.
    ``solver``: set for a mode that differentiates that solver's own iteration (``reversible``);
    the core then calls ``fn(f, z0, result, cfg, on_backward)`` with the solve's
    :class:`SolverResult` and uses its one returned state. ``settings``: the ``GradConfig``
    fields the mode reads besides those every mode has (:data:`EVERY_MODE`); a config that
    sets another away from its default is refused. ``None``: any field (a mode registered
    without saying). ``solver_options``: options the core passes to that solver for this
    mode (``shine``: Broyden's ``keep_inverse``)."""

    fn: GradFn
    needs_z_grad: bool = False
    at_equilibrium: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    solver: str | None = None
    settings: tuple[str, ...] | None = None
    solver_options: dict[str, Any] = field(default_factory=dict)

    def reads(self, key: str) -> bool:
        """Whether a config of this mode may set the ``GradConfig`` field ``key``."""
        return self.settings is None or key in EVERY_MODE or key in self.settings


def _check_mode(name: str, mode: Any) -> None:
    if not isinstance(mode, GradMode):
        raise TypeError(
            f"gradient mode {name!r} must be a deqlab.grad.GradMode, got {type(mode).__name__} "
            "(wrap a function as GradMode(fn))"
        )


GRAD_MODES: Registry[GradMode] = Registry(
    "gradient mode", "add your own with deqlab.register_grad", _check_mode
)


def register_grad(
    name: str,
    fn: GradFn,
    *,
    needs_z_grad: bool = False,
    at_equilibrium: bool = False,
    defaults: dict[str, Any] | None = None,
    settings: tuple[str, ...] | None = None,
) -> GradMode:
    """Make ``fn`` available as ``grad.name=<name>``.

    Args:
        name: the name configs use.
        fn: the mode (:class:`GradFn`): from z (z* detached, a fresh leaf) and fz = f(z),
            the states the loss reads.
        needs_z_grad: z must require grad (the mode differentiates f at z).
        at_equilibrium: only valid at a fixed point; states sampled earlier get a phantom
            gradient instead.
        defaults: its values for the ``GradConfig`` fields a config leaves unset.
        settings: the ``GradConfig`` fields it reads besides ``name``, ``mem_gc`` and
            ``options`` (``None``: any); the others are refused when set.

    Returns:
        The registered :class:`GradMode`.
    """
    mode = GradMode(fn, needs_z_grad, at_equilibrium, dict(defaults or {}), settings=settings)
    return GRAD_MODES.register(name, mode)


class _ImplicitGrad(torch.autograd.Function):
    """Returns z* in the forward pass. Its backward pass maps dL/dz* to the IFT vector g and
    hands it to fz, whose recorded graph carries it on to the parameters and inputs. Asked for
    a graph of that backward (``create_graph=True``), it hands fz nothing and returns, from
    ``twice``, the gradients of the tensors f reads (``inputs``) as a graph that differentiates
    again (:func:`differentiable_backward`)."""

    @staticmethod
    def forward(ctx, backward_solve, twice, n_fz, z_star, *fz_and_inputs):  # type: ignore[override]
        ctx.backward_solve, ctx.twice = backward_solve, twice
        ctx.n_fz, ctx.n_inputs = n_fz, len(fz_and_inputs) - n_fz
        return tuple(z.clone() for z in z_star)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: a second derivative is asked for
            return (None,) * (4 + ctx.n_fz) + tuple(ctx.twice(grads))
        return (None,) * 4 + tuple(ctx.backward_solve(grads)) + (None,) * ctx.n_inputs


def implicit(
    z_star: State,
    z: State,
    fz: State,
    cfg: GradConfig,
    on_backward: Callable[[SolverResult], None],
    f: Callable[[State], State] | None = None,
    start: Callable[[tuple[Tensor, ...]], tuple[Tensor, ...]] | None = None,
    refuse_twice: str | None = None,
) -> State:
    """``grad=ift``: attach the exact implicit gradient to z* (module docstring).

    Args:
        z_star: the equilibrium whose values are returned (``cfg.output == "fz"``: fz's).
        z: z* as a leaf that requires grad.
        fz: f(z), recorded from ``z``.
        cfg: the gradient settings: the backward solver, its budget, tol and options.
        on_backward: receives the backward solve's :class:`SolverResult`.
        f: needed for ``cfg.jacobian_at == "fz"`` (J is then taken at f(z*), recorded during
            the backward pass) and for second derivatives (a :class:`~deqlab.bound.Bound` or
            an ``nn.Module``, whose inputs and parameters the second derivative reaches).
        start: the backward solve's start from u = dL/dz* (``shine``: its estimate of g);
            None: ``cfg.solve_from``.
        refuse_twice: the error a second derivative meets (a mode whose gradient is not
            ift's); None: differentiate twice when f allows it.

    Returns:
        A state with z*'s values whose gradient is the implicit function theorem's:
        dL/dtheta = (dL/dz*) (I - J_f)^-1 df/dtheta.
    """
    z_parts, fz_parts = as_tuple(z), as_tuple(fz)
    solve = get_solver(cfg.solver)
    if cfg.jacobian_at == "fz" and f is None:
        raise ValueError("implicit: jacobian_at=fz needs f")
    inputs: list[Tensor] = []
    if refuse_twice is None and cfg.jacobian_at == "fz":
        refuse_twice = (
            "grad.jacobian_at=fz takes J at f(z*) (the references' approximation), whose "
            "derivative is not the implicit function's: set grad.jacobian_at=z for second "
            "derivatives"
        )
    if refuse_twice is None:
        try:
            inputs = differentiable_inputs(f, "grad=ift, differentiating twice,")[1]  # type: ignore[arg-type]
        except TypeError as e:
            refuse_twice = str(e)

    # The backward pass runs outside the forward's autocast region: the evaluation recorded
    # there (jacobian_at=fz) re-enters it, so a bf16 cell sees the precision it was trained in.
    device = z_parts[0].device.type
    precision = {
        "device_type": device,
        "dtype": torch.get_autocast_dtype(device),
        "enabled": torch.is_autocast_enabled(device),
    }

    # grad.capture; a second derivative's solve for the adjoint's own gradient (no f) runs eagerly
    replay = captured_adjoint(f, cfg, z_parts[0].device) if cfg.capture and f is not None else None

    def backward_solve(u: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        # u = dL/dz*; autograd hands zeros for a part of the state the loss does not use
        if start is not None:
            first = start(u)
        elif cfg.solve_from == "grad":
            first = u
        else:
            first = tuple(torch.zeros_like(p) for p in u)
        kwargs = dict(
            max_iter=cfg.max_iter, tol=cfg.tol, stop_mode=cfg.stop_mode, **cfg.solver_options
        )
        if cfg.check_every != 1:  # only the solvers that take it (checked in GradConfig)
            kwargs["check_every"] = cfg.check_every
        if replay is not None:  # J taken at the same point, by an f(z*) recorded in the graph
            point = fz_parts if cfg.jacobian_at == "fz" else z_parts
            res = replay_adjoint(replay, f, z, point, u, first, precision, kwargs)
        else:
            at, f_at = z_parts, fz_parts
            if cfg.jacobian_at == "fz":  # J_f at f(z*): one more recorded evaluation
                with torch.enable_grad(), torch.autocast(**precision):
                    at = tuple(p.detach().requires_grad_() for p in fz_parts)
                    f_at = as_tuple(f(like(z, at)))  # type: ignore[misc]
            res = solve(adjoint_map(f_at, at, u, z), like(z, first), **kwargs)
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

    def twice(u: tuple[Tensor, ...]) -> tuple[Tensor | None, ...]:
        if refuse_twice is not None:
            raise RuntimeError(refuse_twice)
        with torch.no_grad():
            g_star = backward_solve(tuple(p.detach() for p in u))
        return differentiable_backward(f, z, u, like(z, g_star), cfg, on_backward)  # type: ignore[arg-type]

    values = fz_parts if cfg.output == "fz" else as_tuple(z_star)
    out = _ImplicitGrad.apply(
        backward_solve,
        twice,
        len(fz_parts),
        tuple(v.detach() for v in values),
        *fz_parts,
        *inputs,
    )
    return like(z_star, out)


def adjoint_map(
    f_at: tuple[Tensor, ...], at: tuple[Tensor, ...], u: tuple[Tensor, ...], template: State
) -> Callable[[State], State]:
    """The backward fixed-point map g -> J^T g + u, J the Jacobian of f at ``at`` (``f_at``
    recorded from it), its products vector-Jacobian products of that one evaluation."""

    def step(g: State) -> State:
        jt_g = torch.autograd.grad(f_at, at, as_tuple(g), retain_graph=True)
        return like(template, [a + b for a, b in zip(jt_g, u)])

    return step


# grad.capture's recordings, per cell and backward solver, kept as long as the cell lives
_ADJOINT_RECORDINGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def captured_adjoint(
    f: Callable[[State], State], cfg: GradConfig, device: torch.device
) -> CapturedSolver | None:
    """``grad.capture``: the replayer of f's cell's backward solves; None off CUDA, where the
    solve runs eagerly (said once per cell). A closure is refused on any device, so that a
    configuration is checked before it meets a GPU."""
    cell, _ = split_bound(f, "grad.capture")
    per_cell = _ADJOINT_RECORDINGS.get(cell)
    if per_cell is None:
        per_cell = _ADJOINT_RECORDINGS[cell] = {}
        if device.type != "cuda":
            warnings.warn(
                f"grad.capture: CUDA graphs need a CUDA device; on {device.type} the backward "
                "solve runs eagerly",
                stacklevel=4,
            )
    if device.type != "cuda":
        return None
    if cfg.solver not in per_cell:
        per_cell[cfg.solver] = CapturedSolver(get_solver(cfg.solver), cfg.solver, "grad.capture")
    return per_cell[cfg.solver]


def replay_adjoint(
    replay: CapturedSolver,
    f: Callable[[State], State],
    z: State,
    point: tuple[Tensor, ...],
    u: tuple[Tensor, ...],
    first: tuple[Tensor, ...],
    precision: dict[str, Any],
    kwargs: dict[str, Any],
) -> SolverResult:
    """The backward solve g = J^T g + u replayed from CUDA graphs. The recording starts with
    one evaluation of f at ``point`` (in the forward's precision), whose graph the solve's
    vector-Jacobian products then run backward: J is taken where the eager solve takes it,
    and the tensors that change between steps (point, u, f's inputs) are copied in."""
    cell, args = split_bound(f, "grad.capture")

    def make(point: tuple, u: tuple, *args: Any) -> tuple[Callable[[State], State], Any]:
        check_running_stats(cell)  # run when recording only
        with torch.enable_grad(), torch.autocast(**precision, cache_enabled=False):
            at = tuple(p.detach().requires_grad_() for p in point)
            f_at = as_tuple(cell(like(z, at), *args))
        return adjoint_map(f_at, at, u, z), f_at

    tag = ("adjoint", getattr(cell, "training", None), tuple(precision.values()))
    inputs = (tuple(p.detach() for p in point), tuple(u), *args)
    return replay.replay(tag, make, like(z, first), inputs, kwargs)


def check_running_stats(cell: Any) -> None:
    """Refuse a training cell whose evaluation updates running statistics (BatchNorm): the
    captured backward evaluates f once more per step than the eager one, which would move
    them once more."""
    if not isinstance(cell, torch.nn.Module) or not cell.training:
        return
    for name, m in cell.named_modules():
        if getattr(m, "track_running_stats", False) and m.training:
            raise ValueError(
                f"grad.capture evaluates f(z*) once more per backward pass, and "
                f"{type(m).__name__} {name!r} updates its running statistics at each "
                "evaluation in training: set grad.capture=false, or use a norm without "
                "running statistics (GroupNorm, LayerNorm)"
            )


THIRD_DERIVATIVE = (
    "grad=ift gives first and second derivatives: a third (create_graph=True through a "
    "second derivative) would need the adjoint's own backward solve differentiated, which "
    "deqlab does not do"
)


def differentiable_backward(
    f: Callable[[State], State],
    z: State,
    u: tuple[Tensor, ...],
    g_star: State,
    cfg: GradConfig,
    on_backward: Callable[[SolverResult], None],
) -> tuple[Tensor | None, ...]:
    """ift's backward pass as a graph that differentiates again: dL/dtheta =
    (df/dtheta)^T g at z*(theta), with (I - J^T) g = u, for the tensors theta f reads
    (:func:`~deqlab.bound.differentiable_inputs`).

    Each implicit quantity carries its own implicit derivative, so nothing is unrolled:

    - z*(theta) is z* with ift's gradient attached (:func:`implicit` again);
    - g solves the linear fixed point g = J(z*, theta)^T g + u; it is ``g_star`` (solved
      already) with the implicit gradient of that fixed point attached. Differentiating
      g = (I - J^T)^-1 u gives, for an outer adjoint v of g, w = (I - J)^-1 v (the products J w
      are vector-Jacobian products of the recorded J^T g, i.e. forward-mode through reverse),
      then dL/du = w and dL/d(z, theta) = d/d(z, theta) [g^T J(z, theta) w];
    - df/dtheta is a partial derivative at z*(theta): f runs on stand-ins for theta (views
      of them), which only this evaluation reads.

    The first derivative's value is the one :func:`implicit` computes; its graph costs two
    more f evaluations, and the second backward pass two more linear solves (one for z*'s
    gradient, one for g's), each with ``cfg``'s backward solver and budget.

    Args:
        f: the map (a :class:`~deqlab.bound.Bound` or an ``nn.Module``).
        z: z*.
        u: dL/dz*, with its own graph (the outer loss's dependence on z*).
        g_star: the solution of the backward fixed point for ``u``.
        cfg: the backward solve's settings, used for both new solves.
        on_backward: receives each backward solve's statistics.

    Returns:
        The gradients of the tensors f reads, in :func:`differentiable_inputs`' order (None
        where f does not read one).

    Raises:
        RuntimeError: f reads a tensor that needs a gradient outside those (a closure over
            it): its derivatives would be missed.
    """
    f_of, inputs = differentiable_inputs(f)
    stand_ins = [t.view_as(t) for t in inputs]
    z_in = leaf(z, True)
    z_theta = as_tuple(implicit(z, z_in, f(z_in), cfg, on_backward, f))
    fz = as_tuple(f_of(like(z, z_theta), stand_ins))
    hidden = unlisted_leaves(fz, stand_ins, stop=[p.grad_fn for p in z_theta])
    if hidden:
        raise RuntimeError(
            f"f reads {len(hidden)} tensor(s) that need a gradient besides its Bound inputs "
            f"and its module's parameters (shapes {[tuple(t.shape) for t in hidden]}): grad=ift "
            "differentiates twice only through what it sees. Pass them as inputs, "
            "deqlab.Bound(cell, *inputs), or make them parameters of the cell"
        )

    def adjoint_step(g: State) -> State:  # g -> J(z*, theta)^T g + u, recorded
        jt = torch.autograd.grad(
            fz, z_theta, as_tuple(g), create_graph=True, retain_graph=True, allow_unused=True
        )
        return like(z, [b if a is None else a + b for a, b in zip(jt, u)])

    g_in = leaf(g_star, True)
    g = implicit(g_star, g_in, adjoint_step(g_in), cfg, on_backward, refuse_twice=THIRD_DERIVATIVE)
    grads = torch.autograd.grad(
        fz, stand_ins, as_tuple(g), create_graph=True, retain_graph=True, allow_unused=True
    )
    return tuple(grads)


def unlisted_leaves(outputs: tuple[Tensor, ...], listed: list[Tensor], stop: list) -> list[Tensor]:
    """The leaves needing a gradient that the graph of ``outputs`` reaches without passing
    through a ``listed`` tensor or a ``stop`` node (what a closure hides from
    :func:`~deqlab.bound.differentiable_inputs`)."""
    listed_ids = {id(t) for t in listed}
    ends = {t.grad_fn for t in listed if t.grad_fn is not None} | {n for n in stop if n}
    seen: set = set()
    found: list[Tensor] = []
    todo = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in ends:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad: a leaf
        if variable is not None:
            if id(variable) not in listed_ids:
                found.append(variable)
            continue
        todo.extend(next_node for next_node, _ in node.next_functions)
    return found


def evaluate(f: Callable[[State], State], z: State, checkpointed: bool) -> State:
    """f(z), recorded for backward as it is or, ``checkpointed``, as its input only (f runs
    again in backward: :func:`torch.utils.checkpoint.checkpoint`, which restores the random
    state, so a dropout inside f draws the same mask)."""
    if checkpointed and torch.is_grad_enabled():
        return checkpoint(f, z, use_reentrant=False)
    return f(z)


def phantom(
    f: Callable[[State], State], z: State, fz: State, cfg: GradConfig, steps: int
) -> list[State]:
    """``grad=phantom``: ``steps`` damped steps z <- tau f(z) + (1 - tau) z from z, backpropagated
    through those steps only (Geng et al., 2021).

    TorchDEQ's ``sup_gap`` drops the last step when ``steps`` is not a multiple of the gap, and
    ``sup_loc`` repeats it when listed; here every step is returned once, the last one last.

    Args:
        f: the map, recorded at each step.
        z: z*, the start.
        fz: f(z), reused by the first step.
        cfg: the gradient settings (``tau``, ``sup_gap``, ``sup_loc``, ``mem_gc``).
        steps: the number of steps.

    Returns:
        The last step, preceded by the steps ``cfg.sup_gap`` / ``cfg.sup_loc`` ask for.
    """
    out, states = mix(z, fz, cfg.tau), []
    for k in range(1, steps + 1):
        if k > 1:
            out = mix(out, evaluate(f, out, cfg.mem_gc), cfg.tau)
        if k < steps and ((cfg.sup_gap > 0 and k % cfg.sup_gap == 0) or k in cfg.sup_loc):
            states.append(out)
    return [*states, out]


def _ift(f, z, fz, cfg, steps, on_backward):  # type: ignore[no-untyped-def]
    return [implicit(z, z, fz, cfg, on_backward, f)]


def _phantom(f, z, fz, cfg, steps, on_backward):  # type: ignore[no-untyped-def]
    return phantom(f, z, fz, cfg, steps)


def _onestep(f, z, fz, cfg, steps, on_backward):  # type: ignore[no-untyped-def]
    """``grad=onestep``: Jacobian-free backprop (Fung et al., 2022), f(z*) with z* detached."""
    return [fz]


# What each mode reads: phantom its unrolled steps; ift its backward solve, and the phantom
# settings for the states a core samples before the equilibrium (TorchDEQ's default for
# those: one undamped step); onestep nothing more.
PHANTOM_SETTINGS = ("steps", "tau", "sup_gap", "sup_loc")
BACKWARD_SETTINGS = (
    "solver",
    "max_iter",
    "tol",
    "stop_mode",
    "solver_options",
    "per_solver",
    "check_every",
    "capture",
)
IFT_SETTINGS = (*BACKWARD_SETTINGS, "output", "jacobian_at", "solve_from", *PHANTOM_SETTINGS)
register_grad(
    "ift",
    _ift,
    needs_z_grad=True,
    at_equilibrium=True,
    defaults={"steps": 1, "tau": 1.0},
    settings=IFT_SETTINGS,
)
register_grad("phantom", _phantom, defaults={"steps": 5, "tau": 0.5}, settings=PHANTOM_SETTINGS)
register_grad("onestep", _onestep, settings=())
# the reversible solver's exact gradient (deqlab/reversible_grad.py), loaded when first asked for
GRAD_MODES.register_lazy("reversible", "deqlab.reversible_grad:REVERSIBLE")
GRAD_MODES.register_lazy("shine", "deqlab.shine:SHINE")
