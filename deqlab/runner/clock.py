"""Wall-clock figures of a training run, kept across resumes: ``train/epoch_time_s``,
``train/elapsed_s`` (training time of every launch so far, for metric-against-time plots) and,
on CUDA, ``train/peak_cuda_mem_mb`` per epoch."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class TrainingClock:
    """Owned by the module; its two start times travel in the checkpoint as elapsed seconds
    (a run resumed mid-epoch does not start the epoch again)."""

    def __init__(self) -> None:
        self.epoch_t0: float | None = None  # perf_counter() at the epoch's start
        self.fit_t0: float | None = None  # perf_counter() at the start of training

    def start_fit(self) -> None:
        if self.fit_t0 is None:  # else restored from a checkpoint
            self.fit_t0 = time.perf_counter()

    def start_epoch(self) -> None:
        self.epoch_t0 = time.perf_counter()

    def end_epoch(self, log: Callable[[str, float], None], device: torch.device) -> None:
        if self.epoch_t0 is not None:
            log("train/epoch_time_s", time.perf_counter() - self.epoch_t0)
        if device.type == "cuda":
            log("train/peak_cuda_mem_mb", torch.cuda.max_memory_allocated(device) / 2**20)
            torch.cuda.reset_peak_memory_stats(device)

    def log_elapsed(self, log: Callable[..., None]) -> None:
        if self.fit_t0 is not None:  # a step metric whose latest value is the one to log
            log("train/elapsed_s", time.perf_counter() - self.fit_t0, step_reduce="last")

    def save(self, checkpoint: dict[str, Any]) -> None:
        now = time.perf_counter()
        checkpoint["deqlab_epoch_elapsed_s"] = 0.0 if self.epoch_t0 is None else now - self.epoch_t0
        checkpoint["deqlab_fit_elapsed_s"] = 0.0 if self.fit_t0 is None else now - self.fit_t0

    def load(self, checkpoint: dict[str, Any]) -> None:
        now = time.perf_counter()
        self.epoch_t0 = now - checkpoint.get("deqlab_epoch_elapsed_s", 0.0)
        self.fit_t0 = now - checkpoint.get("deqlab_fit_elapsed_s", 0.0)
