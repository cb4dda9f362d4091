"""5. Activation memory of one training step, against the forward budget and an unrolled net."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deqlab import DEQ

from .training_step import TutorialModel


class SavedBytes:
    """Bytes of the distinct tensors autograd saves inside the context (a sparse tensor by its
    indices and values, a dense one by its storage)."""

    def __init__(self) -> None:
        self.seen: dict[int, int] = {}

    def __enter__(self) -> SavedBytes:
        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.is_sparse:
                self.seen[id(t)] = t._values().nbytes + t._indices().nbytes
            else:
                self.seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def memory(device: torch.device, batch: int = 32) -> list[dict[str, Any]]:
    """Activation memory of one training step vs forward budget, and vs a 30-step unrolled
    network. Measured as bytes autograd saves (on any device) and, on CUDA, peak allocation."""
    rows = []
    x = torch.randn(batch, 3, 32, 32, device=device)

    def measure(name: str, layer: Callable[[nn.Module, Tensor], Tensor]) -> None:
        model = TutorialModel(device, layer)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with SavedBytes() as saved:
            loss = model(x).sum()
        loss.backward()
        row = {"bench": "memory", "variant": name, "saved_MB": saved.total / 2**20}
        if device.type == "cuda":
            torch.cuda.synchronize()
            row["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(row)

    for budget in (10, 30, 60):
        deq = DEQ(
            solver={"name": "anderson", "max_iter": budget, "tol": 1e-30},
            grad={"max_iter": 20, "tol": 1e-30},
        )
        measure(
            f"deqlab ift, forward budget {budget}",
            lambda cell, u, deq=deq: deq(lambda z: cell(z, u), torch.zeros_like(u))[0],
        )

    def unrolled(cell, u):
        z = torch.zeros_like(u)
        for _ in range(30):
            z = cell(z, u)
        return z

    measure("unrolled 30 steps, backprop", unrolled)
    return rows
