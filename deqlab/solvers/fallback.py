"""``solver.fallback``: the samples a solve leaves unconverged are solved again by the next
solver, from where the first left them.

Anderson can stall where a quasi-Newton method does not (a linear f whose Jacobian rotates,
``tests/test_fallback.py``), and its least-squares system can go singular (locuslab/deq issue
20, where the advice was a try/except around the solve). A fallback solver restarts from
each sample's best iterate with the same budget, tol and stop rule. It solves the whole batch,
since f is a closure over the whole batch's input, but a sample that had converged converges
again at its first step (the same iterate, the same residual) and keeps its result: in the
per-sample stop modes only the unconverged samples take the fallback's. In the batch-wide
modes the batch is one system and takes the fallback's result whole.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import FlatState, SolverResult, State, set_rows_
from .catalog import get_solver
from .solver_config import SolverConfig


def fall_back(
    f: Callable[[State], State], res: SolverResult, budget: int, cfg: SolverConfig
) -> SolverResult:
    """``res``, with its unconverged samples solved again by each of ``cfg.fallback`` in turn
    (budget ``budget`` each); ``fallbacks`` counts the samples handed to each solver."""
    counts: list[int] = []
    for fb in cfg.fallback_configs():
        todo = ~res.converged
        counts.append(int(todo.sum()))
        if counts[-1] == 0:
            break
        again = get_solver(fb.name)(
            f, res.z, max_iter=budget, tol=fb.tol, stop_mode=fb.stop_mode, **fb.solver_kwargs()
        )
        res = _merge(res, again, todo, per_batch=cfg.stop_mode.startswith("batch"))
    res.fallbacks = counts
    return res


def _merge(
    first: SolverResult, again: SolverResult, todo: torch.Tensor, per_batch: bool
) -> SolverResult:
    """The combined solve: ``again``'s result for the rows in ``todo`` (every row in the
    batch modes), ``first``'s for the others; one trace, one evaluation count."""
    steps = first.trace.shape[0]
    rows = torch.ones_like(todo) if per_batch else todo
    state = FlatState(first.z)
    z = state.flatten(first.z).clone()
    on_cpu = z.device.type == "cpu"
    set_rows_(z, rows, state.flatten(again.z), on_cpu)

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(rows, b, a)

    return SolverResult(
        z=state.unflatten(z),
        abs_residual=pick(first.abs_residual, again.abs_residual),
        rel_residual=pick(first.rel_residual, again.rel_residual),
        nfe=first.nfe + again.nfe,
        best_step=pick(first.best_step, again.best_step + steps),
        converged=pick(first.converged, again.converged),
        trace=torch.cat([first.trace, again.trace]),
        nonfinite=bool(first.nonfinite) or bool(again.nonfinite),
        saved=first.saved,
    )
