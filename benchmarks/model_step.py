"""4. One training step of each task's real model through its LightningModule."""

from __future__ import annotations

from typing import Any

import torch

from .timing import (
    peak_memory_mb,
    timed_round_robin,
)

# On a GPU, also the wide models, where the arithmetic may outweigh the launches and bf16 pay.
WIDE = ("cifar_mdeq_large", "wt103_deq_transformer_medium")
# WikiText-103's vocabulary (Merity et al., 2017), the DEQ reference code's n_token for it
WT103_VOCAB = 267_735


def model_step(
    device: torch.device,
    repeats: int,
    experiments: tuple[str, ...] = ("cifar_tutorial", "cifar_mdeq_small"),
) -> list[dict[str, Any]]:
    """Forward + backward of the published models as their experiment files build them
    (batch, solver, gradient, normalization), in fp32 and under bf16 autocast, with the
    tolerances set out of reach so every variant spends the same f evaluations (the
    experiment's forward and backward budgets); on CUDA also with the forward solve captured,
    and with both solves captured, and the wide models too (:data:`WIDE`; the language model at the WikiText-103
    batch and vocabulary, on random tokens). Images/s (tokens/s) and peak memory."""
    import hydra.utils

    from deqlab.dropout import reset_dropout
    from deqlab.runner.config import compose

    rows, steps, items = [], {}, {}
    for exp in experiments + (WIDE if device.type == "cuda" else ()):
        for precision in ("fp32", "bf16"):
            for captured in ("", "fwd", "fwd+bwd") if device.type == "cuda" else ("",):
                overrides = [f"experiment={exp}", "solver.tol=null", "grad.tol=null"]
                overrides += ["task.module.fit.pretrain_steps=0"]
                if captured:
                    overrides += ["solver.capture=true"]
                if captured == "fwd+bwd":
                    overrides += ["grad.capture=true"]
                cfg = compose(overrides, "/tmp/deqlab-bench")
                torch.manual_seed(0)
                module = hydra.utils.instantiate(cfg.task.module)
                x, y, unit = example_batch(cfg, module, device)
                module = module.to(device).train()
                batch = cfg.task.datamodule.batch_size
                dtype = torch.bfloat16 if precision == "bf16" else None

                def step(module=module, x=x, y=y, dtype=dtype):
                    reset_dropout(module)
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        outputs, _ = module(x)
                        loss = module.criterion(outputs[-1].float(), y)
                    loss.backward()

                name = (
                    f"{exp} {precision}"
                    + {"": "", "fwd": " captured", "fwd+bwd": " captured fwd+bwd"}[captured]
                )
                row = {
                    "bench": "model_step",
                    "variant": name,
                    "batch": batch,
                    "unit": unit,
                    "fwd_bwd_nfe": f"{cfg.solver.max_iter}+{cfg.grad.max_iter}",
                }
                rows.append(row)
                items[name] = x.numel() if unit == "tokens" else x.shape[0]
                try:
                    step()
                    steps[name] = step
                except Exception as err:  # reported in the table
                    row["error"] = f"{type(err).__name__}: {err}"[:120]
    times = timed_round_robin(steps, device, repeats)
    for row in rows:
        if row["variant"] not in times:
            continue
        t = times[row["variant"]]
        row.update(
            seconds=t["median"], **{f"{row['unit']}_per_s": items[row["variant"]] / t["median"]}
        )
        row["peak_MB"] = peak_memory_mb(steps[row["variant"]], device)
        fp32 = next(r for r in rows if r["variant"] == row["variant"].split()[0] + " fp32")
        row["vs_fp32"] = fp32["seconds"] / row["seconds"] if "seconds" in fp32 else None
    return rows


def example_batch(cfg: Any, module: Any, device: torch.device) -> tuple[Any, Any, str]:
    """Random inputs and targets of the experiment's training batch (a language model's net,
    which waits for its vocabulary, is built here) and their unit."""
    batch = cfg.task.datamodule.batch_size
    if getattr(module, "net_factory", None) is not None:  # a language model
        module.attach_net(module.net_factory(n_token=WT103_VOCAB))
        shape = (batch, cfg.task.datamodule.tgt_len)
        tokens = torch.randint(0, WT103_VOCAB, (2, *shape), device=device)
        return tokens[0], tokens[1], "tokens"
    x = torch.randn(batch, 3, 32, 32, device=device)
    return x, torch.randint(0, 10, (batch,), device=device), "images"
