"""What every solver shares: the result type, the flat (batch, dim) view of a state, and
the per-sample bookkeeping of residuals, best iterates and convergence.

A state is a tensor or a tuple/list of tensors that share the batch dimension (multi-scale
models). Solvers iterate on one flat ``(B, D)`` buffer in a working dtype of at least float32,
and call ``f`` on the original structure and dtype.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from ..state import State, as_tuple
from .capture import recording
from .checks import check_common, check_finite_start

# Added to ||f(z)|| in the relative residual so that z* = 0 does not divide by zero.
REL_EPS = 1e-9


@dataclass
class SolverResult:
    """Outcome of one batched solve.

    Every per-sample field is measured at the returned ``z``: ``abs_residual = ||f(z) - z||``,
    ``rel_residual = ||f(z) - z|| / ||f(z)||``.
    """

    z: State
    abs_residual: Tensor  # (B,)
    rel_residual: Tensor  # (B,)
    nfe: int  # f evaluations spent
    best_step: Tensor  # (B,) step whose iterate is returned (0 = z0)
    converged: Tensor  # (B,) bool
    trace: Tensor  # (steps, B) relative residual of the iterate at each step
    nonfinite: bool = False  # the solve stopped because some iterate went non-finite
    saved: list[State] = field(default_factory=list)  # iterates at the requested `save_at` steps
    # what a solve with max_iter = k would have returned, for each k in the `budgets` asked for
    at_budget: dict[int, SolverResult] = field(default_factory=dict)
    aux: dict[str, Any] = field(default_factory=dict)  # a solver's own outputs (reversible: y)
    fallbacks: list[int] = field(default_factory=list)  # samples handed to each solver.fallback


@dataclass(frozen=True)
class SolveSpec:
    """The settings every solver shares: when a solve stops and what it keeps. A solver takes
    them as keyword arguments (``**common``) beside its own options.

    Args:
        max_iter: at most this many steps (f evaluations for the simple solvers).
        tol: stop a sample (a batch, in the ``batch_*`` modes) once its residual is below
            ``tol``; None runs exactly ``max_iter`` steps with no test (no host reads on CUDA).
        stop_mode: ``abs`` or ``rel`` residual, per sample or per batch (:data:`STOP_MODES`).
        save_at: steps whose iterate the result keeps in ``saved`` (phantom gradients' states).
        return_final: return the last iterate instead of the best (TorchDEQ's option).
        check_every: read the convergence test back every k steps only (see :class:`Tracker`).
        budgets: also return what a solve with each of these ``max_iter`` would have returned
            (``SolverResult.at_budget``, for a budget curve).
    """

    max_iter: int
    tol: float | None
    stop_mode: str = "rel"
    save_at: Sequence[int] = ()
    return_final: bool = False
    check_every: int = 1
    budgets: Sequence[int] = ()

    def __post_init__(self) -> None:
        check_common(self.max_iter, self.tol, self.stop_mode, self.check_every)


SPEC_FIELDS = tuple(f.name for f in fields(SolveSpec))


class FlatState:
    """Maps a state (tensor or tuple of tensors) to a flat ``(B, D)`` view and back."""

    def __init__(self, z0: State):
        self.is_tensor = isinstance(z0, Tensor)
        parts = (z0,) if self.is_tensor else tuple(z0)
        if not parts or not all(isinstance(p, Tensor) for p in parts):
            raise TypeError(
                f"a DEQ state must be a tensor or a non-empty tuple/list of tensors, got {type(z0)}"
            )
        self.batch = parts[0].shape[0]
        for p in parts:
            if p.dim() == 0 or p.shape[0] != self.batch:
                raise ValueError(
                    f"every state tensor needs the batch dimension first; got shapes "
                    f"{[tuple(q.shape) for q in parts]}"
                )
        self.shapes = [tuple(p.shape) for p in parts]
        self.sizes = [p[0].numel() for p in parts]
        self.dtype = parts[0].dtype
        # Solver arithmetic (mixing, Gram matrices, quasi-Newton updates) never runs below fp32.
        self.work_dtype = torch.promote_types(self.dtype, torch.float32)

    def flatten(self, z: State) -> Tensor:
        flat = [p.reshape(self.batch, -1) for p in as_tuple(z)]
        out = flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)
        return out.to(self.work_dtype)

    def unflatten(self, flat: Tensor) -> State:
        flat = flat.to(self.dtype)
        if self.is_tensor:
            return flat.view(self.shapes[0])
        chunks = flat.split(self.sizes, dim=1)
        return tuple(c.reshape(s) for c, s in zip(chunks, self.shapes))

    def check_output(self, fz: State) -> None:
        """Raise if f(z) does not have the structure and shapes of z."""
        got_tensor = isinstance(fz, Tensor)
        parts = (fz,) if got_tensor else tuple(fz) if isinstance(fz, (tuple, list)) else None
        shapes = None if parts is None else [tuple(getattr(p, "shape", ())) for p in parts]
        if got_tensor != self.is_tensor or shapes != self.shapes:
            want = self.shapes[0] if self.is_tensor else self.shapes
            have = shapes[0] if got_tensor else shapes if parts is not None else type(fz)
            raise ValueError(
                f"f(z) must return the same structure and shapes as z: z has {want}, f(z) has "
                f"{have}. A DEQ cell maps the state to a state of the same shape."
            )

    def flat_fn(self, f: Callable[[State], State]) -> Callable[[Tensor], Tensor]:
        """f on the flat view; checks the output structure on the first call."""
        checked = False
        # A (B, D) state in the working dtype is its own flat view: call f directly, since on
        # cheap cells every avoided operation (even a no-op view or cast) is measurable.
        plain = self.is_tensor and len(self.shapes[0]) == 2 and self.dtype == self.work_dtype

        def f_flat(flat: Tensor) -> Tensor:
            nonlocal checked
            fz = f(flat if plain else self.unflatten(flat))
            if not checked:
                self.check_output(fz)
                checked = True
            return fz if plain and fz.dtype == self.work_dtype else self.flatten(fz)

        return f_flat


class _ScratchPool(threading.local):
    """Per-thread free lists of CPU scratch buffers, for the few most recent shapes."""

    max_shapes = 4

    def __init__(self):
        self.free: OrderedDict[tuple, list[Tensor]] = OrderedDict()


_pool = _ScratchPool()


@contextmanager
def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Iterator[Tensor]:
    """Uninitialised working memory for one solve (histories, Broyden slots).

    On the CPU the buffer is recycled across solves: glibc hands allocations above 32 MB back
    to the kernel when they are freed, so a fresh history buffer page-faults in again on every
    solve (20 ms of each 20-step Anderson solve on the tutorial's ResNet cell, a whole f
    evaluation). A buffer is lent to one solve at a time, so nested solves get their own. On
    CUDA the caching allocator already recycles memory, and this is plain ``torch.empty``.
    """
    if device.type != "cpu":
        yield torch.empty(shape, dtype=dtype, device=device)
        return
    key = (shape, dtype)
    free = _pool.free.setdefault(key, [])
    _pool.free.move_to_end(key)
    while len(_pool.free) > _pool.max_shapes:  # forget the least recently used shape
        _pool.free.popitem(last=False)
    buf = free.pop() if free else torch.empty(shape, dtype=dtype, device=device)
    try:
        yield buf
    finally:
        _pool.free.setdefault(key, []).append(buf)


def set_rows_(dst: Tensor, rows: Tensor, src: Tensor | float, on_cpu: bool) -> None:
    """dst[i] = src[i] (or the scalar src) for the samples i in the (B,) mask ``rows``.

    On the CPU a broadcast ``where``/``masked_fill`` over (B, D) is slow and reading the mask
    back is free, so rows are written by index; elsewhere (CUDA, or under torch.compile, which
    fuses it) the masked write avoids a host read.
    """
    if on_cpu:
        index = rows.nonzero().squeeze(1)
        dst[index] = src[index] if isinstance(src, Tensor) else src
    elif isinstance(src, Tensor):
        torch.where(rows.unsqueeze(1), src, dst, out=dst)
    else:
        dst.masked_fill_(rows.unsqueeze(1), src)


class Tracker:
    """Per-sample bookkeeping shared by all solvers, with buffers allocated once.

    For each step k the solver hands over the iterate z_k and f(z_k). The tracker records the
    residuals of z_k, keeps each sample's best iterate (lowest residual in ``stop_mode``) until
    that sample converges, after which the sample is frozen: a batch returns for each sample
    exactly what solving that sample alone would return.

    It is written for few operations per step, since on cheap cells they cost more than the
    arithmetic: residuals go straight into the traces (the best ones are gathered at the end),
    and a converged sample's comparison value becomes -inf, so nothing improves on it.

    The best iterate is kept lazily: the tracker holds a reference to the latest iterate and
    copies rows of it into ``best_z`` only for samples whose residual stops improving. While a
    solve improves every step (the usual case) no iterate is ever copied. Solvers must hand
    over a fresh tensor each step and not write into it afterwards.

    ``return_final``: return the last iterate instead of the best (TorchDEQ's option of that
    name, and the implicit-layers tutorial's Anderson); a converged sample still returns the
    iterate it converged at, and a non-finite iterate is never returned.

    ``step`` returns True when the loop should stop. It makes at most one host read per
    iteration, and none on CUDA when ``tol is None`` (a fixed iteration count).

    ``check_every`` = k > 1 reads the convergence test back once every k steps only. Between
    reads the test still runs on the device and freezes each sample (each batch, in the
    ``batch_*`` modes) that converged, so the result is exactly that of a solve testing every
    step, except ``nfe``: up to k - 1 evaluations more. Under a CUDA-graph recording
    (:mod:`deqlab.solvers.capture`) the tracker makes no host read at all: the recorder cuts
    the solve into k-step graphs at the reads, and ``result`` leaves its checks to the
    recorder.
    """

    def __init__(self, z0: Tensor, spec: SolveSpec):
        batch, dtype, device = z0.shape[0], z0.dtype, z0.device
        max_iter, tol, check_every = spec.max_iter, spec.tol, spec.check_every
        stop_mode, return_final = spec.stop_mode, spec.return_final
        self.tol = tol
        self.max_iter = max_iter
        self.check_every = check_every
        self.recorder = recording()  # a CUDA-graph recorder capturing this solve, or None
        self.use_rel = stop_mode in ("rel", "batch_rel")
        self.per_batch = stop_mode.startswith("batch")
        self.return_final = return_final
        # Reading a flag back is free on the CPU; on CUDA only the convergence test may sync.
        # Under torch.compile a host read would break the graph: take the CUDA paths.
        compiling = torch.compiler.is_compiling()
        self.host_reads = tol is not None or (device.type != "cuda" and not compiling)
        self.on_cpu = device.type == "cpu" and not compiling
        # Deferred tests: the stop and finiteness flags stay on the device between reads.
        self.deferred = check_every > 1 or self.recorder is not None
        if self.recorder is not None:
            self.host_reads = self.on_cpu = False
        self.trace = torch.empty(max_iter, batch, dtype=dtype, device=device)  # relative
        self.abs_trace = torch.empty_like(self.trace)
        # Zeroed when deferred: a replay that stops early leaves later rows as they were.
        new = torch.zeros if self.deferred else torch.empty
        self.improved = new(max_iter, batch, dtype=torch.bool, device=device)
        self.finite = torch.ones((), dtype=torch.bool, device=device)  # every residual so far
        # Row views made once: indexing a tensor is itself an operation.
        self._rows = list(zip(self.trace.unbind(), self.abs_trace.unbind(), self.improved.unbind()))
        # Best residual so far in stop_mode, or -inf once converged (nothing improves on it).
        self.best_res = torch.full((batch,), float("inf"), dtype=dtype, device=device)
        self.best_z: Tensor | None = None  # rows copied out of iterates that stopped improving
        self.latest_z: Tensor | None = None  # the last iterate, referenced, not copied
        self.latest_best = torch.zeros(batch, dtype=torch.bool, device=device)
        self.fz_norm = torch.ones(batch, dtype=dtype, device=device)  # of the latest f(z)
        # per batch: the lowest batch-wide residual so far (the returned iterate's)
        self.best_batch = torch.full((), float("inf"), dtype=dtype, device=device)
        self.save_at = set(spec.save_at)
        self.saved: dict[int, Tensor] = {}
        self.steps = 0
        self.nonfinite = False
        self.budgets = set(spec.budgets)
        # budget k -> (best iterate, converged, non-finite seen, f evaluations) after step k - 1
        self.kept: dict[int, tuple[Tensor, Tensor, bool, int]] = {}
        if self.budgets and self.recorder is not None:
            raise ValueError(
                "budgets: a captured solve cannot keep per-budget states (set "
                "solver.capture=false for a budget curve)"
            )

    def _keep_latest(self, rows: Tensor) -> None:
        """Copy the latest iterate into ``best_z`` for the samples in the mask ``rows``."""
        assert self.latest_z is not None
        if self.best_z is None:  # rows never written are never read: see ``best``
            self.best_z = torch.empty_like(self.latest_z)
        set_rows_(self.best_z, rows, self.latest_z, self.on_cpu)

    def _record(
        self, k: int, z: Tensor, fz: Tensor, diff: Tensor
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Write step k's residuals into the traces (and z into ``saved`` if asked); return
        the per-sample residual in ``stop_mode``, the batch-wide one (``batch_*`` modes, else
        None) and the step's row of improvement flags."""
        rel_row, abs_row, improved_row = self._rows[k]
        abs_res = torch.linalg.vector_norm(diff, dim=1, out=abs_row)
        denom = torch.linalg.vector_norm(fz, dim=1).add_(REL_EPS)
        rel_res = torch.div(abs_res, denom, out=rel_row)
        self.fz_norm = denom  # ||f(z_k)||: the scale of rounding error in f(z_k) - z_k
        self.steps = k + 1
        if k in self.save_at:
            self.saved[k] = z.clone()
        batch_res = None
        if self.per_batch:  # ||F(Z) - Z|| (/ ||F(Z)||) over the whole batch: one system
            batch_res = abs_res.square().sum().sqrt()
            if self.use_rel:
                batch_res = batch_res / (denom - REL_EPS).square().sum().sqrt().add_(REL_EPS)
        return (rel_res if self.use_rel else abs_res), batch_res, improved_row

    def step(
        self, k: int, z: Tensor, fz: Tensor, diff: Tensor | None = None, nfe: int | None = None
    ) -> bool:
        """Record iterate z (= z_k) and its image fz; True when the solve should stop.

        Args:
            k: the step, from 0.
            z: the iterate z_k, a fresh (B, D) tensor the solver does not write into later.
            fz: f(z_k).
            diff: f(z_k) - z_k, if the solver has it already.
            nfe: the f evaluations so far, when not k + 1 (a line search); read for
                ``budgets`` only.
        """
        if diff is None:
            diff = fz - z
        if self.deferred:
            stop = self._step_deferred(k, z, fz, diff)
        else:
            stop = self._step_now(k, z, fz, diff)
        if self.budgets and k + 1 in self.budgets and not stop and k + 1 < self.max_iter:
            self._keep_budget(k, nfe or k + 1)
        return stop

    def _step_now(self, k: int, z: Tensor, fz: Tensor, diff: Tensor) -> bool:
        """``step`` with one host read (see the class doc): a converged sample is frozen and
        the best iterate is kept lazily."""
        res, batch_res, improved_row = self._record(k, z, fz, diff)

        # NaN compares False, so a non-finite iterate is never taken as best.
        if batch_res is not None:
            if self.return_final:  # every finite iterate replaces the last
                improve = torch.isfinite(batch_res).expand_as(res)
            else:
                improve = torch.lt(batch_res, self.best_batch).expand_as(res)
            improved_row.copy_(improve)
            improve = improved_row
            torch.fmin(self.best_batch, batch_res, out=self.best_batch)
        elif self.return_final:  # every finite iterate until the sample converged
            improve = torch.gt(self.best_res, float("-inf"), out=improved_row)
            improve.logical_and_(torch.isfinite(res))
        else:
            improve = torch.lt(res, self.best_res, out=improved_row)
        torch.fmin(self.best_res, res, out=self.best_res)  # fmin ignores NaN
        checks = []
        if self.tol is not None:
            if self.per_batch:
                stop = batch_res
            else:  # all converged: every best_res -inf
                self.best_res.masked_fill_(res <= self.tol, float("-inf"))
                stop = self.best_res.amax()
            # some residual non-finite: amax propagates NaN
            checks += [stop, res.amax()]
        # Samples whose best is the previous iterate and that do not improve now: copy it out
        # before the reference moves on (skipped, after the host read, when there are none).
        stuck = self.latest_best > improve if self.latest_z is not None else None
        if stuck is not None:
            if self.host_reads:
                checks.append(stuck.any())
            else:
                self._keep_latest(stuck)
        # The one host read: on CUDA one transfer, on the CPU items (cheaper than a stack).
        if self.on_cpu:
            flags = [c.item() for c in checks]
        else:
            flags = torch.stack(checks).tolist() if checks else []
        if stuck is not None and self.host_reads and flags.pop():
            self._keep_latest(stuck)
        self.latest_z, self.latest_best = z, improve
        if self.tol is None:
            return False
        stop, res_max = flags
        if not math.isfinite(res_max):
            self.nonfinite = True
            return True
        if self.per_batch:
            if stop <= self.tol:  # the batch converged: every sample counts as converged
                self.best_res.fill_(float("-inf"))
                return True
            return False
        return stop == float("-inf")

    def _keep_budget(self, k: int, nfe: int) -> None:
        """Keep what a solve with ``max_iter = k + 1`` returns, as step k leaves it."""
        converged = self.best_res == float("-inf")
        if self.per_batch:  # a deferred batch test freezes the batch through best_batch
            converged = converged | (self.best_batch == float("-inf"))
        if self.deferred:
            bad = not bool(self.finite)
        else:  # with a test, a non-finite residual would have stopped the solve
            bad = self.tol is None and not bool(torch.isfinite(self.trace[: k + 1]).all())
        self.kept[k + 1] = (self.best().clone(), converged.clone(), bad, nfe)

    def _step_deferred(self, k: int, z: Tensor, fz: Tensor, diff: Tensor) -> bool:
        """``step`` with the tests left on the device between reads (see the class doc): a
        converged sample (batch) is frozen by setting its best residual to -inf, the best
        iterate is copied out at every step (a replay that stops early cannot follow lazy
        references), and non-finite residuals are remembered in ``finite``."""
        res, batch_res, improved_row = self._record(k, z, fz, diff)
        inf = float("-inf")
        if batch_res is not None:
            if self.return_final:  # every finite iterate until the batch converged
                improve = torch.isfinite(batch_res).logical_and_(self.best_batch > inf)
            else:  # -inf once converged: nothing improves on it
                improve = torch.lt(batch_res, self.best_batch)
            improve = improved_row.copy_(improve.expand_as(res))
            torch.fmin(self.best_batch, batch_res, out=self.best_batch)
            if self.tol is not None:
                self.best_batch.masked_fill_(batch_res <= self.tol, inf)
        else:
            if self.return_final:
                improve = torch.gt(self.best_res, inf, out=improved_row)
                improve.logical_and_(torch.isfinite(res))
            else:
                improve = torch.lt(res, self.best_res, out=improved_row)
            torch.fmin(self.best_res, res, out=self.best_res)
            if self.tol is not None:
                self.best_res.masked_fill_(res <= self.tol, inf)
        self.finite.logical_and_(torch.isfinite(res).all())
        if self.best_z is None:
            self.best_z = torch.empty_like(z)
        set_rows_(self.best_z, improve, z, self.on_cpu)
        self.latest_z, self.latest_best = z, improve
        if self.tol is None or (k + 1) % self.check_every or k + 1 == self.max_iter:
            return False  # no test at this step (the solver stops after the last anyway)
        converged = self.best_batch if self.per_batch else self.best_res.amax()
        done = torch.eq(converged, inf).logical_or_(~self.finite)
        if self.recorder is not None:  # the graph ends here; the replay reads `done`
            self.recorder.cut(done)
            return False
        return bool(done.item())  # the one host read (result() reads ``finite`` itself)

    def best(self) -> Tensor:
        """Each sample's best iterate (valid for every sample with a finite best residual)."""
        assert self.latest_z is not None, "best() before any step"
        if self.deferred:
            assert self.best_z is not None
            return self.best_z
        if self.best_z is None or bool(self.latest_best.all()):
            # After one step the latest iterate is z0, the caller's tensor: hand back a copy.
            return self.latest_z.clone() if self.steps == 1 else self.latest_z
        return torch.where(self.latest_best.unsqueeze(1), self.latest_z, self.best_z)

    def result(self, state: FlatState, nfe: int, solver: str) -> SolverResult:
        if self.recorder is not None:  # the result is computed in a graph of its own
            self.recorder.cut(None)
        trace = self.trace[: self.steps]
        nonfinite: bool | Tensor = self.nonfinite
        if self.deferred:
            if self.per_batch:  # a converged batch: every sample counts as converged
                self.best_res.masked_fill_(self.best_batch == float("-inf"), float("-inf"))
            nonfinite = ~self.finite
            if self.recorder is None:
                nonfinite = bool(nonfinite)
        elif self.tol is None:  # no convergence test ran: nothing is marked converged
            nonfinite = bool((~torch.isfinite(trace)).any())
        best_step, best_rel, best_abs = self._best_until(self.steps)
        if self.recorder is None:  # else the recorder checks after its replay
            check_finite_start(best_rel if self.use_rel else best_abs, solver)
        best = self.best()
        saved = [state.unflatten(self.saved.get(k, best)) for k in sorted(self.save_at)]
        out = SolverResult(
            z=state.unflatten(best),
            abs_residual=best_abs,
            rel_residual=best_rel,
            nfe=nfe,
            best_step=best_step,
            converged=self.best_res == float("-inf"),
            trace=trace,
            nonfinite=nonfinite,  # type: ignore[arg-type]  # a device flag while recording
            saved=saved,
        )
        if self.budgets:
            final = replace(out, saved=[])  # the budgets the solve did not stop before
            out.at_budget = {
                k: self._at_budget(k, state) if k in self.kept else final
                for k in sorted(self.budgets)
            }
        return out

    def _best_until(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """Over steps 0 .. k - 1: the step each sample last improved at (step 0 always improves
        unless non-finite), and its relative and absolute residuals there."""
        steps = torch.arange(k, device=self.trace.device).unsqueeze(1)
        best_step = (self.improved[:k] * steps).amax(0)
        at_best = best_step.unsqueeze(0)
        rel = self.trace[:k].gather(0, at_best).squeeze(0)
        return best_step, rel, self.abs_trace[:k].gather(0, at_best).squeeze(0)

    def _at_budget(self, k: int, state: FlatState) -> SolverResult:
        """The result a solve with ``max_iter = k`` returns, from what step k - 1 kept."""
        z, converged, nonfinite, nfe = self.kept[k]
        best_step, rel, abs_res = self._best_until(k)
        return SolverResult(
            z=state.unflatten(z),
            abs_residual=abs_res,
            rel_residual=rel,
            nfe=nfe,
            best_step=best_step,
            converged=converged,
            trace=self.trace[:k],
            nonfinite=nonfinite,
        )


class SolveLoop:
    """What a solver's loop starts from, made one way for every solver:

    - ``spec``: the shared settings (:class:`SolveSpec`), checked;
    - ``state``: the flat view of ``z0``; ``z0``: z0 as one (B, D) tensor in the working dtype;
    - ``f``: f on flat tensors (checks the shape of f(z) at the first call);
    - ``tracker``: the :class:`Tracker` each step reports to.

    A solver is then its update rule::

        run = SolveLoop("my_solver", f, z0, common)
        z, nfe = run.z0, 0
        for k in range(run.spec.max_iter):
            fz = run.f(z)
            nfe += 1
            if run.tracker.step(k, z, fz) or k == run.spec.max_iter - 1:
                break
            z = ...  # the update
        return run.result(nfe)

    Args:
        solver: the solver's name, for messages.
        f: the function whose fixed point is sought, on states shaped as ``z0``.
        z0: the initial state (a tensor or a tuple/list of tensors sharing the batch dim).
        common: the shared settings the solver was called with (:class:`SolveSpec`'s fields).
    """

    __slots__ = ("f", "solver", "spec", "state", "tracker", "z0")

    def __init__(self, solver: str, f: Callable[[State], State], z0: State, common: dict[str, Any]):
        unknown = sorted(set(common) - set(SPEC_FIELDS))
        if unknown:
            raise TypeError(
                f"{solver}: unknown argument(s) {unknown}; the shared ones are "
                f"{list(SPEC_FIELDS)}, and deqlab.solvers.solver_options({solver!r}) lists "
                "the solver's own"
            )
        missing = [a for a in ("max_iter", "tol") if a not in common]
        if missing:
            raise TypeError(f"{solver}: missing the argument(s) {missing}")
        self.solver = solver
        self.spec = SolveSpec(**common)
        self.state = FlatState(z0)
        self.f = self.state.flat_fn(f)
        self.z0 = self.state.flatten(z0)
        self.tracker = Tracker(self.z0, self.spec)

    def result(self, nfe: int) -> SolverResult:
        """The solve's result: each sample's best iterate (or last, ``return_final``)."""
        return self.tracker.result(self.state, nfe, self.solver)
