"""3. One training step of the tutorial's model, deqlab's DEQ against the references'."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deqlab import DEQ, Bound, build_core

from .baseline import TutorialDEQFixedPoint
from .cells import tutorial_model
from .timing import (
    import_torchdeq,
    peak_memory_mb,
    timed_round_robin,
)

# The training-step variants that are not deqlab's: the ratios are taken against the best.
REFERENCES = ("torchdeq ift", "tutorial ift")


class TutorialModel(nn.Module):
    """The tutorial CIFAR model around an interchangeable DEQ layer ``layer(cell, u) -> z``."""

    def __init__(self, device: torch.device, layer: Callable[[nn.Module, Tensor], Tensor]):
        super().__init__()
        torch.manual_seed(0)
        self.net = tutorial_model(device)
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        u, _ = self.net.inject(x)
        return self.net.head(self.layer(self.net.cell, u))


def training_step(
    device: torch.device,
    repeats: int,
    iters: int = 20,
    batch: int = 64,
    dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Forward + backward of the tutorial model, Anderson (m=5) forward and backward with the
    same fixed budgets in every library (tolerance out of reach), so all do equal work."""
    torchdeq, _ = import_torchdeq()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    budget = {"max_iter": iters, "tol": 1e-30}
    variants: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {}
    for grad in ("ift", "phantom", "onestep"):
        deq = DEQ(
            solver={"name": "anderson", "m": 5, **budget},
            grad={"name": grad, "solver": "anderson", **budget, "steps": 5},
        )
        variants[f"deqlab {grad}"] = lambda cell, u, deq=deq: deq(
            lambda z: cell(z, u), torch.zeros_like(u)
        )[0]
    if device.type == "cuda":  # the forward solve replayed as CUDA graphs (one read per 5 steps)
        deq = DEQ(
            solver={"name": "anderson", "m": 5, **budget, "capture": True, "check_every": 5},
            grad={"name": "ift", "solver": "anderson", **budget},
        )
        variants["deqlab ift captured"] = lambda cell, u, deq=deq: deq(
            Bound(cell, u), torch.zeros_like(u)
        )[0]
    # the other cores on the same ift step: sliced (one segment, the same work as indexing)
    # and TorchDEQ behind deqlab's core interface (the adapter's overhead over the raw call)
    solver_cfg = {"name": "anderson", "m": 5, **budget}
    grad_cfg = {"name": "ift", "solver": "anderson", **budget}
    cores = {"core=sliced ift": {"name": "sliced"}}
    if torchdeq is not None:
        cores["core=torchdeq ift"] = {"name": "torchdeq"}
    for name, core in cores.items():
        deq = build_core(core, solver_cfg, grad_cfg)
        variants[f"deqlab {name}"] = lambda cell, u, deq=deq: deq(
            lambda z: cell(z, u), torch.zeros_like(u)
        )[0]
    if torchdeq is not None:
        td = torchdeq.get_deq(
            f_solver="anderson",
            f_max_iter=iters,
            f_tol=1e-30,
            b_solver="anderson",
            b_max_iter=iters,
            b_tol=1e-30,
            f_stop_mode="rel",
            b_stop_mode="rel",
            ift=True,
        )
        variants["torchdeq ift"] = lambda cell, u: td(lambda z: cell(z, u), torch.zeros_like(u))[0][
            -1
        ]

    def tutorial(cell, u):
        layer = TutorialDEQFixedPoint(cell, m=5, max_iter=iters, tol=1e-30)
        return layer(u)

    variants["tutorial ift"] = tutorial
    rows, steps = [], {}
    for name, layer in variants.items():
        model = TutorialModel(device, layer)

        def step(model=model):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()

        row = {"bench": "training_step", "variant": name, "dtype": str(dtype or "float32")}
        try:
            step()
            steps[name] = step
        except Exception as err:  # e.g. a reference without bf16 support
            row.update(seconds=None, error=str(err).splitlines()[0][:80])
        rows.append(row)
    times = timed_round_robin(steps, device, repeats)
    for row in rows:
        if row["variant"] in times:
            t = times[row["variant"]]
            row.update(seconds=t["median"], range=[t["min"], t["max"]])
            if device.type == "cuda":
                row["peak_MB"] = peak_memory_mb(steps[row["variant"]], device)
    refs = [r["seconds"] for r in rows if r["variant"] in REFERENCES and r["seconds"]]
    for r in rows:
        r["vs_best_reference"] = r["seconds"] / min(refs) if refs and r["seconds"] else None
    return rows
