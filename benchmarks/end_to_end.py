"""7. Training throughput through the real runner (config, data, module, Trainer)."""

from __future__ import annotations

from typing import Any

import torch

from .timing import (
    Throughput,
    import_torchdeq,
)


def end_to_end(device: torch.device, data_dir: str, steps: int = 30) -> list[dict[str, Any]]:
    """Training throughput through the real runner (config, DataModule, LightningModule,
    Trainer): images/s of the CPU CIFAR experiment and tokens/s of the CPU PTB experiment."""
    import hydra.utils
    import lightning as L

    from deqlab.runner.config import compose

    trainer_kind = "gpu" if device.type == "cuda" else "cpu"
    rows = []
    runs = [
        ("cifar_cpu", ["experiment=cifar_cpu"], "images/s"),
        ("cifar_cpu core=sliced", ["experiment=cifar_cpu", "core=sliced"], "images/s"),
        ("ptb_deq_transformer_cpu", ["experiment=ptb_deq_transformer_cpu"], "tokens/s"),
    ]
    if import_torchdeq()[0] is not None:
        runs.insert(
            2, ("cifar_cpu core=torchdeq", ["experiment=cifar_cpu", "core=torchdeq"], "images/s")
        )
    if device.type == "cuda":  # the published experiments, as a GPU runs them
        tutorial = ["experiment=cifar_tutorial"]
        bf16 = ["trainer.precision=bf16-mixed"]
        capture = ["solver.capture=true", "solver.check_every=5"]
        capture_bwd = ["grad.capture=true", "grad.check_every=5"]
        mdeq = ["experiment=cifar_mdeq_small", "task.module.fit.pretrain_steps=0"]
        runs = [
            ("cifar_tutorial", tutorial, "images/s"),
            ("cifar_tutorial bf16", [*tutorial, *bf16], "images/s"),
            ("cifar_tutorial captured", [*tutorial, *capture], "images/s"),
            ("cifar_tutorial bf16 captured", [*tutorial, *bf16, *capture], "images/s"),
            ("cifar_tutorial captured fwd+bwd", [*tutorial, *capture, *capture_bwd], "images/s"),
            ("cifar_mdeq_small", mdeq, "images/s"),
            ("cifar_mdeq_small bf16", [*mdeq, *bf16], "images/s"),
            ("ptb_deq_transformer_cpu", ["experiment=ptb_deq_transformer_cpu"], "tokens/s"),
            ("ptb_deq_transformer_cpu bf16", ["experiment=ptb_deq_transformer_cpu", *bf16], "tokens/s"),
        ]  # fmt: skip
    for name, overrides, unit in runs:
        cfg = compose(
            [*overrides, f"paths.data_dir={data_dir}", f"trainer={trainer_kind}"],
            "/tmp/deqlab-bench",
        )
        L.seed_everything(0, verbose=False)
        datamodule = hydra.utils.instantiate(cfg.task.datamodule)
        module = hydra.utils.instantiate(cfg.task.module)
        meter = Throughput(warmup=3, device=device)
        trainer = hydra.utils.instantiate(
            cfg.trainer, max_steps=steps + 3, limit_val_batches=0, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
        )  # fmt: skip
        try:
            trainer.fit(module, datamodule)
        except Exception as err:  # one failing run does not end the table
            rows.append({"bench": "end_to_end", "experiment": name, "error": str(err)[:120]})
            continue
        row = {
            "bench": "end_to_end",
            "experiment": name,
            "unit": unit,
            "throughput": meter.items / meter.seconds,
            "steps": meter.steps - 3,
            "mean_fwd_nfe": sum(meter.nfe) / len(meter.nfe) if meter.nfe else None,
        }
        rows.append(row)
    return rows
