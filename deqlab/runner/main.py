"""The runner's entry point (``deqlab [overrides]``, ``python -m deqlab [overrides]``):
compose the config, train, test, report.

python -m deqlab task=cifar solver=broyden grad=phantom norm=weight_norm
python -m deqlab experiment=cifar_tutorial logger=wandb
python -m deqlab -m solver=anderson,broyden grad=ift,phantom      # a local sweep
python -m deqlab mode=test ckpt_path=outputs/runs/<run>/checkpoints/best.ckpt
python -m deqlab mode=eval ckpt_path=...    # the validation and the test split of a checkpoint
python -m deqlab hydra.run.dir=outputs/runs/<run> ckpt_path=last  # resume a killed run
python -m deqlab report outputs/multiruns/<sweep>                  # as `deqlab report`
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import rich
import rich.syntax
import rich.tree
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from deqlab.runner.checkpoint import AtomicCheckpointIO, resolve_checkpoint
from deqlab.runner.cluster import (
    Preempted,
    Preemption,
    describe_holder,
    hold_run_folder,
    requeued_checkpoint,
)
from deqlab.runner.config import CONF_DIR, register_configs, validate
from deqlab.runner.extras import run_extras

register_configs()


class NoAdvertisements(logging.Filter):
    """Drops the lines Lightning logs on every run to advertise its cloud products
    ("💡 Tip: ... try installing litlogger / litmodels"): nothing a user of this run can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NoAdvertisements())


def run(cfg: DictConfig) -> float | None:
    """Fit and test (or only test) as ``cfg`` says; returns the best monitored metric.

    Every config value and the checkpoint to resume from are checked before anything is
    built; a run rejected there leaves no run folder behind. The run folder has one writer
    (:func:`~deqlab.runner.cluster.hold_run_folder`): a second process is refused before it
    reads a checkpoint. Loggers are closed whatever happens, a failed run marked as failed
    (a W&B run with a non-zero exit code), so the next job of a sweep starts its own.
    """
    out = Path(cfg.paths.output_dir)
    with ExitStack() as held:
        try:
            validate(cfg)
            held.enter_context(run_extras(cfg.extras))
            if rank_zero_only.rank == 0:  # DDP processes started by this one share its lock
                stale = held.enter_context(hold_run_folder(out))
                if stale:
                    print(
                        f"deqlab: {out} was held by {describe_holder(stale)}, which has died; lock taken over"
                    )
            ckpt = resolve_checkpoint(cfg.ckpt_path, out) if cfg.ckpt_path else None
            ckpt = ckpt or requeued_checkpoint(out)
            L.seed_everything(cfg.seed, workers=True)
            datamodule = instantiate(cfg.task.datamodule)
            module = instantiate(cfg.task.module)
            callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
            if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses both
                callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
            loggers: list[Logger] = [
                instantiate(c) for c in (cfg.get("logger") or {}).values() if c
            ]
        except Exception:
            close_loggers([], succeeded=False)  # a W&B run already started must not linger
            held.close()
            discard_rejected_run(out)
            raise
        succeeded = False
        try:
            if rank_zero_only.rank == 0:
                print_config(cfg)
            save_config(cfg, out, loggers)
            trainer: L.Trainer = instantiate(
                cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()]
            )
            score = fit_and_test(cfg, trainer, module, datamodule, callbacks, ckpt)
            succeeded = True
            return score
        except SIGTERMException:  # Lightning's stop on a signal: exit as that signal says
            signum = next((c.received for c in callbacks if isinstance(c, Preemption)), None)
            raise Preempted(signum or signal.SIGTERM) from None
        finally:
            close_loggers(loggers, succeeded)


def fit_and_test(
    cfg: DictConfig,
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    callbacks: list[Any],
    ckpt: Path | None,
) -> float | None:
    """Run ``cfg.mode``; returns the score a sweep compares: the best monitored validation
    metric (train), the monitored metric of the checkpoint (eval), the test metric (test)."""
    reported: dict[str, float] = {}
    if cfg.mode == "train":
        trainer.fit(module, datamodule, ckpt_path=ckpt)
        best_ckpt = next(
            (c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor), None
        )
        best = best_ckpt.best_model_path if best_ckpt is not None else ""
        # without a best checkpoint, the last validation's score (testing resets the metrics)
        score = (
            best_ckpt.best_model_score
            if best_ckpt is not None
            else trainer.callback_metrics.get(cfg.task.monitor)
        )
        # the weights in memory are the last ones
        reported.update(
            *trainer.test(
                module, datamodule, ckpt_path=(best or None) if cfg.test_ckpt == "best" else None
            )
        )
    else:
        if cfg.mode == "eval":  # the validation split first, then the test split
            reported.update(*trainer.validate(module, datamodule, ckpt_path=ckpt))
        reported.update(*trainer.test(module, datamodule, ckpt_path=ckpt))
        score = reported.get(cfg.task.monitor if cfg.mode == "eval" else cfg.task.test_metric)
    score = None if score is None else float(score)
    if trainer.is_global_zero:
        shown = "n/a" if score is None else f"{score:.4f}"
        metrics = ", ".join(f"{k}={float(v):.4f}" for k, v in sorted(reported.items()))
        best = f"best {cfg.task.monitor}={shown}; " if cfg.mode == "train" else ""
        print(f"deqlab: {cfg.mode} done; {best}{metrics}; outputs in {cfg.paths.output_dir}")
    return score


def print_config(cfg: DictConfig) -> None:
    """The composed config as a tree, one branch per group, as the run starts."""
    tree = rich.tree.Tree(f"config of {cfg.paths.output_dir}")
    for key, value in cfg.items():
        if OmegaConf.is_config(value):
            text = OmegaConf.to_yaml(value, resolve=True)
            tree.add(f"[bold]{key}").add(rich.syntax.Syntax(text, "yaml"))
        else:
            tree.add(f"[bold]{key}[/bold]: {value}")
    rich.print(tree)


def save_config(cfg: DictConfig, out: Path, loggers: list[Logger]) -> None:
    """The resolved config, beside the run's outputs and in every logger (rank 0 only)."""
    if rank_zero_only.rank != 0:
        return
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config_resolved.yaml").write_text(OmegaConf.to_yaml(resolved))
    for logger in loggers:
        logger.log_hyperparams(resolved)


def close_loggers(loggers: list[Logger], succeeded: bool) -> None:
    """Flush every logger; end this process's W&B run, as failed unless ``succeeded``."""
    for logger in loggers:
        logger.finalize("success" if succeeded else "failed")
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=0 if succeeded else 1)


# What Hydra writes into a job's folder before the job runs.
HYDRA_ARTEFACTS = (".hydra",)


def discard_rejected_run(out: Path) -> None:
    """Remove what Hydra wrote for a run rejected before it started (its ``.hydra`` folder and
    log), so no folder looks like a run of that config. A folder holding anything else (a
    resumed run's checkpoints, say) is left as it is."""
    if not out.is_dir():
        return
    entries = list(out.iterdir())
    if any(e.name not in HYDRA_ARTEFACTS and e.suffix != ".log" for e in entries):
        return
    for entry in entries:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    if out.resolve() != Path.cwd().resolve():
        os.rmdir(out)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
