"""8. ``experiment=cifar_tutorial`` through the runner against the tutorial's own code."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .baseline import TutorialDEQFixedPoint
from .timing import (
    Throughput,
)


def tutorial_recipe(
    device: torch.device, data_dir: str, steps: int = 20, test_images: int = 1000
) -> list[dict[str, Any]]:
    """``experiment=cifar_tutorial`` through the runner against the tutorial's own
    implementation (benchmarks/baseline.py: its Anderson and hook-based backward, tol 1e-2,
    25 iterations, m=5, its batch-level stop rule) in the tutorial's plain training loop, both
    from the same initial weights on the same real CIFAR-10 batches for ``steps`` steps
    (Adam 1e-3, cosine over the steps): training seconds, solver iterations and test accuracy
    on the first ``test_images`` of the (class-stratified) test split."""
    import hydra.utils
    import lightning as L

    from deqlab.runner.config import compose

    cfg = compose(
        [
            "experiment=cifar_tutorial",
            f"paths.data_dir={data_dir}",
            "trainer=" + ("gpu" if device.type == "cuda" else "cpu"),
        ],
        "/tmp/deqlab-bench",
    )
    L.seed_everything(0, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.task.datamodule)
    datamodule.setup("fit")
    module = hydra.utils.instantiate(cfg.task.module)
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    test = [(x.to(device), y.to(device)) for x, y in datamodule.test_dataloader()]
    test = _first_images(test, test_images)

    def accuracy(predict: Callable[[Tensor], Tensor]) -> float:
        with torch.no_grad():
            right = sum(int((predict(x).argmax(1) == y).sum()) for x, y in test)
        return right / sum(len(y) for _, y in test)

    rows = []
    # deqlab: the runner's module and Trainer, validation off
    meter = Throughput(warmup=0, device=device)
    trainer = hydra.utils.instantiate(
        cfg.trainer, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
    )  # fmt: skip
    nfe: list[float] = []

    class Iterations(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            nfe.append(outputs["info"].nfe)

    trainer.callbacks.append(Iterations())
    trainer.fit(module, datamodule)
    module.eval()
    rows.append(
        {
            "bench": "tutorial_recipe",
            "variant": "deqlab experiment=cifar_tutorial",
            "steps": meter.steps,
            "train_s": meter.seconds,
            "mean_fwd_nfe": sum(nfe) / len(nfe),
            "test_acc": accuracy(lambda x: module(x.to(module.device))[0][-1]),
        }
    )
    # the tutorial: the same network and initial weights, its DEQ layer and training loop
    net = hydra.utils.instantiate(cfg.task.module.net).to(device)
    net.load_state_dict(start)
    layer = TutorialDEQFixedPoint(net.cell, m=5, max_iter=25, tol=1e-2)
    model = lambda x: net.head(layer(net.inject(x)[0]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-6)
    datamodule.train_loader = None  # a fresh pass over the same order
    loader = datamodule.make_train_loader()
    net.train()
    seconds, iterations = 0.0, []
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        x, y = x.to(device), y.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        iterations.append(len(layer.forward_res) + 2)  # its loop starts with 2 evaluations
    net.eval()
    rows.append(
        {
            "bench": "tutorial_recipe",
            "variant": "tutorial (benchmarks/baseline.py)",
            "steps": len(iterations),
            "train_s": seconds,
            "mean_fwd_nfe": sum(iterations) / len(iterations),
            "test_acc": accuracy(model),
        }
    )
    base = rows[-1]["train_s"]
    for r in rows:
        r["time_vs_tutorial"] = r["train_s"] / base
    return rows


def _first_images(batches: list[tuple[Tensor, Tensor]], n: int) -> list[tuple[Tensor, Tensor]]:
    out, left = [], n
    for x, y in batches:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= len(y)
    return out
