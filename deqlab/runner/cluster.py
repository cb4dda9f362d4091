"""What a shared cluster does to a run, handled.

- :func:`hold_run_folder`: one writer per run folder. A second process that opens the folder
  (a requeued job while the old one still runs, the same command in two terminals) is refused
  by name; a lock left by a process that died is taken over.
- :class:`Preemption`: on SIGTERM (or SIGUSR1, what ``sbatch --signal=USR1@90`` sends) the run
  finishes the step it is in, writes ``checkpoints/last.ckpt`` there, mid-epoch, and exits
  with 128 + the signal's number; under SLURM it then requeues its job through Lightning's
  SLURM environment, and the requeued job resumes in the same folder (:func:`slurm_folder`,
  :func:`requeued_checkpoint`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .checkpoint import last_checkpoint
from .refusal import Refusal

LOCK_NAME = ".deqlab.lock"


class RunFolderInUse(Refusal, RuntimeError):
    """Another live process holds the run folder."""


class RunFolderLockError(Refusal, RuntimeError):
    """The run folder's file system refuses ``flock`` (ENOLCK, EPERM, ...)."""


def describe_holder(info: dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (started {when})"


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace").strip()
    try:
        info = json.loads(text) if text else {}
    except json.JSONDecodeError:
        info = {}
    return info if isinstance(info, dict) else {}


@contextmanager
def hold_run_folder(folder: str | Path) -> Iterator[dict[str, Any] | None]:
    """Hold ``folder``'s run lock while the block runs; yields what a dead holder left (its
    pid, host and start time) when its stale lock was taken over, else None.

    The lock is ``flock`` on ``<folder>/.deqlab.lock``: the kernel (or the NFS lock service)
    releases it when its process dies, however it dies, so a lock file whose lock nobody holds
    is stale by construction, and is taken over. The file names its holder, for the message a
    second writer gets. It is removed when the block ends.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    warn_if_lock_is_node_local(folder)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunFolderInUse(
                f"run folder {folder} is in use by {describe_holder(holder)}: a run folder has one "
                "writer. Wait for that process to end (or stop it), or run in another folder "
                "(hydra.run.dir=<new folder>; ckpt_path=<its checkpoint> to start from it)"
            ) from None
        except OSError as e:  # ENOLCK, EPERM, EOPNOTSUPP: the file system cannot lock
            os.close(fd)
            raise RunFolderLockError(
                f"cannot lock run folder {folder} ({errno.errorcode.get(e.errno, e.errno)}: "
                f"{e.strerror}): its file system does not offer flock to this process (an NFS "
                "mount without a lock service, say). Run in a folder on a file system that "
                "locks (local disk, or NFS with lockd), e.g. DEQLAB_LOGS=<such a folder>"
            ) from None
        # the holder before us may have removed the file after we opened it: lock the file that
        # is at the path now
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    stale = _read_holder(fd) or None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
    try:
        yield stale
    finally:
        # still locked: nobody can take the file we remove. Only our own file: the folder
        # may have been moved aside (overwrite=true) and a new lock file made in its place
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def mount_of(folder: Path, mounts: str) -> tuple[str, str, str] | None:
    """The (mount point, file system type, options) of ``/proc/mounts``-format text
    ``mounts`` that holds ``folder``: the longest mount point above it."""
    best = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        point = fields[1].replace("\\040", " ")
        if folder.is_relative_to(point) and (best is None or len(point) > len(best[0])):
            best = (point, fields[2], fields[3])
    return best


def node_local_locks(folder: Path, mounts: str) -> str | None:
    """Why ``flock`` in ``folder`` would not exclude other machines, or None: an NFS mount
    with ``local_lock=flock``/``all`` (the lock never reaches the server) or Lustre mounted
    with ``localflock``."""
    found = mount_of(folder, mounts)
    if found is None:
        return None
    point, fstype, options = found
    opts = options.split(",")
    if fstype.startswith("nfs") and any(o in ("local_lock=flock", "local_lock=all") for o in opts):
        return f"{point} is NFS mounted with {next(o for o in opts if o.startswith('local_lock'))}"
    if fstype == "lustre" and "localflock" in opts:
        return f"{point} is Lustre mounted with localflock"
    return None


def warn_if_lock_is_node_local(folder: Path) -> None:
    """Warn when the run folder's lock holds only on this machine (:func:`node_local_locks`):
    two jobs on two nodes could then both write the folder."""
    try:
        mounts = Path("/proc/mounts").read_text()
    except OSError:  # not Linux: nothing to read
        return
    why = node_local_locks(folder.resolve(), mounts)
    if why:
        warnings.warn(
            f"deqlab: the run folder's lock ({folder / LOCK_NAME}) holds on this machine only: "
            f"{why}. A job on another node could write the same folder; give each job its own "
            "folder (the default), or keep run folders on a file system whose locks reach "
            "the server",
            stacklevel=3,
        )


def slurm_job_id() -> str | None:
    """The SLURM job this process runs in (``<array job>_<task>`` for an array task), or None
    outside SLURM and in an interactive allocation (as Lightning detects it)."""
    if not SLURMEnvironment.detect():
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None:
        return f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_folder(default: str) -> str:
    """A run folder's name: ``slurm_<job id>`` in a SLURM batch job, so that a requeued job
    (same id) finds its checkpoints; ``default`` elsewhere."""
    job = slurm_job_id()
    return default if job is None else f"slurm_{job}"


def slurm_restarted() -> bool:
    """Whether this process is a requeued SLURM batch job (``SLURM_RESTART_COUNT`` > 0)."""
    return slurm_job_id() is not None and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def requeued_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint a requeued SLURM job resumes from: its folder's ``last.ckpt`` (its
    newest, rewritten at every validation and on the preemption signal), when SLURM says the
    job was restarted and the file exists. It takes precedence over ``ckpt_path``, which
    names where the job's first launch started, not where its work stands."""
    if not slurm_restarted():
        return None
    path = last_checkpoint(output_dir)
    return path if path.is_file() else None


class Preempted(SystemExit):
    """The run stopped on a scheduler's signal after checkpointing; exit status 128 + signum,
    what a shell reports for a process ended by that signal (so ``afterok`` dependencies do
    not start)."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


class Preemption(Callback):
    """Checkpoint and stop on a scheduler's warning signal, losing no finished step.

    On one of ``signals`` during training, the step (or validation batch) in progress
    finishes; then Lightning's own stop (:class:`SIGTERMException`, which stops every DDP
    process at the same step) ends the fit, and this callback writes ``<dirpath>/last.ckpt``:
    mid-epoch, at the same point as a kill after a checkpoint, so the resumed run equals the
    uninterrupted one bitwise. The process then exits with 128 + the signal's number. Under
    SLURM with ``requeue``, the job is requeued through Lightning's SLURM environment (which
    runs ``scontrol requeue``), and the requeued job resumes from ``last.ckpt`` in the same
    folder. (Lightning alone stops on SIGTERM without a checkpoint, exits 0, ignores SIGUSR1
    outside SLURM, and under SLURM checkpoints from inside the signal handler, mid-step.)
    """

    def __init__(
        self, dirpath: str, signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1"), requeue: bool = True
    ) -> None:
        unknown = [s for s in signals if not hasattr(signal, s)]
        if unknown:
            raise ValueError(f"callbacks.preemption.signals: no such signal {unknown[0]!r}")
        self.dirpath = Path(dirpath)
        self.signals = tuple(getattr(signal, s) for s in signals)
        self.requeue = requeue
        self.received: int | None = None
        self._trainer: L.Trainer | None = None
        self._previous: dict[int, Any] = {}

    # -- signals -------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning has installed its handlers, which these replace while training
        self._trainer = trainer
        for signum in self.signals:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        trainer = self._trainer
        assert trainer is not None  # installed by on_train_start
        if self.received is None:  # the first signal names the exit status
            self.received = signum
            name = signal.Signals(signum).name
            print(f"deqlab: received {name}: checkpointing after this step", flush=True)
            launcher = trainer.strategy.launcher
            if launcher is not None:  # DDP processes started by this one stop with it
                launcher.kill(signal.SIGTERM)
        # Lightning's own flag: its loops raise SIGTERMException once the step (or the
        # validation batch) in progress is complete, on every DDP process at the same point
        # (rank 0's flag is broadcast)
        trainer._signal_connector.received_sigterm = True

    # -- the checkpoint --------------------------------------------------------------------
    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        if self.received is None:  # Lightning's SIGTERM handler, before on_train_start
            self.received = signal.SIGTERM
        signum = self.received
        path = self.dirpath / "last.ckpt"
        if self.requeue and slurm_job_id() is not None:
            # Lightning's SLURM requeue writes hpc_ckpt_<n>.ckpt (now, at a finished step) and
            # runs `scontrol requeue <job>`; that file becomes last.ckpt, which the requeued job
            # resumes from (requeued_checkpoint): one write in the scheduler's grace period
            root = Path(trainer.default_root_dir)
            before = set(root.glob("hpc_ckpt_*.ckpt"))
            trainer._signal_connector._slurm_sigusr_handler_fn(signum, None)
            written = sorted(set(root.glob("hpc_ckpt_*.ckpt")) - before)
            if trainer.is_global_zero and written:
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(written[-1], path)
        else:
            trainer.save_checkpoint(path, weights_only=False)  # a full state to resume from
        if trainer.is_global_zero:
            print(f"deqlab: checkpoint at step {trainer.global_step} written to {path}", flush=True)
