"""A run folder that never loses a run and never holds two.

A training run owns its folder (``hydra.run.dir``, a sweep job's folder). Before it writes
a byte there it holds the folder's lock (:func:`~deqlab.runner.cluster.hold_run_folder`),
and it opens a folder that already holds a run (checkpoints, or a saved config) only to
continue that run: ``ckpt_path=last``, a checkpoint of that folder, or a requeued SLURM job.
Anything else is refused before anything is written, unless ``overwrite=true``, which moves
the old run aside (``<folder>.replaced-<time>``) instead of mixing the two.

Hydra writes nothing into the folder here (``hydra.output_subdir: null``, console-only job
logging): the run's records (``.hydra/``, ``config_resolved.yaml``, ``deqlab.log``) are
written by :meth:`RunFolder.commit`, after the lock and every check, so a refused process
changes no byte of a live folder; and a refused run removes only a folder this very process
created (:class:`FolderWitness` knows which existed before Hydra made them).
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .cluster import describe_holder, hold_run_folder
from .files import write_text
from .refusal import Refusal

# Absolute run folders -> whether each existed before this process's Hydra job made it, and
# sweep folders -> the entries they held when the sweep started (FolderWitness).
_RUN_DIRS: dict[Path, bool] = {}
_SWEEP_DIRS: dict[Path, set[str]] = {}

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


class RunFolderHoldsARun(Refusal, RuntimeError):
    """A new run was pointed at a folder that holds another run."""


class FolderWitness(Callback):
    """Hydra callback (``hydra.callbacks.folder_witness``): records, before Hydra creates a
    job's folder, whether it already existed, so that a refused run removes only a folder it
    created itself."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = _absolute(str(config.hydra.run.dir))
        _RUN_DIRS[folder] = folder.exists()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = _absolute(str(config.hydra.sweep.dir))
        _SWEEP_DIRS[sweep] = {e.name for e in sweep.iterdir()} if sweep.is_dir() else set()


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(path))  # as Hydra makes hydra.runtime.output_dir


def existed_before(folder: Path) -> bool:
    """Whether ``folder`` existed before this process's run (unknown: True, so that nothing
    of anybody else's is ever removed)."""
    folder = _absolute(folder)
    if folder in _RUN_DIRS:
        return _RUN_DIRS[folder]
    if folder.parent in _SWEEP_DIRS:
        return folder.name in _SWEEP_DIRS[folder.parent]
    if HydraConfig.initialized() and _hydra_made(folder):
        return True  # a job of a launcher in another process: nothing known, keep it
    return folder.exists()


def _hydra_made(folder: Path) -> bool:
    runtime = HydraConfig.get().get("runtime")
    return runtime is not None and _absolute(str(runtime.get("output_dir") or "")) == folder


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run's checkpoints (what a new run there would lose)."""
    return any((folder / "checkpoints").glob("*.ckpt"))


def aside_name(folder: Path) -> Path:
    """A new sibling name for a run moved aside by ``overwrite=true``."""
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    candidate = folder.with_name(f"{folder.name}.replaced-{stamp}")
    n = 1
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}.replaced-{stamp}-{n}")
    return candidate


class RunFolder:
    """The run's hold on its folder (rank 0 only; other DDP processes write nothing).

    Args:
        folder: the run's folder (``paths.output_dir``).
        reopening: whether this run continues the run in ``folder`` (``ckpt_path=last``, one
            of its own checkpoints, a requeued job).
        overwrite: ``overwrite=true``: a run already in ``folder`` is moved aside.
        mode: ``train``, ``test`` or ``eval`` (evaluations never replace a run's config).
    """

    def __init__(self, folder: Path, reopening: bool, overwrite: bool, mode: str) -> None:
        self.folder = Path(folder)
        self.reopening, self.overwrite, self.mode = reopening, overwrite, mode
        self.created = not existed_before(self.folder)
        self._held = ExitStack()
        self._log: logging.Handler | None = None
        self.moved_to: Path | None = None
        self.committed = False

    def acquire(self) -> None:
        """Take the folder's lock (refusing a second writer by name) and check that this run
        may write there; writes nothing but the lock."""
        self._lock()
        if holds_a_run(self.folder) and not self.reopening and not self.overwrite:
            raise RunFolderHoldsARun(
                f"{self.folder} holds another run's checkpoints; a new run there would mix "
                "with it. To continue that run: ckpt_path=last. To start a "
                "new one: another folder (hydra.run.dir=<new folder>), or overwrite=true to "
                "move the old run aside first"
            )
        if self.overwrite and holds_a_run(self.folder) and self.reopening:
            raise RunFolderHoldsARun(
                "overwrite=true starts a new run in place of the folder's run, but this run "
                "resumes it (ckpt_path=last, or a requeued job): choose one"
            )
        if self.overwrite and Path.cwd().resolve().is_relative_to(self.folder.resolve()):
            raise RunFolderHoldsARun(
                f"overwrite=true moves {self.folder} aside, but the command runs inside it: "
                "start it from another folder"
            )

    def _lock(self) -> None:
        stale = self._held.enter_context(hold_run_folder(self.folder))
        if stale:
            print(
                f"deqlab: {self.folder} was held by {describe_holder(stale)}, which has died; "
                "lock taken over"
            )

    def commit(self, cfg: DictConfig) -> None:
        """Every check passed: move an old run aside (``overwrite``), then write the run's
        records (``.hydra/``, ``config_resolved.yaml``) and start ``deqlab.log``."""
        self.committed = True
        if self.overwrite and holds_a_run(self.folder):
            self.moved_to = aside_name(self.folder)
            os.rename(self.folder, self.moved_to)  # our lock moves with it, still held
            (self.moved_to / ".deqlab.lock").unlink(missing_ok=True)
            self.folder.mkdir()
            self._lock()
            print(
                f"deqlab: overwrite=true: the run that was in {self.folder} is now in {self.moved_to}"
            )
        records = self.folder / ".hydra"
        if self.reopening and (records / "config.yaml").exists():
            # the first launch's records stay; each later launch gets its own
            launches = records / "launches"
            n = 1 + sum(1 for _ in launches.glob("*")) if launches.is_dir() else 1
            records = launches / f"{n}_{self.mode}"
        write_records(cfg, records)
        resolved = OmegaConf.to_yaml(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        evaluation_of_a_run = self.mode != "train" and holds_a_run(self.folder)
        write_text(
            (records if evaluation_of_a_run else self.folder) / "config_resolved.yaml", resolved
        )
        self._log = logging.FileHandler(self.folder / "deqlab.log", mode="a")
        self._log.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(self._log)

    def release(self) -> None:
        if self._log is not None:
            logging.getLogger().removeHandler(self._log)
            self._log.close()
            self._log = None
        self._held.close()

    def discard(self) -> None:
        """After a refused run: release the lock, and remove the folder only if this process
        created it and it is empty (nothing of anybody else's is touched)."""
        self.release()
        empty = self.folder.is_dir() and not any(self.folder.iterdir())
        if self.created and empty and self.folder.resolve() != Path.cwd().resolve():
            self.folder.rmdir()


def write_records(cfg: DictConfig, folder: Path) -> None:
    """What Hydra would write into ``.hydra/``: the job's config, Hydra's, and the command
    line's overrides (``deqlab report`` names runs by them)."""
    write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        write_text(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
        write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))
