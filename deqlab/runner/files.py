"""Files that a kill or a full disk never leaves half-written, and the one safe way to read
tensors back.

Every file deqlab writes (checkpoints, caches, config copies, CSV, figures, reports, analysis
output, downloads) goes through :func:`replacing`: written to a temporary name in its folder,
synced, renamed over the old file, and the folder synced, so a reader (or a kill) meets the
previous file or the new one, never a mix. A write that does not fit on its disk raises
:class:`DiskFull`, naming the file and the space free, and leaves the previous file intact.
Outputs a run can do without (figures, reports) are written under :func:`optional_output`,
which turns any failure into a warning instead of ending training.

Every read of a tensor file is :func:`load_tensors` (``weights_only=True``, which holds even
under ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``), so no file a run reads can execute code.
"""

from __future__ import annotations

import errno
import os
import shutil
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch


class DiskFull(OSError):
    """A file that did not fit on its disk (or in the user's quota); nothing was replaced."""


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists and tuples): what a
    ``torch.save`` of it writes, but for a few kB of structure."""
    if isinstance(obj, torch.Tensor):
        return obj.untyped_storage().nbytes()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _out_of_space(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def sync_file(path: str | Path) -> None:
    """Flush ``path``'s data to its disk (before a rename makes it the real file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_folder(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (its directory entry on disk)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:  # some file systems cannot sync a directory: nothing more to do
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


@contextmanager
def replacing(path: str | Path, needed: int | None = None) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write; when the block ends without error it
    is synced, renamed over ``path`` and the rename synced, so a reader (or a kill) never meets
    a half-written file under ``path``.

    A failure for want of space (``ENOSPC``/``EDQUOT`` anywhere in the error's chain, or any
    error when fewer than ``needed`` bytes were free) raises :class:`DiskFull` naming ``path``,
    the space free and, when known, ``needed``; ``path`` itself is untouched and the temporary
    file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    free = shutil.disk_usage(path.parent).free  # before: a failed write's file may stay open
    try:
        try:
            yield tmp
            sync_file(tmp)
        except Exception as e:
            if not (_out_of_space(e) or (needed is not None and free < needed)):
                raise
            need = f"about {_mb(needed)} needed, " if needed is not None else ""
            raise DiskFull(
                errno.ENOSPC,
                f"no space left on device writing {path}: {need}{_mb(free)} free. Free space "
                "there, or write elsewhere (hydra.run.dir=<folder on a larger disk>); the "
                "previous file is intact",
            ) from e
        os.replace(tmp, path)
        sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(
    path: str | Path, write: Callable[[IO[bytes]], Any], needed: int | None = None
) -> None:
    """``write(fh)`` into a binary file handle, then put the file in place as
    :func:`replacing` does. Writing through Python's file handle is what makes a full disk an
    ``ENOSPC`` error (torch's own writer reports it as ``basic_ios::clear: iostream error``)."""
    with replacing(path, needed) as tmp, open(tmp, "wb") as fh:
        write(fh)


def write_text(path: str | Path, text: str) -> None:
    """``text`` (UTF-8) at ``path``, atomically (:func:`replacing`)."""
    data = text.encode("utf-8")
    write_atomic(path, lambda fh: fh.write(data), needed=len(data))


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` at ``path``, atomically; a full disk raises :class:`DiskFull` with
    the space the tensors need."""
    write_atomic(path, lambda fh: torch.save(obj, fh), needed=tensor_bytes(obj))


def save_figure(fig: Any, path: str | Path, **savefig: Any) -> None:
    """A matplotlib figure at ``path`` (its format from the suffix), atomically."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    write_atomic(path, lambda fh: fig.savefig(fh, format=fmt, **savefig))


@contextmanager
def optional_output(what: str) -> Iterator[None]:
    """Run the block; if it fails (a full disk, a figure that cannot be drawn), warn naming
    ``what`` and go on: figures and reports never end a training run."""
    try:
        yield
    except Exception as e:
        warnings.warn(f"deqlab: {what} was not written: {e}", stacklevel=3)


def load_tensors(path: str | Path, mmap: bool = True) -> Any:
    """The tensors and plain containers in a torch file, never anything else: always
    ``weights_only=True`` (torch then refuses any other object, even under
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``). Zip files (every ``torch.save`` since torch 1.6)
    are memory-mapped with ``mmap``; legacy (pre-zip) files, in which some released reference
    weights come, are read whole."""
    mmap = mmap and zipfile.is_zipfile(path)
    return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


def load_cache(path: str | Path) -> dict[str, Any] | None:
    """A cache written by :func:`save_atomic`, or None when absent or unreadable (warned:
    the caller rebuilds it)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = load_tensors(path, mmap=False)
        if not isinstance(saved, dict):
            raise TypeError(f"expected a dict, found {type(saved).__name__}")
        return saved
    except Exception as e:  # any damage: the cache is only a shortcut, rebuild it
        warnings.warn(
            f"cache {path} is unreadable ({type(e).__name__}); rebuilding it", stacklevel=2
        )
        return None
