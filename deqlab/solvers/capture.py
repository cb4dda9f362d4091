"""Solves recorded as CUDA graphs and replayed (``solver.capture``).

On a GPU a DEQ cell's f often takes 0.05-0.3 ms, less than the CPU needs to launch the
kernels of f and of the solver's own update, so an eager solve spends most of its time
waiting on Python and the driver. A CUDA graph launches a recorded sequence of kernels at
once. deqlab's trackers make no host read inside a graph (:class:`~deqlab.solvers.base.Tracker`,
``check_every``): a solve of budget n with a test every k steps is recorded as ceil(n / k)
graphs of k steps, each ending with a convergence flag on the device, and one graph that
computes the result. A replay runs the step graphs in order, reads the flag after each (one
host read per k steps) and skips to the result graph once every sample has converged. Samples
that converge inside a graph are frozen there, so every statistic is the one a solve testing
every step returns, except ``nfe``, which counts the steps replayed (a multiple of k).

A graph reads and writes fixed addresses: the state z0 and f's inputs are copied into static
buffers before each replay, so f must be called as ``f(z, *args)`` with every tensor that
changes between calls in ``args`` (the cell's parameters are updated in place by optimizers and
stay where they are). Recording runs the solve once eagerly first (a side stream, to load
kernels and pick algorithms), then records; a new recording is made for each new combination
of shapes, dtypes, budget, autocast state and train/eval mode.

:meth:`CapturedSolver.replay` records the solve of any function built from static inputs:
``grad.capture`` (:func:`deqlab.grad.replay_adjoint`) records the backward solve g = J^T g + u
together with the evaluation of f whose graph its vector-Jacobian products run backward.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils import parametrize

from .. import bound
from ..bound import map_tensors
from .checks import check_finite_start

_local = threading.local()


def recording() -> GraphRecorder | None:
    """The recorder capturing the solve running in this thread, if any."""
    return getattr(_local, "recorder", None)


class GraphRecorder:
    """Cuts one solve's recording into graphs at each convergence test (see module doc)."""

    def __init__(self) -> None:
        self.graphs: list[torch.cuda.CUDAGraph] = []
        self.flags: list[Tensor | None] = []  # flag read after graph i (None: never stop)
        self.pool = torch.cuda.graph_pool_handle()  # one pool: the graphs replay in order

    def begin(self) -> None:
        graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may call CUDA meanwhile
        graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
        self.graphs.append(graph)

    def end(self) -> None:
        self.graphs[-1].capture_end()

    def cut(self, done: Tensor | None) -> None:
        """End the current graph (``done``: the flag a replay reads after it) and begin the
        next. ``done=None`` starts the result graph."""
        self.flags.append(done)
        self.end()
        self.begin()


def _leaves(x: Any) -> list[Any]:
    out: list[Any] = []
    map_tensors(out.append, x)
    return out


def _static(x: Any) -> Any:
    return map_tensors(torch.clone, x)


def _signature(x: Any) -> tuple:
    """What a recording depends on: structure, shapes, dtypes, devices of the tensors."""
    return (
        repr(map_tensors(lambda t: None, x)),
        tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in _leaves(x)),
    )


def _copy_into(dst: Any, src: Any) -> None:
    for d, s in zip(_leaves(dst), _leaves(src)):
        d.copy_(s)


def split_bound(f: Callable[..., Any], switch: str) -> tuple[Callable[..., Any], tuple]:
    """``f`` as (cell, inputs): a :class:`~deqlab.bound.Bound`'s, or a module's with no inputs;
    a closure is refused (``switch``: the setting that asked for a replay)."""
    fn, args = (f.fn, f.args) if isinstance(f, bound.Bound) else (f, ())
    if getattr(fn, "__closure__", None):
        raise ValueError(
            f"{switch} replays f on the tensors it read when recorded, and this f reads its "
            "inputs from a closure; pass them in view: deqlab.Bound(cell, x) instead of "
            "lambda z: cell(z, x)"
        )
    return fn, args


# make(*static_inputs) -> (the function to solve, anything the recording must keep alive)
Make = Callable[..., tuple[Callable[[Any], Any], Any]]


