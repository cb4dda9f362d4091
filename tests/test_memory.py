"""Freed memory goes back to the kernel: the allocator behaviour behind a long run's growth,
and the callback that undoes it (python -m benchmarks.soak measures whole runs)."""

from __future__ import annotations

import pytest

from benchmarks.soak import rss_mb
from deqlab.runner.memory import ReleaseFreedMemory


def test_release_returns_scattered_free_memory_to_the_kernel():
    callback = ReleaseFreedMemory()
    if callback.trim is None:
        pytest.skip("no glibc malloc_trim here")
    chunks = [bytearray(4096) for _ in range(50_000)]  # 200 MB from malloc, each page touched
    before = rss_mb()
    del chunks[: len(chunks) - 1 : 1]  # free all but the last: the heap's top stays in use
    freed = rss_mb()
    callback.release()
    after = rss_mb()
    assert freed > before - 50  # the allocator kept the freed pages
    assert after < freed - 120  # release() handed them back
    assert callback.releases == 1


def test_release_runs_once_every_interval(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("deqlab.runner.memory.time.monotonic", lambda: now[0])
    callback = ReleaseFreedMemory(every_s=60)
    calls = []
    monkeypatch.setattr(callback, "release", lambda: calls.append(now[0]))
    for t in (110.0, 159.0, 160.0, 170.0, 219.0, 221.0):
        now[0] = t
        callback.on_train_batch_end(None)
    assert calls == [160.0, 221.0]
    with pytest.raises(ValueError, match=r"every_s must be > 0, got 0"):
        ReleaseFreedMemory(every_s=0)
