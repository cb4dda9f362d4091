"""Files that a kill never leaves half-written: every checkpoint, cache, report and figure
is written to a temporary name in its folder and renamed into place; an unreadable cache is
reported and rebuilt; a full disk is named with the file, the space needed and the space
free."""

from __future__ import annotations

import errno
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write, renamed over ``path`` when the block
    ends without error: a reader (or a kill) never meets a half-written file under ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def _out_of_space(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary name, synced to disk, then renamed over ``path``.

    A write that fails for want of space (torch reports it as ``basic_ios::clear: iostream
    error`` or ``unexpected pos``) raises :class:`DiskFull` naming the file and the space
    needed and free; the previous file at ``path`` is untouched and no partial file is left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(path.parent).free  # before: a failed write's file may stay open
    try:
        with replacing(path) as tmp:
            torch.save(obj, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
    except Exception as e:
        needed = tensor_bytes(obj)
        if not (_out_of_space(e) or free < needed):
            raise
        raise DiskFull(
            errno.ENOSPC,
            f"no space left on device writing {path}: about {needed / 2**20:.1f} MB needed, "
            f"{free / 2**20:.1f} MB free. Free space there, or write elsewhere "
            "(hydra.run.dir=<folder on a larger disk>); the previous file is intact",
        ) from e


def load_cache(path: str | Path) -> dict[str, Any] | None:
    """A cache written by :func:`save_atomic`, or None when absent or unreadable (warned:
    the caller rebuilds it)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        if not isinstance(saved, dict):
            raise TypeError(f"expected a dict, found {type(saved).__name__}")
        return saved
    except Exception as e:  # any damage: the cache is only a shortcut, rebuild it
        warnings.warn(
            f"cache {path} is unreadable ({type(e).__name__}); rebuilding it", stacklevel=2
        )
        return None
