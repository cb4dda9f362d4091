"""The deblurring training step of a deep equilibrium model against the same cell unrolled:
seconds per step and the bytes autograd keeps for the backward pass, as the iteration count
grows. The unrolled network stores every iteration's activations; the DEQ stores one
evaluation of f at z* whatever the forward solve took (Gilton et al., 2021, section IV)."""

from __future__ import annotations

from typing import Any

import torch

from deqlab import DEQ, Bound
from deqlab.tasks.inverse.model import Reconstructor

from .memory import SavedBytes
from .timing import timed


def inverse_memory(
    device: torch.device, repeats: int = 3, iterations: tuple[int, ...] = (5, 10, 20, 40)
) -> list[dict[str, Any]]:
    """For each iteration count k: the unrolled network of k iterations (backprop through
    all of them) and the DEQ with a forward solve of k fixed-point steps (no tolerance) and
    the implicit backward pass (10 fixed-point steps), on a batch of 32 CIFAR-sized images
    with experiment=deq_deblur_cifar's network."""
    torch.manual_seed(0)
    net = Reconstructor({"kind": "blur", "blur_sigma": 1.0}, (3, 32, 32)).to(device)
    x = torch.rand(32, 3, 32, 32, device=device)
    y = net.cell.physics.A(x)
    rows = []
    for k in iterations:

        def unrolled() -> None:
            u, z = net.inject(y)
            for _ in range(k):
                z = net.cell(z, u)
            (z - x).pow(2).mean().backward()

        deq = DEQ(
            {"name": "fixed_point", "max_iter": k, "tol": None},
            {"name": "ift", "solver": "fixed_point", "max_iter": 10, "tol": None},
        )

        def equilibrium() -> None:
            u, z0 = net.inject(y)
            z, _ = deq(Bound(net.cell, u), z0)
            (z - x).pow(2).mean().backward()

        row: dict[str, Any] = {"bench": "inverse_memory", "iterations": k}
        for name, step in (("unrolled", unrolled), ("deq", equilibrium)):
            with SavedBytes() as saved:
                step()
            row[f"{name}_saved_MB"] = round(saved.total / 2**20, 2)
            row[f"{name}_s"] = round(timed(step, device, repeats)["median"], 4)
        rows.append(row)
    return rows
