"""Files that a kill never leaves half-written: every checkpoint, cache, report and figure
is written to a temporary name in its folder and renamed into place; an unreadable cache is
reported and rebuilt."""

from __future__ import annotations

import os
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


def save_atomic(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary name, synced to disk, then renamed over ``path``."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())


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
