"""Timing helpers every benchmark shares. Every timing is the median of ``repeats`` runs after a
warm-up, with min and max kept; on a GPU the device is synchronised around each run. Ratios
compare runs made in the same process."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# deqlab's solvers and TorchDEQ's of the same algorithm
SOLVER_PAIRS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


def timed(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median / min / max seconds of ``fn()`` over ``repeats`` runs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def timed_round_robin(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Like ``timed`` for several functions, run in turns (A B C A B C ...) after warming all
    of them up, so drift in the machine's speed does not favour whichever runs first."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {
        n: {"median": statistics.median(t), "min": min(t), "max": max(t)} for n, t in times.items()
    }


def cuda_graph(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` recorded as one CUDA graph (after a warm-up on a side stream): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """CUDA memory allocated at the peak of one ``fn()`` above what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def import_torchdeq():
    """TorchDEQ and its get_solver, or (None, None) without the dev extra."""
    try:
        import torchdeq
        from torchdeq.solver import get_solver as td_get_solver
    except ImportError:  # the dev extra is not installed
        return None, None
    return torchdeq, td_get_solver


class Throughput:
    """Lightning callback: wall time and items (images or tokens) of training steps after
    ``warmup`` steps."""

    def __new__(cls, warmup: int, device: torch.device):
        from lightning.pytorch.callbacks import Callback

        class Throughput(Callback):
            def __init__(self):
                self.items, self.seconds, self.steps = 0, 0.0, 0
                self.nfe: list[float] = []  # forward f evaluations per measured step

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.steps += 1
                if self.steps > warmup:
                    self.seconds += time.perf_counter() - self.t0
                    self.items += batch[1].numel()
                    info = outputs.get("info") if isinstance(outputs, dict) else None
                    if info is not None:
                        self.nfe.append(info.nfe)

        return Throughput()
