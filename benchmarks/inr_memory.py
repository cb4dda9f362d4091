"""An image-fitting step of the equilibrium MFN against explicit MFNs as deep as its forward
solve: seconds per step and the bytes autograd keeps for the backward pass. An explicit
network of k layers stores every layer's activations (and has k layers of weights); the
equilibrium network stores one evaluation of f at z*, however many the solve took (Huang,
Bai and Kolter, 2021, section 4)."""

from __future__ import annotations

from typing import Any

import torch

from deqlab import DEQ, Bound
from deqlab.tasks.inr.data import coordinate_grid
from deqlab.tasks.inr.model import MFN, ImplicitMFN

from .memory import SavedBytes
from .timing import timed


def inr_memory(
    device: torch.device,
    repeats: int = 3,
    depths: tuple[int, ...] = (2, 4, 8, 16),
    side: int = 128,
    width: int = 128,
) -> list[dict[str, Any]]:
    """For each depth k: the explicit MFN of k layers, and experiment=deq_inr_image's
    equilibrium MFN with a forward solve of k fixed-point steps (no tolerance) and its
    backward (one fixed-point step, as the authors' one-step gradient), on the whole
    ``side`` x ``side`` grid of a 3-channel image."""
    torch.manual_seed(0)
    coords = coordinate_grid(side, side)[None].to(device)
    target = torch.rand(1, side * side, 3, device=device)
    net = ImplicitMFN(3, width, input_scale=side / 2).to(device)
    rows = []
    for k in depths:
        explicit = MFN(3, width, layers=k, input_scale=side / 2).to(device)
        deq = DEQ(
            {"name": "fixed_point", "max_iter": k, "tol": None},
            {"name": "ift", "solver": "fixed_point", "max_iter": 2, "tol": None, "output": "fz"},
        )

        def explicit_step() -> None:
            (explicit(coords) - target).pow(2).mean().backward()

        def equilibrium_step() -> None:
            u, z0 = net.inject(coords)
            z, _ = deq(Bound(net.cell, u), z0)
            (net.head(z) - target).pow(2).mean().backward()

        row: dict[str, Any] = {"bench": "inr_memory", "evaluations": k}
        row["explicit_params"] = sum(p.numel() for p in explicit.parameters())
        row["deq_params"] = sum(p.numel() for p in net.parameters())
        for name, step in (("explicit", explicit_step), ("deq", equilibrium_step)):
            with SavedBytes() as saved:
                step()
            row[f"{name}_saved_MB"] = round(saved.total / 2**20, 2)
            row[f"{name}_s"] = round(timed(step, device, repeats)["median"], 4)
        rows.append(row)
    return rows
