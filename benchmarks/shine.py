"""SHINE against the exact implicit gradient on the tutorial's model: the parameter gradient's
relative error and cosine, and the backward pass's seconds.

The tutorial's network (experiment=cifar_tutorial's, untrained, on a batch of 32 random
CIFAR-sized images) with a Broyden forward solve at the recipe's budget (25 steps, tolerance
1e-2) so that SHINE has its inverse estimate; the reference gradient is ift's with an
Anderson backward solve to 1e-8. The recipe's own backward (ift, Anderson, 25 steps to 1e-2)
and the Jacobian-free gradient are measured beside SHINE with 1, 3 and 10 backward steps.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from deqlab import DEQ, Bound

from .cells import tutorial_model

FORWARD = {"name": "broyden", "max_iter": 25, "tol": 1e-2, "stop_mode": "rel"}
GRADS = {
    "exact (ift, anderson to 1e-8)": {
        "name": "ift",
        "solver": "anderson",
        "max_iter": 200,
        "tol": 1e-8,
    },
    "recipe (ift, anderson 25 to 1e-2)": {
        "name": "ift",
        "solver": "anderson",
        "max_iter": 25,
        "tol": 1e-2,
    },
    "shine, estimate only": {"name": "shine", "solver": "fixed_point", "max_iter": 1, "tol": None},
    "shine + 2 steps": {"name": "shine", "solver": "fixed_point", "max_iter": 3, "tol": None},
    "shine + 9 steps": {"name": "shine", "solver": "fixed_point", "max_iter": 10, "tol": None},
    "jacobian-free (onestep)": {"name": "onestep"},
}


def shine(device: torch.device, repeats: int = 3) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    model = tutorial_model(device)
    images = torch.randn(32, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (32,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(grad: dict[str, Any]) -> tuple[torch.Tensor, float, int]:
        deq = DEQ(FORWARD, grad)
        x = model.stem(images)
        z, info = deq(Bound(model.cell, x), torch.zeros_like(x))
        loss = F.cross_entropy(model.classifier(z), labels)
        start = time.perf_counter()
        grads = torch.autograd.grad(loss, params)
        seconds = time.perf_counter() - start
        backward_nfe = info.backward[0].nfe if info.backward else 0
        return torch.cat([g.flatten() for g in grads]), seconds, backward_nfe

    exact = step(GRADS["exact (ift, anderson to 1e-8)"])[0]
    rows = []
    for name, grad in GRADS.items():
        runs = [step(grad) for _ in range(repeats + 1)][1:]  # the first warms up
        g, _, nfe = runs[0]
        rows.append(
            {
                "bench": "shine",
                "gradient": name,
                "rel_error": round(float((g - exact).norm() / exact.norm()), 4),
                "cosine": round(float(F.cosine_similarity(g, exact, dim=0)), 5),
                "backward_nfe": nfe,
                "backward_s": round(sorted(r[1] for r in runs)[len(runs) // 2], 4),
            }
        )
    return rows
