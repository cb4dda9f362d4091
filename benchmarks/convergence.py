"""2. Convergence: f evaluations to reach a relative residual, deqlab against TorchDEQ."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deqlab import get_solver

from .cells import resnet_problem, tanh_problem
from .timing import (
    SOLVER_PAIRS,
    import_torchdeq,
)


def _first_below(trace: list[float], level: float) -> int | None:
    return next((i + 1 for i, r in enumerate(trace) if r <= level), None)


def residual_probe(f: Callable[[Tensor], Tensor]) -> tuple[Callable[[Tensor], Tensor], list[float]]:
    """f, recording at each call the batch-mean relative residual of the point it is called
    at: a solver-independent account of what every f evaluation bought (libraries differ in
    how their own traces line up with evaluations)."""
    trace: list[float] = []

    def probed(z: Tensor) -> Tensor:
        fz = f(z)
        diff = (fz - z).flatten(1).norm(dim=1)
        trace.append(float((diff / (fz.flatten(1).norm(dim=1) + 1e-9)).mean()))
        return fz

    return probed, trace


def convergence(
    device: torch.device, max_iter: int = 60
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """f evaluations until the solver first evaluates f at a point of relative residual
    <= 1e-3 and <= 1e-5 (batch mean), same settings in both libraries (Anderson m=5)."""
    _, td_get_solver = import_torchdeq()
    rows, traces = [], {}
    torch.manual_seed(0)  # the same cells whichever benchmarks ran before in this process
    for cell_name, make in (("resnet", resnet_problem), ("tanh", tanh_problem)):
        cell, x = make(device)
        f = lambda z: cell(z, x)
        z0 = torch.zeros_like(x)
        with torch.no_grad():
            for name, td_name in SOLVER_PAIRS.items():
                opts = {"m": 5} if name == "anderson" else {}
                row = {"bench": "convergence", "cell": cell_name, "solver": name}
                runs = [
                    (
                        "deqlab",
                        lambda g, name=name, opts=opts: get_solver(name)(
                            g, z0, max_iter=max_iter, tol=1e-7, **opts
                        ),
                    )
                ]
                if td_get_solver is not None:
                    td = td_get_solver(td_name)
                    runs.append(
                        (
                            "torchdeq",
                            lambda g, td=td, opts=opts: td(
                                g, z0, max_iter=max_iter, tol=1e-7, stop_mode="rel", **opts
                            ),
                        )
                    )
                for lib, solve in runs:
                    probed, trace = residual_probe(f)
                    solve(probed)
                    traces[f"{cell_name}/{name}/{lib}"] = trace
                    for level in (1e-3, 1e-5):
                        row[f"{lib}_nfe@{level:g}"] = _first_below(trace, level)
                rows.append(row)
    return rows, traces


def plot_convergence(traces: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, cell in zip(axes, ("resnet", "tanh")):
        for key, trace in traces.items():
            c, solver, lib = key.split("/")
            if c == cell:
                ax.semilogy(
                    range(1, len(trace) + 1),
                    trace,
                    ls="-" if lib == "deqlab" else "--",
                    label=f"{solver} ({lib})",
                )
        ax.set_title(f"{cell} cell")
        ax.set_xlabel("f evaluations")
        ax.set_ylabel("relative residual (batch mean)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
