"""Logger plumbing for the runner: an offline-first W&B logger and figures for any logger.

Every logger receives the same metric names (``train/loss``, ``val/acc``, ``deq/fwd_nfe``...);
figures go to the loggers that take images (TensorBoard, W&B, MLflow) and, for CSV, to a PNG
beside its metrics file.
"""

from __future__ import annotations

import netrc
import os
import secrets
import string
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import matplotlib

matplotlib.use("Agg")  # headless: figures are rendered to arrays, never shown
import matplotlib.pyplot as plt
import numpy as np
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import (
    CSVLogger,
    Logger,
    MLFlowLogger,
    TensorBoardLogger,
    WandbLogger,
)
from torch import Tensor

from .files import optional_output, save_figure, write_atomic, write_text


def wandb_credentials() -> bool:
    """Whether W&B has an API key without asking for one: ``WANDB_API_KEY``, or the key that
    ``wandb login`` stores in ``~/.netrc`` (``$NETRC``) for the W&B host (``WANDB_BASE_URL``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or Path.home() / ".netrc"
    try:
        auth = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def wandb_mode() -> str:
    """``WANDB_MODE`` when set, else online with credentials and offline without."""
    mode = os.environ.get("WANDB_MODE")
    if mode is not None:
        return "offline" if mode in ("offline", "dryrun") else mode
    return "online" if wandb_credentials() else "offline"


def wandb_logger(
    project: str = "deqlab",
    save_dir: str = ".",
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    run_tags: Sequence[str] = (),
    summaries: Mapping[str, str] | None = None,
    log_model: bool = False,
    **kwargs: Any,
) -> WandbLogger:
    """A WandbLogger that works with no account and no network.

    Online when the user is logged in (:func:`wandb_credentials`) or ``WANDB_MODE=online``;
    otherwise offline, never prompting, writing a local run under ``save_dir/wandb`` that
    ``wandb sync`` uploads later. Its tags are the config choices ``tags`` and the run's own
    ``run_tags``. The run's summary holds each metric of ``summaries`` at its
    best value (``min`` or ``max``, as the task's config says), not its last; ``log_model``
    uploads the checkpoints as an artifact when training ends. The W&B run's id is kept in
    ``save_dir`` (``.wandb_run_id``): every restart of that run folder (a resume after a kill,
    a requeued job) continues the same W&B run, online or offline.
    """
    offline = wandb_mode() == "offline"
    if offline and log_model:
        raise ValueError(
            "logger.wandb.log_model=true uploads the checkpoints, which needs an online run: "
            "log in (`wandb login`, or set WANDB_API_KEY) or leave log_model false"
        )
    if offline:
        os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("id", run_id(save_dir, WANDB_ID, _new_wandb_id))
    deadline = time.monotonic() + 60
    while True:
        logger = WandbLogger(
            project=project,
            save_dir=save_dir,
            name=name or None,  # W&B draws a name for a run without overrides
            group=group,
            tags=[*tags, *run_tags],
            offline=offline,
            log_model=log_model,
            **kwargs,
        )
        try:
            run = logger.experiment  # starts the run (a no-op stand-in on ranks other than 0)
            break
        except Exception as e:
            # a killed run's W&B service can hold the id a little longer than its parent
            # lived: wait for it rather than split the training over two dashboard runs
            if "is in use" not in str(e):
                raise
            if time.monotonic() > deadline:
                if os.environ.get("WANDB_SERVICE"):
                    raise RuntimeError(
                        f"W&B run {kwargs['id']} of {save_dir} is still held by the W&B "
                        "service this process inherited through WANDB_SERVICE (from the "
                        "process that launched it), which outlives a killed run: launch "
                        "deqlab without WANDB_SERVICE in its environment"
                    ) from e
                raise
            time.sleep(2)
    if hasattr(run, "define_metric"):
        for metric, mode in sorted((summaries or {}).items()):
            if mode not in ("min", "max"):
                raise ValueError(f"the summary of {metric} must be min or max, got {mode!r}")
            run.define_metric(metric, summary=mode)
    return logger


def mlflow_logger(
    experiment_name: str = "deqlab",
    run_name: str | None = None,
    tracking_uri: str = "sqlite:///mlflow.db",
    tags: Mapping[str, str] | None = None,
    run_tags: Sequence[str] = (),
    run_folder: str | None = None,
    **kwargs: Any,
) -> Logger:
    """An MLFlowLogger writing to ``tracking_uri``: a local SQLite store (MLflow's
    successor to its file store, which it no longer develops) or a server. Its tags are
    ``tags`` (the config choices: ``tags.solver = 'broyden'`` in MLflow's search) and the
    run's own ``run_tags``, comma-joined under ``tags``. The MLflow run's id is kept in
    ``run_folder`` (``.mlflow_run_id``): every restart of that folder continues the same run."""
    from lightning.pytorch.loggers.mlflow import _MLFLOW_AVAILABLE

    if not _MLFLOW_AVAILABLE:
        raise ModuleNotFoundError(
            "logger=mlflow needs MLflow's client: pip install 'deqlab[mlflow]' (mlflow-skinny)"
        )
    all_tags = dict(tags or {})
    if run_tags:
        all_tags["tags"] = ",".join(run_tags)
    folder = run_folder
    saved = folder and read_run_id(folder, MLFLOW_ID)
    logger = MLFlowLogger(
        experiment_name=experiment_name,
        run_name=run_name or None,  # MLflow draws a name for a run without overrides
        tracking_uri=tracking_uri,
        tags=all_tags,
        run_id=saved or None,  # a restarted run folder continues its MLflow run
        **kwargs,
    )
    if folder and not saved and rank_zero_only.rank == 0:
        write_text(Path(folder) / MLFLOW_ID, logger.run_id)  # starts the run
    return logger


# Where a run folder keeps its dashboard runs' ids, so that every restart of the folder (a
# resume after a kill, a requeued job) continues the same W&B and MLflow run.
WANDB_ID = ".wandb_run_id"
MLFLOW_ID = ".mlflow_run_id"


def read_run_id(folder: str | Path, name: str) -> str | None:
    path = Path(folder) / name
    return path.read_text().strip() or None if path.is_file() else None


def _new_wandb_id() -> str:
    """Eight lowercase letters and digits, as W&B draws its own run ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def run_id(folder: str | Path, name: str, new: Callable[[], str]) -> str:
    """The run id kept in ``folder/name``, or a ``new()`` one, kept there (rank 0 writes)."""
    saved = read_run_id(folder, name)
    if saved:
        return saved
    made = new()
    if rank_zero_only.rank == 0:
        write_text(Path(folder) / name, made)
    return made


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


def log_figure(
    loggers: Sequence[Logger], key: str, fig: plt.Figure, step: int, data: Tensor | None = None
) -> None:
    """Send a figure to every logger that takes images, then close it. For CSV, the PNG goes
    beside the metrics, with ``data`` (rows: x values, columns: lines) as a CSV file of the
    same name for reports to redraw."""
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, step, dataformats="HWC")
        elif isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_figure(logger.run_id, fig, f"{key}_step{step}.png")
        elif isinstance(logger, CSVLogger):
            name = Path(logger.log_dir) / "figures" / f"{key.replace('/', '_')}_step{step}"
            with optional_output(f"figure {name}.png"):  # a full disk warns, training goes on
                save_figure(fig, name.with_suffix(".png"))
                if data is not None:
                    write_atomic(
                        name.with_suffix(".csv"),
                        lambda fh: np.savetxt(fh, data.numpy(), delimiter=","),
                    )
    plt.close(fig)
