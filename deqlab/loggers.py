"""Logger plumbing for the runner: an offline-first W&B logger and figures for any logger.

Every logger receives the same metric names (``train/loss``, ``val/acc``, ``deq/fwd_nfe``...);
figures go to the loggers that take images (TensorBoard, W&B) and, for CSV, to a PNG beside
its metrics file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: figures are rendered to arrays, never shown
import matplotlib.pyplot as plt
import numpy as np
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from torch import Tensor


def wandb_logger(
    project: str = "deqlab",
    save_dir: str = ".",
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    **kwargs: Any,
) -> WandbLogger:
    """A WandbLogger that works with no account and no network.

    Online only when ``WANDB_API_KEY`` is set (or ``WANDB_MODE=online``); otherwise it runs
    offline, never prompts, and writes a local run under ``save_dir/wandb`` that
    ``wandb sync`` uploads later.
    """
    mode = os.environ.get("WANDB_MODE")
    offline = mode in ("offline", "dryrun") or (mode is None and "WANDB_API_KEY" not in os.environ)
    if offline:
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name,
        group=group,
        tags=list(tags),
        offline=offline,
        **kwargs,
    )


def residual_trace_figure(trace: Tensor, epoch: int) -> plt.Figure:
    """Relative residual vs solver step for a few samples (trace: (steps, samples))."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    steps = np.arange(trace.shape[0])
    for i in range(trace.shape[1]):
        ax.semilogy(steps, trace[:, i].numpy(), lw=1.2, label=f"sample {i}")
    ax.set_xlabel("solver step")
    ax.set_ylabel("relative residual")
    ax.set_title(f"forward solve, validation, epoch {epoch}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def log_figure(loggers: Sequence[Logger], key: str, fig: plt.Figure, step: int) -> None:
    """Send a figure to every logger that takes images, then close it."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, CSVLogger):
            out = Path(logger.log_dir) / "figures"
            out.mkdir(parents=True, exist_ok=True)
            fig.savefig(out / f"{key.replace('/', '_')}_step{step}.png")
    plt.close(fig)
