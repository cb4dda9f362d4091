"""``core=torchdeq``: the same call and statistics as deqlab's cores, computed by TorchDEQ.

It builds TorchDEQ's own DEQ (``torchdeq.get_deq``, Geng & Kolter, 2023) from deqlab's solver,
gradient and core configs, so any experiment can be rerun on the reference implementation to
compare results and speed (``pip install -e '.[torchdeq]'``). What maps onto what:

    solver.name fixed_point | anderson | broyden  ->  f_solver fixed_point_iter | anderson | broyden
    solver.max_iter, tol, stop_mode (abs, rel)     ->  f_max_iter, f_tol, f_stop_mode
    solver eval budget                             ->  eval_f_max_iter
    solver.m, lam, tau (anderson), ls (broyden)    ->  the solver's m, lam, tau, ls
    solver.return_final                            ->  return_final
    grad.name ift                                  ->  ift=True, b_solver, b_max_iter, b_tol, b_stop_mode
    grad.steps, tau, sup_gap, sup_loc              ->  grad, tau, sup_gap, sup_loc
    grad.name onestep                              ->  grad=1, tau=1.0
    core.n_states, indexing                        ->  n_states, indexing
    core.options.graph indexing | sliced           ->  TorchDEQ's core (default indexing)

TorchDEQ has no per-batch stop modes and no ``tol: null``; those are refused by name. Its own
forms apply whatever deqlab's options say: Anderson's lam is absolute (``solver.lam_mode``), and
its ift returns f(z*) with the backward Jacobian at f(z*), solved from 0 (``grad.output``,
``jacobian_at``, ``solve_from``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..core import DEQInfo, SolverConfig, to_config
from ..grad import GradConfig
from ..regularize import jacobian_loss
from ..solvers import SolverResult
from ..state import State, as_tuple, leaf, like

SOLVER_NAMES = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}
GRAPHS = ("indexing", "sliced")
# the solver options TorchDEQ's solvers share with ours, which it also takes per call
PER_CALL = ("m", "lam", "tau", "ls", "return_final")


def _torchdeq() -> Any:
    try:
        import torchdeq
    except ImportError:
        raise ImportError(
            "core=torchdeq runs TorchDEQ itself, which is not installed: "
            "pip install -e '.[torchdeq]' (or pip install torchdeq)"
        ) from None
    return torchdeq


def _solver_name(name: str, what: str) -> str:
    if name not in SOLVER_NAMES:
        raise ValueError(
            f"core=torchdeq: {what} {name!r} has no TorchDEQ counterpart; use one of {sorted(SOLVER_NAMES)}"
        )
    return SOLVER_NAMES[name]


def _stop_mode(mode: str, what: str) -> str:
    if mode not in ("abs", "rel"):
        raise ValueError(
            f"core=torchdeq: {what}.stop_mode={mode} has no TorchDEQ counterpart; use abs or rel"
        )
    return mode


class TorchDEQCore(nn.Module):
    """TorchDEQ's ``get_deq`` behind deqlab's :class:`deqlab.core.Core` interface."""

    def __init__(
        self,
        solver: SolverConfig | Mapping[str, Any] | None = None,
        grad: GradConfig | Mapping[str, Any] | None = None,
        n_states: int = 1,
        indexing: list[int] | tuple[int, ...] = (),
        graph: str = "indexing",
    ):
        super().__init__()
        torchdeq = _torchdeq()
        s = self.solver_cfg = to_config(SolverConfig, solver, "solver")
        g = self.grad_cfg = to_config(GradConfig, grad, "grad")
        if graph not in GRAPHS:
            raise ValueError(f"core=torchdeq: options.graph must be one of {GRAPHS}, got {graph!r}")
        if s.tol is None:
            raise ValueError("core=torchdeq: TorchDEQ always tests convergence; set solver.tol")
        if s.capture or s.check_every != 1:
            raise ValueError(
                "core=torchdeq: TorchDEQ reads its residual back at every step; "
                "solver.capture and solver.check_every need core=indexing or core=sliced"
            )
        if s.fallback:
            raise ValueError(
                "core=torchdeq: TorchDEQ's solve has no fallback; solver.fallback needs "
                "core=indexing or core=sliced"
            )
        # the options TorchDEQ's solvers share with ours (its Broyden has no memory option)
        self.solver_kwargs = {k: v for k, v in s.solver_kwargs().items() if k in PER_CALL}
        onestep = g.name == "onestep"
        if g.name not in ("ift", "phantom", "onestep"):
            raise ValueError(f"core=torchdeq: gradient mode {g.name!r} has no TorchDEQ counterpart")
        self.deq = torchdeq.get_deq(
            core=graph,
            f_solver=_solver_name(s.name, "solver"),
            b_solver=_solver_name(g.solver, "grad.solver"),
            f_max_iter=s.max_iter,
            b_max_iter=g.max_iter,
            f_tol=s.tol,
            b_tol=g.tol,
            f_stop_mode=_stop_mode(s.stop_mode, "solver"),
            b_stop_mode=_stop_mode(g.stop_mode, "grad"),
            eval_f_max_iter=s.eval_budget(),
            ift=g.name == "ift",
            grad=1 if onestep else g.step_list(),
            tau=1.0 if onestep else g.tau,
            sup_gap=g.sup_gap,
            sup_loc=list(g.sup_loc),
            n_states=n_states,
            indexing=list(indexing),
        )

    def max_iter_for_training(self) -> int:
        return self.solver_cfg.max_iter

    def forward(
        self,
        f: Callable[[State], State],
        z0: State,
        *,
        max_iter: int | None = None,
        jac_vecs: int = 0,
        **solver_options: Any,
    ) -> tuple[State, DEQInfo]:
        """As :meth:`deqlab.DEQ.forward`; per call TorchDEQ takes only the solver's own
        options (m, lam, tau, ls, return_final), not tol or stop_mode."""
        other = sorted(set(solver_options) - set(PER_CALL))
        if other:
            raise ValueError(
                f"core=torchdeq: TorchDEQ takes no per-call {other}; per call it takes "
                f"{list(PER_CALL)} (or use core=indexing)"
            )
        self.deq.train(self.training)
        backward: list[SolverResult] = []
        nfe = 0

        def counted(z: State) -> State:  # TorchDEQ reports no evaluation count: count them
            nonlocal nfe
            nfe += not torch.is_grad_enabled()
            return f(z)

        kwargs = {**self.solver_kwargs, **solver_options}
        if max_iter is not None:
            kwargs["f_max_iter"] = max_iter
        writer = lambda stats: backward.append(self._result(leaf(z0, False), stats, 0))
        states, stats = self.deq(counted, z0, solver_kwargs=kwargs, backward_writer=writer)
        states = [s if isinstance(s, Tensor) else tuple(s) for s in states]
        z = states[-1]
        info = DEQInfo.from_result(self._result(z, stats, nfe), states=states, backward=backward)
        if jac_vecs > 0 and torch.is_grad_enabled():
            zl = leaf(z, True)
            info.jac_loss = jacobian_loss(f(zl), zl, vecs=jac_vecs)
        return z, info

    @staticmethod
    def _result(z: State, stats: Mapping[str, Tensor], nfe: int) -> SolverResult:
        rel, abs_ = stats["rel_lowest"].flatten(), stats["abs_lowest"].flatten()
        batch = as_tuple(z)[0].shape[0]
        rel, abs_ = rel.expand(batch), abs_.expand(batch)  # the backward writer's may be 1 value
        trace = stats["rel_trace"]
        trace = trace.t() if trace.dim() == 2 else trace.reshape(-1, 1).expand(-1, batch)
        return SolverResult(
            z=like(z, [p.detach() for p in as_tuple(z)]),
            abs_residual=abs_.detach(),
            rel_residual=rel.detach(),
            nfe=nfe,
            best_step=stats["nstep"].flatten().long().expand(batch),
            converged=torch.zeros(batch, dtype=torch.bool),
            trace=trace.detach(),
        )
