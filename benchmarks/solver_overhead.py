"""1. Solver overhead: ``iters`` solver iterations against ``iters`` chained f evaluations."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from deqlab import Bound, get_solver
from deqlab.solvers.capture import CapturedSolver

from .cells import resnet_problem, tanh_problem
from .history import history_products
from .timing import (
    SOLVER_PAIRS,
    cuda_graph,
    import_torchdeq,
    timed_round_robin,
)


def solver_overhead(
    device: torch.device, repeats: int, iters: int = 20, compile: bool = False
) -> list[dict[str, Any]]:
    """Time of ``iters`` solver iterations over the time of ``iters`` plain chained f
    evaluations (z <- f(z), the floor), all timed in turns in one process. ``compile`` adds
    fixed-iteration solves under ``torch.compile`` (compiled during the warm-up)."""
    _, td_get_solver = import_torchdeq()
    rows = []
    for cell_name, make in (("resnet", resnet_problem), ("tanh", tanh_problem)):
        cell, x = make(device)
        f = lambda z: cell(z, x)
        z0 = torch.zeros_like(x)

        def plain(f=f, z0=z0):
            z = z0
            for _ in range(iters):
                z = f(z)

        fns: dict[str, Callable[[], Any]] = {"f": plain}
        if device.type == "cuda":  # the floor without launch costs: the chain as one graph
            with torch.no_grad():
                fns["f_graph"] = cuda_graph(plain)
        for name, td_name in SOLVER_PAIRS.items():
            solve = get_solver(name)
            # tol out of reach: the convergence test runs (one sync per step), never stops.
            fns[f"deqlab/{name}"] = lambda solve=solve, f=f, z0=z0: solve(
                f, z0, max_iter=iters, tol=1e-30
            )
            fns[f"fixed/{name}"] = lambda solve=solve, f=f, z0=z0: solve(
                f, z0, max_iter=iters, tol=None
            )
            if compile:
                fns[f"compiled/{name}"] = torch.compile(
                    lambda solve=solve, f=f, z0=z0: solve(f, z0, max_iter=iters, tol=None).z
                )
            if device.type == "cuda":
                # replayed as CUDA graphs: the test read back every 5 steps (never met), and
                # the fixed budget (one graph, no read)
                cap = CapturedSolver(solve, name)
                fns[f"captured/{name}"] = lambda cap=cap, cell=cell, x=x, z0=z0: cap(
                    Bound(cell, x), z0, max_iter=iters, tol=1e-30, check_every=5
                )
                fns[f"captured_fixed/{name}"] = lambda cap=cap, cell=cell, x=x, z0=z0: cap(
                    Bound(cell, x), z0, max_iter=iters, tol=None
                )
            products = history_products(name, z0, iters)
            if products is not None:
                fns[f"history/{name}"] = products
            if td_get_solver is not None:
                td = td_get_solver(td_name)
                fns[f"torchdeq/{name}"] = lambda td=td, f=f, z0=z0: td(
                    f, z0, max_iter=iters, tol=1e-30, stop_mode="rel"
                )
        errors = {}
        with torch.no_grad():
            for key in [k for k in fns if k.startswith("captured")]:
                try:  # records the graphs; a failure is reported, not fatal to the table
                    fns[key]()
                except Exception as err:
                    errors[key.split("/")[1]] = f"{type(err).__name__}: {err}"[:120]
                    del fns[key]
            times = timed_round_robin(fns, device, repeats)
        floor = times["f"]["median"]
        for name in SOLVER_PAIRS:
            row = {
                "bench": "solver_overhead",
                "cell": cell_name,
                "solver": name,
                "f_eval_s": floor / iters,
            }
            # f plus the history products alone: what the algorithm itself costs.
            products = times.get(f"history/{name}")
            row["history_floor"] = 1.0 + (products["median"] / floor if products else 0.0)
            keys = {"fixed": "deqlab_fixed_iters", "compiled": "deqlab_compiled"}
            for lib in ("deqlab", "fixed", "compiled", "captured", "captured_fixed", "torchdeq"):
                t = times.get(f"{lib}/{name}")
                if t is not None:
                    key = keys.get(lib, lib)
                    row[key] = t["median"] / floor
                    if lib in ("deqlab", "torchdeq"):
                        row[f"{key}_range"] = [t["min"] / floor, t["max"] / floor]
            if "f_graph" in times:
                row["f_graph"] = times["f_graph"]["median"] / floor
            if name in errors:
                row["captured_error"] = errors[name]
            if "captured" in row and "torchdeq" in row:
                # microseconds per iteration above the plain f chain: the solver's own cost
                row["overhead_us_deqlab"] = (row["deqlab"] - 1) * floor / iters * 1e6
                row["overhead_us_captured"] = (row["captured"] - 1) * floor / iters * 1e6
                row["overhead_us_torchdeq"] = (row["torchdeq"] - 1) * floor / iters * 1e6
            rows.append(row)
    return rows
