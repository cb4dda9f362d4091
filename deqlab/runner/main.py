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
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from deqlab.runner.checkpoint import (
    AtomicCheckpointIO,
    initial_state,
    read_checkpoint,
    resolve_checkpoint,
)
from deqlab.runner.cluster import Preempted, Preemption, requeued_checkpoint, slurm_restarted
from deqlab.runner.config import CONF_DIR, register_configs, validate
from deqlab.runner.extras import run_extras
from deqlab.runner.refusal import refusal_in, refuse
from deqlab.runner.run_folder import RunFolder
from deqlab.warm_start import WarmStartError

register_configs()


class NoAdvertisements(logging.Filter):
    """Drops the lines Lightning logs on every run to advertise its cloud products
    ("💡 Tip: ... try installing litlogger / litmodels"): nothing a user of this run can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip:")


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(NoAdvertisements())


def run(cfg: DictConfig) -> float | None:
    """Fit and test (or only test) as ``cfg`` says; returns the best monitored metric.

    Nothing is written into the run folder until everything has been checked: the config
    values, the folder's lock (one writer: a second process is refused before it reads a
    checkpoint), that the folder holds no other run (:mod:`~deqlab.runner.run_folder`), the
    checkpoint to resume from and the weights to start from. A run refused there changes no
    byte of the folder, and removes only a folder it created. Loggers are closed whatever
    happens, a failed run marked as failed (a W&B run with a non-zero exit code), so the next
    job of a sweep starts its own.
    """
    out = Path(cfg.paths.output_dir)
    # DDP processes started by this one write nothing into the folder
    folder = RunFolder(out, reopening(cfg, out), cfg.overwrite, str(cfg.mode))
    loggers: list[Logger] = []
    with ExitStack() as held:
        held.callback(folder.release)
        try:
            validate(cfg)
            held.enter_context(run_extras(cfg.extras))
            if rank_zero_only.rank == 0:
                folder.acquire()
            # a requeued job continues from its own folder, whatever ckpt_path started it
            ckpt = requeued_checkpoint(out) if slurm_restarted() else None
            ckpt = ckpt or (resolve_checkpoint(cfg.ckpt_path, out) if cfg.ckpt_path else None)
            if cfg.get("init_from"):
                initial_state(cfg.init_from)  # a file of tensors, before anything is built
            L.seed_everything(cfg.seed, workers=True)
            datamodule = instantiate(cfg.task.datamodule)
            index_samples(datamodule, cfg)
            module = instantiate(cfg.task.module)
            check_before_training(module, ckpt)
            callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
            if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses both
                callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
            if rank_zero_only.rank == 0:
                folder.commit(cfg)
            loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
        except Exception:
            close_loggers(loggers, succeeded=False)  # a W&B run already started must not linger
            if rank_zero_only.rank == 0 and not folder.committed:
                folder.discard()
            raise
        succeeded = False
        try:
            if rank_zero_only.rank == 0:
                print_config(cfg)
            log_config(cfg, loggers)
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


def reopening(cfg: DictConfig, out: Path) -> bool:
    """Whether this run continues the run in ``out``: a requeued SLURM job, ``ckpt_path=last``
    or a checkpoint of ``out`` itself."""
    if slurm_restarted() or cfg.ckpt_path == "last":
        return True
    if not cfg.ckpt_path or "://" in str(cfg.ckpt_path):
        return False
    return Path(cfg.ckpt_path).absolute().resolve().is_relative_to(out.absolute().resolve())


def check_before_training(module: L.LightningModule, ckpt: Path | None) -> None:
    """What can be checked of the module before anything is written: ``init_from``'s weights
    fit its network, and ``ckpt``'s task and tensors are its own (for tasks that build their
    network in ``setup``, the checks run there, as before)."""
    if getattr(module, "net", None) is None:
        return
    load_initial = getattr(module, "load_initial_weights", None)
    if load_initial is not None:
        load_initial()
    on_load = getattr(module, "check_checkpoint", None)
    if ckpt is not None and on_load is not None:
        on_load(read_checkpoint(ckpt))


def index_samples(datamodule: L.LightningDataModule, cfg: DictConfig) -> None:
    """``init=cached`` keys warm starts by sample index: the training data must give it."""
    if OmegaConf.select(cfg, "init.name") != "cached":
        return
    if not hasattr(datamodule, "indexed"):
        raise WarmStartError(
            f"init=cached: {type(datamodule).__name__} (task={cfg.task.name}) does not give "
            "sample indices; use another init for this task"
        )
    datamodule.indexed = True


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


def log_config(cfg: DictConfig, loggers: list[Logger]) -> None:
    """The resolved config in every logger (rank 0 only; the run folder's copy is written by
    :meth:`RunFolder.commit`)."""
    if rank_zero_only.rank != 0:
        return
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)


def close_loggers(loggers: list[Logger], succeeded: bool) -> None:
    """Flush every logger; end this process's W&B run, as failed unless ``succeeded``."""
    for logger in loggers:
        logger.finalize("success" if succeeded else "failed")
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=0 if succeeded else 1)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        return run(cfg)
    except Exception as e:
        refusal = refusal_in(e)
        if refusal is None or HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # a sweep records the job as failed (manifest, report) and goes on
        refuse(refusal)


if __name__ == "__main__":
    main()
