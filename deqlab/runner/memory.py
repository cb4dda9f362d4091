"""Long runs keep their resident memory flat.

A CPU training step allocates and frees hundreds of MB of tensors of a few sizes from several
threads. glibc's allocator keeps what is freed in per-thread arenas for reuse and returns it to
the kernel only from the top of each heap, so scattered free chunks accumulate: the run's
resident memory grows by tens of MB per 1,000 steps although nothing is kept
(``python -m benchmarks.soak``). :class:`ReleaseFreedMemory` hands it back periodically.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback


def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None on another C library (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class ReleaseFreedMemory(Callback):
    """Every ``every_s`` seconds of training: collect Python's cyclic garbage (figures, for
    one, are cycles), then ``malloc_trim(0)``, which returns every free page of every glibc
    arena to the kernel. Does nothing more where the C library has no ``malloc_trim``."""

    def __init__(self, every_s: float = 60.0) -> None:
        if every_s <= 0:
            raise ValueError(f"callbacks.release_memory.every_s must be > 0, got {every_s}")
        self.every_s = every_s
        self.trim = _malloc_trim()
        self.last = time.monotonic()
        self.releases = 0

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.release()
            self.last = now

    def release(self) -> None:
        gc.collect()
        if self.trim is not None:
            self.trim(0)
        self.releases += 1
