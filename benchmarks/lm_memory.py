"""6. Activation memory of the DEQ-Transformer's training step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from deqlab import DEQ

from .memory import SavedBytes


def lm_memory(
    device: torch.device,
    batch: int = 1,
    width: dict[str, int] | None = None,
    tgt_len: int = 150,
    mem_len: int = 150,
    depth: int = 18,
    budget: int = 30,
) -> list[dict[str, Any]]:
    """The DEQ slides' memory claim (DEQ-Transformer medium, adaptive embeddings: 3.7 GB;
    Transformer-XL medium, 18 layers: 9.0 GB) at one width and segment: activation bytes
    autograd keeps for one training step of the DEQ-Transformer layer (ift) against the same
    layer unrolled ``depth`` times with backprop (the activations of a weight-untied
    Transformer-XL of that depth: untying changes parameters, not activations) and unrolled
    for the DEQ's forward ``budget``. Parameter storages are left out; ``param_MB`` is the
    layers' float32 parameters (the untied stack has ``depth`` copies; gradients and Adam's
    moments triple that again). Default width: the medium model's (d_model 700, 10 x 70 heads, d_inner
    48000), segment 150 with memory 150; bytes are linear in ``batch``."""
    from torch.nn.utils import parametrize

    from deqlab.tasks.lm.model import DEQTransformerLM

    width = width or {"d_model": 700, "n_head": 10, "d_head": 70, "d_inner": 48000}
    torch.manual_seed(0)
    # No weight norm here: its normalized weights are computed once per step and saved, which
    # an untied stack would do once per layer; without it every saved byte is an activation.
    net = DEQTransformerLM(1000, **width, dropout=0.0, emb_dropout=0.0).to(device)
    d, du = width["d_model"], 3 * width["n_head"] * width["d_head"]
    mem = (
        torch.randn(batch, mem_len, d, device=device),
        torch.randn(batch, mem_len, du, device=device),
    )
    x = torch.randint(0, 1000, (batch, tgt_len), device=device)
    with torch.no_grad():
        ctx, z0 = net.inject(x, mem)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    cell_params = sum(p.numel() for p in net.cell.parameters())
    f = lambda z: net.cell(z, ctx)

    def deq_step(max_iter: int) -> Callable[[], Tensor]:
        deq = DEQ({"name": "anderson", "max_iter": max_iter, "tol": None}, {"name": "ift"})
        return lambda: deq(f, z0)[0]

    def unrolled(n: int) -> Callable[[], Tensor]:
        def run() -> Tensor:
            z = z0
            for _ in range(n):
                z = f(z)
            return z

        return run

    variants = [
        ("DEQ-Transformer, ift (forward budget 2)", deq_step(2), 1),
        ("DEQ-Transformer, ift (forward budget 6)", deq_step(6), 1),
        (f"Transformer-XL, {depth} untied layers", unrolled(depth), depth),
        (f"DEQ unrolled for its budget ({budget}), backprop", unrolled(budget), 1),
    ]
    rows = []
    for name, step, copies in variants:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with parametrize.cached(), SavedBytes() as saved:
            out = step()
        row = {
            "bench": "lm_memory",
            "variant": name,
            "activation_MB": sum(b for p, b in saved.seen.items() if p not in params) / 2**20,
            "param_MB": copies * cell_params * 4 / 2**20,
        }
        if device.type == "cuda":
            torch.cuda.synchronize()
            row["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(row)
        del out
    txl = rows[2]["activation_MB"]
    for r in rows:
        r["vs_transformer_xl"] = r["activation_MB"] / txl
    return rows