class CapturedSolver:
    """``solve(f, z0, ...)`` recorded as CUDA graphs, one recording per call signature.

    ``captured(f, z0, **solver_kwargs)`` returns the solver's :class:`SolverResult` computed by
    replaying; its tensors are fresh (the static buffers are not handed out). :meth:`replay`
    solves any function built from static inputs (the backward solve's ``g -> J^T g + u``).
    """

    def __init__(self, solve: Callable[..., Any], name: str, switch: str = "solver.capture"):
        self.solve = solve
        self.name = name
        self.switch = switch
        self.recordings: dict[tuple, tuple[GraphRecorder, Any, Any, Any, Any]] = {}

    def __call__(self, f: Callable[..., Any], z0: Any, **kwargs: Any) -> Any:
        """Solve ``f(z) = z`` from ``z0`` by replaying; ``f`` a :class:`~deqlab.bound.Bound` (its inputs are
        copied in), a module, or a function that reads no tensor from a closure."""
        fn, args = split_bound(f, self.switch)

        def make(*static_args: Any) -> tuple[Callable[[Any], Any], None]:
            return (lambda z: fn(z, *static_args)), None

        return self.replay((fn, getattr(fn, "training", None)), make, z0, args, kwargs)

    def replay(
        self,
        tag: Any,
        make: Make,
        z0: Any,
        inputs: tuple,
        kwargs: dict[str, Any],
    ) -> Any:
        """Solve the function ``make(*inputs)`` builds, from ``z0``, by replaying.

        Args:
            tag: what else the recording depends on besides the shapes of ``z0`` and
                ``inputs``, the solver's options and autocast (hashable).
            make: builds the function from static copies of ``inputs``; run once eagerly
                and once while recording, so everything it computes is replayed too.
            z0: the start, copied into its static buffer before each replay.
            inputs: the tensors that change between calls (structures of them).
            kwargs: the solver's arguments (``max_iter``, ``tol``, ``check_every``, ...).
        """
        key = (
            tag,
            _signature(z0),
            _signature(inputs),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())),
            torch.is_autocast_enabled("cuda"),
            torch.get_autocast_dtype("cuda"),
        )
        if key not in self.recordings:
            self.recordings[key] = self._record(make, z0, inputs, kwargs)
            n = len(self.recordings)
            if n >= 8 and n & (n - 1) == 0:  # 8, 16, 32, ...: say so, without flooding
                warnings.warn(
                    f"{self.switch}: {n} recordings for this layer, each keeping its graphs "
                    "and memory: every new f, state shape, budget, precision or train/eval "
                    "mode records anew. Pass the same f (a module, or deqlab.Bound(cell, x)) "
                    "and fixed budgets (no fit.jitter) to reuse them.",
                    stacklevel=4,
                )
        rec, static_z0, static_inputs, res, _ = self.recordings[key]
        _copy_into(static_z0, z0)
        _copy_into(static_inputs, inputs)
        steps = 0
        every = kwargs.get("check_every", 1)
        for graph, flag in zip(rec.graphs[:-1], rec.flags):
            graph.replay()
            steps = min(steps + every, kwargs["max_iter"])
            if flag is not None and flag.item():  # the one read per segment
                break
        else:
            steps = kwargs["max_iter"]
        rec.graphs[-1].replay()  # the result
        stop_mode = kwargs.get("stop_mode", "rel")
        best = res.rel_residual if stop_mode in ("rel", "batch_rel") else res.abs_residual
        check_finite_start(best, self.name)
        z = _static(res.z)
        save_at = sorted(kwargs.get("save_at", ()))
        saved = [_static(s) if k < steps else z for k, s in zip(save_at, res.saved)]
        return replace(
            res,
            z=z,
            abs_residual=res.abs_residual.clone(),
            rel_residual=res.rel_residual.clone(),
            nfe=steps,
            best_step=res.best_step.clone(),
            converged=res.converged.clone(),
            trace=res.trace[:steps].clone(),
            nonfinite=bool(res.nonfinite),
            saved=saved,
        )

    def _record(self, make: Make, z0: Any, inputs: tuple, kwargs: dict) -> tuple:
        static_z0, static_inputs = _static(z0), _static(inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        rec = GraphRecorder()
        # Weights cached by parametrize (weight norm) outside the graph would be freed after
        # this call while the graph still read them: record their computation instead.
        saved_cache = dict(parametrize._cache)
        parametrize._cache.clear()
        # Likewise autocast's cache of bf16 weight copies, emptied when the step's autocast
        # region ends: the casts must be kernels in the graph.
        no_cast_cache = torch.autocast(
            "cuda",
            dtype=torch.get_autocast_dtype("cuda"),
            enabled=torch.is_autocast_enabled("cuda"),
            cache_enabled=False,
        )
        try:
            with torch.cuda.stream(side), no_cast_cache:
                fn, _ = make(*static_inputs)  # warm-up: kernels, handles, algorithms
                self.solve(fn, static_z0, **kwargs)
                del fn
                parametrize._cache.clear()
                rec.begin()
                _local.recorder = rec
                try:
                    # what make computes (the backward's f(z*)) is the first graph's start
                    fn, keep = make(*static_inputs)
                    res = self.solve(fn, static_z0, **kwargs)
                finally:
                    _local.recorder = None
                    rec.end()
        finally:
            parametrize._cache.clear()
            parametrize._cache.update(saved_cache)
        torch.cuda.current_stream().wait_stream(side)
        if len(rec.graphs) < 2 or rec.flags[-1] is not None:
            raise TypeError(
                f"solver {self.name!r} cannot be captured: it does not report its steps to "
                f"deqlab's Tracker (the built-in solvers do); use {self.switch}=false"
            )
        # keep: tensors the graphs read after make returned (the backward's recorded f(z*))
        return rec, static_z0, static_inputs, res, keep


def __getattr__(name: str) -> Any:
    if name == "Bound":  # its home until 0.1: deqlab.Bound (deqlab.bound.Bound) now
        warnings.warn(
            "deqlab.solvers.capture.Bound moved to deqlab.bound: use deqlab.Bound",
            DeprecationWarning,
            stacklevel=2,
        )
        return bound.Bound
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
