"""Every solver on the benchmark cells, forward and backward, timed in turns in one run: f
evaluations, seconds and the residual reached.

Forward: z = f(z) from zero to a relative residual of 1e-5 (at most 60 steps) by
fixed-point iteration, Anderson (m = 5), Broyden and Newton-Krylov (forward-mode products;
from zero, and after 5 fixed-point steps).
Backward: the implicit gradient's linear system g = J^T g + u at that equilibrium, to 1e-8,
by the same iterations and by GMRES. The cells: the tutorial's ResNet cell, tanh(W z + x)
with ||W|| = 0.9, and the same with ||W|| = 2, where fixed-point iteration does not settle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deqlab import get_solver

from .cells import TanhCell, resnet_problem, tanh_problem
from .timing import timed_round_robin

FORWARD = {  # label: (solver, options)
    "fixed_point": ("fixed_point", {}),
    "anderson": ("anderson", {"m": 5}),
    "broyden": ("broyden", {}),
    "newton_krylov": ("newton_krylov", {}),
    "newton_krylov warmup=5": ("newton_krylov", {"warmup": 5}),
}
BACKWARD = {"fixed_point": {}, "anderson": {"m": 5}, "broyden": {}, "gmres": {}}


def _hard_tanh(device: torch.device) -> tuple[TanhCell, Tensor]:
    cell, x = tanh_problem(device, batch=64, width=256)
    with torch.no_grad():
        cell.lin.weight.mul_(2.0 / 0.9)  # ||W|| = 2
    return cell, x


def _row(name: str, solve: Callable[[], Any]) -> dict[str, Any]:
    res = solve()
    return {
        "solver": name,
        "nfe": res.nfe,
        "rel_residual": float(res.rel_residual.max()),
        "converged": float(res.converged.float().mean()),
    }


def solver_table(device: torch.device, repeats: int = 3) -> list[dict[str, Any]]:
    rows = []
    torch.manual_seed(0)
    cells = {
        "resnet": resnet_problem(device, batch=8),
        "tanh": tanh_problem(device, batch=64, width=256),
        "tanh_norm2": _hard_tanh(device),
    }
    for cell_name, (cell, x) in cells.items():
        f = lambda z, cell=cell, x=x: cell(z, x)
        z0 = torch.zeros_like(x)
        forward = {
            label: (
                lambda name=name, opts=opts: get_solver(name)(
                    f, z0, max_iter=60, tol=1e-5, stop_mode="rel", **opts
                )
            )
            for label, (name, opts) in FORWARD.items()
        }
        with torch.no_grad():
            outcomes = {name: _row(name, solve) for name, solve in forward.items()}
        times = timed_round_robin(forward, device, repeats, warmup=1)
        for name, row in outcomes.items():
            rows.append(
                {
                    "bench": "solver_table",
                    "cell": cell_name,
                    "pass": "forward",
                    **row,
                    "s": round(times[name]["median"], 4),
                }
            )
        # the backward system at the best equilibrium found
        best = min(outcomes, key=lambda n: outcomes[n]["rel_residual"])
        with torch.no_grad():
            z_star = forward[best]().z
        z = z_star.detach().requires_grad_()
        with torch.enable_grad():
            fz = f(z)
        u = torch.randn_like(z)

        def vjp_map(g: Tensor, fz=fz, z=z, u=u) -> Tensor:
            return torch.autograd.grad(fz, z, g, retain_graph=True)[0] + u

        backward = {
            name: (
                lambda name=name, opts=opts: get_solver(name)(
                    vjp_map, u, max_iter=60, tol=1e-8, stop_mode="rel", **opts
                )
            )
            for name, opts in BACKWARD.items()
        }
        outcomes = {name: _row(name, solve) for name, solve in backward.items()}
        times = timed_round_robin(backward, device, repeats, warmup=1)
        for name, row in outcomes.items():
            rows.append(
                {
                    "bench": "solver_table",
                    "cell": cell_name,
                    "pass": "backward",
                    **row,
                    "s": round(times[name]["median"], 4),
                }
            )
    return rows
