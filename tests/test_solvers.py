"""Solvers against ground truth: closed forms, recomputed residuals, counted f calls."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks.baseline import tutorial_anderson
from deqlab import get_solver, register_solver
from deqlab.solvers import SolverResult, solver_options

from .helpers.problems import SOLVERS, ConvCell, LinearProblem, contraction


def rel_residual(f, z):
    fz = f(z)
    parts = (z,) if isinstance(z, torch.Tensor) else z
    fparts = (fz,) if isinstance(fz, torch.Tensor) else fz
    b = parts[0].shape[0]
    diff = torch.cat([(a - c).reshape(b, -1) for a, c in zip(fparts, parts)], 1)
    fz_flat = torch.cat([a.reshape(b, -1) for a in fparts], 1)
    return diff.norm(dim=1) / fz_flat.norm(dim=1), diff.norm(dim=1)


@pytest.mark.parametrize("name", SOLVERS)
def test_linear_closed_form(name):
    p = LinearProblem(batch=4, d=12)
    with torch.no_grad():
        res = get_solver(name)(p.f, torch.zeros_like(p.x), max_iter=500, tol=1e-12)
        torch.testing.assert_close(res.z, p.z_star(), rtol=1e-9, atol=1e-9)
    assert res.converged.all()
    assert res.rel_residual.max() <= 1e-12


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_reported_residuals_and_nfe_are_true(name, stop_mode):
    w = contraction(16, 1.5)
    x = torch.randn(5, 16, dtype=torch.float64)
    calls = 0

    def f(z):
        nonlocal calls
        calls += 1
        return torch.tanh(z @ w.T + x)

    res = get_solver(name)(f, torch.zeros_like(x), max_iter=40, tol=1e-6, stop_mode=stop_mode)
    assert res.nfe == calls
    rel, abs_ = rel_residual(f, res.z)
    torch.testing.assert_close(res.rel_residual, rel, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(res.abs_residual, abs_, rtol=1e-6, atol=1e-12)
    stopped = res.abs_residual if stop_mode == "abs" else res.rel_residual
    assert torch.equal(res.converged, stopped <= 1e-6)
    # The trace has one real row per f evaluation, and holds each returned iterate's residual.
    assert res.trace.shape == (res.nfe, 5)
    assert torch.isfinite(res.trace).all()
    picked = res.trace.gather(0, res.best_step.view(1, -1)).squeeze(0)
    torch.testing.assert_close(picked, res.rel_residual)


@pytest.mark.parametrize("name", SOLVERS)
def test_stops_at_budget_and_reports_unconverged(name):
    w = contraction(16, 0.99)
    x = torch.randn(3, 16, dtype=torch.float64)
    res = get_solver(name)(lambda z: z @ w.T + x, torch.zeros_like(x), max_iter=3, tol=1e-12)
    assert res.nfe == 3 and res.trace.shape[0] == 3
    assert not res.converged.any()


@pytest.mark.parametrize("name", SOLVERS)
def test_fixed_iteration_mode_runs_exactly_max_iter(name):
    w = contraction(8, 0.5)
    x = torch.randn(2, 8)
    res = get_solver(name)(
        lambda z: torch.tanh(z @ w.T.float() + x), torch.zeros_like(x), max_iter=7, tol=None
    )
    assert res.nfe == 7 and res.trace.shape == (7, 2)


@pytest.mark.parametrize("name", SOLVERS)
def test_per_sample_independence(name):
    w = contraction(10, 1.2)
    x = (
        torch.randn(6, 10, dtype=torch.float64)
        * torch.linspace(0.1, 3, 6, dtype=torch.float64)[:, None]
    )
    f = lambda xx: lambda z: torch.tanh(z @ w.T + xx)
    batch = get_solver(name)(f(x), torch.zeros_like(x), max_iter=100, tol=1e-8)
    for i in range(6):
        alone = get_solver(name)(
            f(x[i : i + 1]), torch.zeros_like(x[i : i + 1]), max_iter=100, tol=1e-8
        )
        torch.testing.assert_close(batch.z[i : i + 1], alone.z, rtol=0, atol=1e-12)
        assert batch.best_step[i] == alone.best_step[0]


@pytest.mark.parametrize("name", SOLVERS)
def test_tuple_state(name):
    """Two-scale state: z = (a, b) with a (B, 2, 3) and b (B, 5) coupled linearly."""
    b, dims = 3, (6, 5)
    w = contraction(sum(dims), 0.7)
    x = torch.randn(b, sum(dims), dtype=torch.float64)

    def f(z):
        flat = torch.cat([z[0].reshape(b, -1), z[1]], 1)
        out = flat @ w.T + x
        return out[:, :6].reshape(b, 2, 3), out[:, 6:]

    z0 = (torch.zeros(b, 2, 3, dtype=torch.float64), torch.zeros(b, 5, dtype=torch.float64))
    res = get_solver(name)(f, z0, max_iter=300, tol=1e-12)
    assert isinstance(res.z, tuple) and res.z[0].shape == (b, 2, 3) and res.z[1].shape == (b, 5)
    exact = torch.linalg.solve(torch.eye(11, dtype=torch.float64) - w, x.T).T
    torch.testing.assert_close(torch.cat([res.z[0].reshape(b, -1), res.z[1]], 1), exact)
    rel, _ = rel_residual(f, res.z)
    torch.testing.assert_close(res.rel_residual, rel, rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(name, dtype):
    w = contraction(32, 0.6, torch.float32).to(dtype)
    x = torch.randn(4, 32).to(dtype)
    f = lambda z: torch.tanh(z @ w.T + x)
    res = get_solver(name)(
        f, torch.zeros_like(x), max_iter=60, tol=1e-2 if dtype != torch.float64 else 1e-10
    )
    assert res.z.dtype == dtype
    # Solver arithmetic runs in float32 (or float64) whatever the state dtype.
    assert res.rel_residual.dtype == torch.promote_types(dtype, torch.float32)
    assert res.converged.all() and torch.isfinite(res.z).all()


@pytest.mark.parametrize("name", SOLVERS)
def test_nonfinite_keeps_best_finite_iterate(name):
    w = contraction(8, 0.95)
    x = torch.randn(3, 8, dtype=torch.float64)
    calls = 0

    def f(z):
        nonlocal calls
        calls += 1
        out = torch.tanh(z @ w.T + x)
        if calls >= 4:  # blows up for sample 1 from the 4th evaluation on
            out = out.clone()
            out[1] = float("nan")
        return out

    res = get_solver(name)(f, torch.zeros_like(x), max_iter=50, tol=1e-14)
    assert res.nonfinite
    assert torch.isfinite(res.z).all()
    assert not res.converged[1]
    assert res.nfe == 4  # stopped at the first non-finite residual
    assert torch.isfinite(res.rel_residual).all()


@pytest.mark.parametrize("name", SOLVERS)
def test_nonfinite_from_the_start_raises(name):
    x = torch.randn(2, 4)
    with pytest.raises(FloatingPointError, match=f"^{name}: f returned non-finite values"):
        get_solver(name)(lambda z: z + x * float("inf"), torch.zeros_like(x), max_iter=5, tol=1e-3)


@pytest.mark.parametrize("name", SOLVERS)
def test_nonfinite_message_counts_the_samples_and_names_the_first_few(name):
    x = torch.randn(300, 4)
    x[torch.arange(3, 300, 2)] = float("inf")  # 149 of 300 samples
    with pytest.raises(FloatingPointError) as e:
        get_solver(name)(lambda z: z + x, torch.zeros_like(x), max_iter=5, tol=1e-3)
    assert str(e.value) == (
        f"{name}: f returned non-finite values for 149 of 300 samples (indices 3, 5, 7, 9, 11, "
        "...) at every iterate, starting from z0; check the input injection and the cell's "
        "weights (a learning rate too high, or missing weight/spectral normalization)."
    )
    x = torch.randn(3, 4)
    x[1] = float("nan")
    with pytest.raises(FloatingPointError, match=r"for 1 of 3 samples \(indices 1\) at every"):
        get_solver(name)(lambda z: z + x, torch.zeros_like(x), max_iter=5, tol=1e-3)
    x = torch.randn(6, 4)
    x[1:] = float("inf")  # exactly five: all named, no ellipsis
    with pytest.raises(
        FloatingPointError, match=r"for 5 of 6 samples \(indices 1, 2, 3, 4, 5\) at"
    ):
        get_solver(name)(lambda z: z + x, torch.zeros_like(x), max_iter=5, tol=1e-3)


@pytest.mark.parametrize("name", SOLVERS)
def test_shape_mismatch_names_both_shapes(name):
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(2, 5\)"):
        get_solver(name)(lambda z: torch.zeros(2, 5), torch.zeros(2, 4), max_iter=5, tol=1e-3)
    with pytest.raises(ValueError, match="same structure"):
        get_solver(name)(
            lambda z: z[0], (torch.zeros(2, 4), torch.zeros(2, 3)), max_iter=5, tol=1e-3
        )


@pytest.mark.parametrize(
    "z0,fz,have",
    [
        (torch.zeros(2, 4), torch.zeros(2, 5), "(2, 5)"),
        (torch.zeros(2, 4), (torch.zeros(2, 4),), "[(2, 4)]"),
        ((torch.zeros(2, 4), torch.zeros(2, 3)), torch.zeros(2, 4), "(2, 4)"),
        ((torch.zeros(2, 4), torch.zeros(2, 3)), [torch.zeros(2, 4), 1.0], "[(2, 4), ()]"),
        (torch.zeros(2, 4), 3.0, "<class 'float'>"),
    ],
)
def test_a_wrongly_shaped_cell_output_is_described(z0, fz, have):
    """The message shows z's and f(z)'s structure as they are: a shape for a tensor, a list
    of shapes for a tuple or list, the type of anything else."""
    want = "(2, 4)" if isinstance(z0, torch.Tensor) else "[(2, 4), (2, 3)]"
    with pytest.raises(ValueError) as err:
        get_solver("fixed_point")(lambda z: fz, z0, max_iter=3, tol=None)
    assert str(err.value) == (
        f"f(z) must return the same structure and shapes as z: z has {want}, f(z) has {have}. "
        "A DEQ cell maps the state to a state of the same shape."
    )


@pytest.mark.parametrize("stop_mode", ["rel", "abs", "batch_rel", "batch_abs"])
def test_each_stop_rule_reads_its_own_residual(stop_mode):
    """z <- z/2 + c with |c| ~ 1000: the relative residual ||f(z) - z|| / ||f(z)|| reaches 1e-3
    ten steps before the absolute one does. Each rule stops on its own residual."""
    c = torch.full((2, 3), 1000.0, dtype=torch.float64)
    res = get_solver("fixed_point")(
        lambda z: 0.5 * z + c, torch.zeros_like(c), max_iter=60, tol=1e-3, stop_mode=stop_mode
    )
    rel = stop_mode.endswith("rel")
    assert bool(res.converged.all()) and (res.nfe < 20) == rel, res.nfe
    assert bool(((res.rel_residual if rel else res.abs_residual) <= 1e-3).all())
    assert bool((res.abs_residual > 1e-3).all()) == rel


def test_a_fixed_iteration_solve_flags_non_finite_iterates():
    """With tol=None no convergence test runs during the solve, yet a NaN along the way is
    still reported (res.nonfinite); a finite solve is not flagged."""
    calls = []

    def f(z):
        calls.append(1)
        return z * float("nan") if len(calls) == 4 else 0.5 * z + 1

    res = get_solver("fixed_point")(f, torch.zeros(2, 3), max_iter=6, tol=None)
    assert res.nonfinite and not bool(res.converged.any())
    ok = get_solver("fixed_point")(lambda z: 0.5 * z + 1, torch.zeros(2, 3), max_iter=6, tol=None)
    assert not ok.nonfinite


def test_unknown_solver_lists_known_ones():
    with pytest.raises(ValueError, match="anderson, broyden, fixed_point"):
        get_solver("newton")


@pytest.mark.parametrize("name", SOLVERS)
def test_unknown_option_is_rejected(name):
    with pytest.raises(TypeError, match=rf"{name}: unknown argument\(s\) \['max_iters'\]"):
        get_solver(name)(lambda z: z, torch.zeros(1, 2), max_iters=2, tol=1e-3)
    with pytest.raises(TypeError, match=rf"{name}: missing the argument\(s\) \['max_iter'\]"):
        get_solver(name)(lambda z: z, torch.zeros(1, 2), tol=1e-3)


@pytest.mark.parametrize("name", SOLVERS)
def test_bad_stop_mode_budget_and_tolerance(name):
    f = get_solver(name)
    with pytest.raises(ValueError, match="stop_mode"):
        f(lambda z: z, torch.zeros(1, 2), max_iter=2, tol=1e-3, stop_mode="max")
    with pytest.raises(ValueError, match="max_iter"):
        f(lambda z: z, torch.zeros(1, 2), max_iter=0, tol=1e-3)
    with pytest.raises(ValueError, match=r"tol must be >= 0 .*got -0.1"):
        f(lambda z: z, torch.zeros(1, 2), max_iter=2, tol=-0.1)


@pytest.mark.parametrize("tau", [0.0, -0.5, 1.5])
def test_fixed_point_damping_outside_0_1_is_refused(tau):
    with pytest.raises(
        ValueError, match=rf"^fixed_point: damping tau must lie in \(0, 1\], got {tau}$"
    ):
        get_solver("fixed_point")(lambda z: z, torch.zeros(1, 2), max_iter=2, tol=None, tau=tau)


def test_register_custom_solver(restore_registries):
    def halves(f, z0, *, max_iter, tol, stop_mode="rel", save_at=(), scale=0.5):
        return get_solver("fixed_point")(
            f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode, tau=scale
        )

    register_solver("halves", halves)
    assert solver_options("halves") == {"scale": 0.5}
    res = get_solver("halves")(lambda z: 0.5 * z + 1, torch.zeros(2, 3), max_iter=100, tol=1e-6)
    assert isinstance(res, SolverResult)
    torch.testing.assert_close(res.z, torch.full((2, 3), 2.0), atol=1e-4, rtol=0)
    with pytest.raises(TypeError, match="save_at"):
        register_solver("bad", lambda f, z0, *, max_iter, tol, stop_mode="rel": None)


def test_accelerated_solvers_beat_plain_iteration():
    w = contraction(64, 0.95)
    x = torch.randn(8, 64, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    nfe = {n: get_solver(n)(f, torch.zeros_like(x), max_iter=500, tol=1e-8).nfe for n in SOLVERS}
    assert nfe["anderson"] < nfe["fixed_point"] and nfe["broyden"] < nfe["fixed_point"]


@pytest.mark.parametrize("name", SOLVERS)
def test_saved_iterates(name):
    w = contraction(8, 0.9)
    x = torch.randn(2, 8, dtype=torch.float64)
    f = lambda z: z @ w.T + x
    res = get_solver(name)(f, torch.zeros_like(x), max_iter=20, tol=None, save_at=[0, 4])
    assert len(res.saved) == 2
    torch.testing.assert_close(res.saved[0], torch.zeros_like(x))
    if name == "fixed_point":  # z_4 = f^4(0)
        z = torch.zeros_like(x)
        for _ in range(4):
            z = f(z)
        torch.testing.assert_close(res.saved[1], z)


@pytest.mark.parametrize(
    "name,opts,slots", [("anderson", {"m": 2}, 4), ("broyden", {"memory": 3}, 6)]
)
def test_memory_is_bounded(name, opts, slots, monkeypatch):
    """The history holds 2 m (Anderson) or 2 memory (Broyden) state-sized slots whatever
    max_iter is, and a 400-step solve with that little memory still converges."""
    import importlib

    module = importlib.import_module(f"deqlab.solvers.{name}")
    shapes = []
    original = module.scratch

    def recorded(shape, *args):
        shapes.append(shape)
        return original(shape, *args)

    monkeypatch.setattr(module, "scratch", recorded)
    w = contraction(32, 0.9)
    x = torch.randn(4, 32, dtype=torch.float64)
    res = get_solver(name)(
        lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x), max_iter=400, tol=1e-10, **opts
    )
    assert res.converged.all() and res.nfe > 2 * slots
    assert shapes == [(4, slots, 32)]


@pytest.mark.parametrize("memory", [5, 10, 30])
def test_long_solve_with_small_memory(memory):
    """Broyden with fewer slots than steps stays stable on a non-smooth conv cell (dropping
    only the oldest update, as the reference code does, diverges here at memory 10 and 30)."""
    cell = ConvCell().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        res = get_solver("broyden")(
            lambda z: cell(z, x), torch.zeros_like(x), max_iter=400, tol=1e-13, memory=memory
        )
    assert not res.nonfinite and res.converged.all()


@pytest.mark.parametrize("tol", [None, 1e-30])
@pytest.mark.parametrize("cuda_paths", [False, True])
def test_best_iterate_when_residuals_go_up_and_down(tol, cuda_paths):
    """fixed_point on f(z) = z + r_k e has iterates z_k = (r_0 + ... + r_{k-1}) e with residual
    r_k, so each sample's best iterate is known. Residual patterns: always improving, best in
    the middle, best at z0, and improving again after a setback. ``cuda_paths`` takes the CUDA
    code paths on the CPU (copies by ``where``; none of the host reads of a fixed-iteration
    solve)."""
    from deqlab.solvers.base import FlatState, SolveSpec, Tracker

    r = torch.tensor(
        [[5.0, 4.0, 3.0, 2.0, 1.0], [5.0, 4.0, 1.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0, 5.0],
         [5.0, 2.0, 3.0, 4.0, 1.5]], dtype=torch.float64,
    )  # fmt: skip
    best_step = r.argmin(1)
    e = torch.zeros(4, 3, dtype=torch.float64)
    e[:, 0] = 1.0
    z = torch.zeros_like(e)
    state = FlatState(z)
    track = Tracker(z, SolveSpec(5, tol, "abs"))
    if cuda_paths:
        track.on_cpu = False
        track.host_reads = tol is not None
    for k in range(5):
        fz = z + r[:, k : k + 1] * e
        track.step(k, z, fz)
        z = fz
    res = track.result(state, 5, "test")
    assert torch.equal(res.best_step, best_step)
    expected = torch.cumsum(torch.cat([torch.zeros(4, 1, dtype=r.dtype), r], 1), 1)
    torch.testing.assert_close(res.z[:, 0], expected.gather(1, best_step[:, None]).squeeze(1))
    torch.testing.assert_close(res.abs_residual, r.min(1).values)


@pytest.mark.parametrize("name", SOLVERS)
def test_one_step_returns_a_copy_of_z0(name):
    z0 = torch.zeros(2, 3)
    res = get_solver(name)(lambda z: z + 1.0, z0, max_iter=1, tol=1e-3)
    res.z.add_(7.0)
    assert torch.equal(z0, torch.zeros(2, 3))


def test_scratch_is_recycled_on_cpu_and_never_lent_twice():
    from deqlab.solvers.base import scratch

    cpu = torch.device("cpu")
    # A nested solve gets its own buffer.
    with scratch((2, 3), torch.float32, cpu) as a, scratch((2, 3), torch.float32, cpu) as b:
        assert a.data_ptr() != b.data_ptr()
    with scratch((2, 3), torch.float32, cpu) as c:
        assert c.data_ptr() in (a.data_ptr(), b.data_ptr())


@pytest.mark.parametrize("name", SOLVERS)
def test_nested_solves_of_the_same_shape(name):
    """f itself runs a solve of the same shape (a DEQ inside a DEQ cell), so both solves hold
    scratch buffers at once: z* = (I - W)^-1 (I - A)^-1 x for f(z) = W z + solve(y = A y + x)."""
    w, a = contraction(6, 0.5), contraction(6, 0.5)
    x = torch.randn(3, 6, dtype=torch.float64)
    solve = get_solver(name)

    def f(z):
        inner = solve(lambda y: y @ a.T + x, torch.zeros_like(x), max_iter=200, tol=1e-13)
        return z @ w.T + inner.z

    res = solve(f, torch.zeros_like(x), max_iter=200, tol=1e-12)
    eye = torch.eye(6, dtype=torch.float64)
    exact = torch.linalg.solve(eye - w, torch.linalg.solve(eye - a, x.T)).T
    torch.testing.assert_close(res.z, exact, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SOLVERS)
def test_results_do_not_depend_on_earlier_solves(name):
    """Scratch memory is reused uninitialised; a solve must read only what it wrote."""
    w = contraction(16, 0.9)
    x = torch.randn(4, 16, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    first = get_solver(name)(f, torch.zeros_like(x), max_iter=12, tol=None).z
    get_solver(name)(lambda z: 3.0 * z + 1e20, torch.zeros_like(x), max_iter=12, tol=None)
    again = get_solver(name)(f, torch.zeros_like(x), max_iter=12, tol=None).z
    assert torch.equal(first, again)


@pytest.mark.slow
@pytest.mark.parametrize("name", SOLVERS)
def test_fixed_iteration_solve_under_torch_compile(name):
    """Under torch.compile the solvers take the paths without host reads (CUDA's), so the
    iterations of a fixed-iteration solve trace into one graph: the number of graphs does not
    grow with max_iter, and the answer is the eager one."""
    from torch._dynamo.utils import counters

    w = contraction(16, 0.9, torch.float32)
    x = torch.randn(4, 16)
    f = lambda z: torch.tanh(z @ w.T + x)
    graphs = {}
    for max_iter in (6, 12):
        solve = lambda max_iter=max_iter: get_solver(name)(
            f, torch.zeros_like(x), max_iter=max_iter, tol=None
        )
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            eager, traced = solve(), torch.compile(solve)()
        graphs[max_iter] = counters["stats"]["unique_graphs"]
        torch.testing.assert_close(traced.z, eager.z)
        torch.testing.assert_close(traced.trace, eager.trace)
        assert torch.equal(traced.best_step, eager.best_step)
    assert graphs[12] == graphs[6], graphs


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_anderson_iterates_match_the_formula(tau):
    """Each iterate equals a direct transcription of the module docstring, one sample at a
    time: alpha minimises ||sum a_i g_i||^2 + lam_rel ||a||^2 with sum a_i = 1 over the last
    m points, and z+ = tau sum a_i f_i + (1 - tau) sum a_i x_i, after a plain first step."""
    w = contraction(10, 0.9)
    x = torch.randn(3, 10, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    m, lam, steps = 3, 1e-4, 7
    res = get_solver("anderson")(
        f, torch.zeros_like(x), max_iter=steps + 1, tol=None, m=m, lam=lam, tau=tau,
        save_at=range(steps + 1),
    )  # fmt: skip
    for b in range(3):
        xs, fs = [torch.zeros(10, dtype=torch.float64)], []
        for _ in range(steps):
            fs.append(torch.tanh(w @ xs[-1] + x[b]))
            xk, fk = torch.stack(xs[-m:]), torch.stack(fs[-m:])
            gk = fk - xk
            gram = gk @ gk.T
            n = gram.shape[0]
            h = gram + (lam * gram.trace() / n + torch.finfo(gram.dtype).tiny) * torch.eye(n)
            a = torch.linalg.solve(h, torch.ones(n, dtype=torch.float64))
            a = a / a.sum()
            t = tau if len(xs) > 1 else 1.0  # z_1 = f(z_0)
            xs.append(t * a @ fk + (1 - t) * a @ xk)
        for k in range(steps + 1):
            torch.testing.assert_close(res.saved[k][b], xs[k], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("memory", [30, 2])
def test_broyden_iterates_match_the_dense_update(memory):
    """Each iterate equals good Broyden with a dense inverse-Jacobian estimate, one sample at
    a time: z+ = z - B g, then B += (dz - B dg) dz^T B / (dz^T B dg), with B reset to -I when
    ``memory`` updates are in use (memory 2 exercises the restarts)."""
    w = contraction(10, 0.9)
    x = torch.randn(3, 10, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    steps = 9
    res = get_solver("broyden")(
        f, torch.zeros_like(x), max_iter=steps + 1, tol=None, memory=memory,
        save_at=range(steps + 1),
    )  # fmt: skip
    eye = torch.eye(10, dtype=torch.float64)
    for b in range(3):
        z, big_b, used = torch.zeros(10, dtype=torch.float64), -eye, 0
        zs, dz, g_prev = [z], None, None
        for _ in range(steps):
            g = torch.tanh(w @ z + x[b]) - z
            if used == memory:
                big_b, used = -eye, 0
            if dz is not None:
                dg = g - g_prev
                vt = dz @ big_b
                big_b = big_b + torch.outer(dz - big_b @ dg, vt) / (vt @ dg)
                used += 1
            dz = -big_b @ g
            z, g_prev = z + dz, g
            zs.append(z)
        for k in range(steps + 1):
            torch.testing.assert_close(res.saved[k][b], zs[k], rtol=1e-9, atol=1e-10)


def test_broyden_skips_an_update_with_zero_denominator():
    """f(z) = z + c for sample 1 (no fixed point): its residual never changes, so dg = 0 and
    every update has den = 0. Broyden skips them (B stays -I, z_k = k c, nothing
    non-finite), and sample 0 solves exactly as it does alone."""
    w = contraction(6, 0.8)
    x = torch.randn(2, 6, dtype=torch.float64)
    c = torch.randn(6, dtype=torch.float64)

    def f(z):
        return torch.stack([torch.tanh(w @ z[0] + x[0]), z[1] + c])

    res = get_solver("broyden")(f, torch.zeros_like(x), max_iter=8, tol=None, save_at=range(8))
    assert not res.nonfinite and torch.isfinite(res.z).all()
    for k in range(8):
        torch.testing.assert_close(res.saved[k][1], k * c)
    alone = get_solver("broyden")(
        lambda z: torch.tanh(z @ w.T + x[:1]), torch.zeros_like(x[:1]), max_iter=8, tol=None
    )
    torch.testing.assert_close(res.saved[7][0], alone.z[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["fixed_point", "anderson", "broyden"])
def test_batch_stop_rule_stops_on_the_whole_batchs_residual(name):
    """batch_rel stops once ||F(Z) - Z|| / ||F(Z)|| over the batch is below tol (the
    implicit-layers tutorial's rule), even while one slow sample is above it alone."""
    d = 16
    x = torch.randn(8, d, dtype=torch.float64)
    fast, slow = contraction(d, 0.3), contraction(d, 0.95)
    rows = torch.zeros(8, 1, dtype=torch.float64)
    rows[0] = 1.0  # sample 0 contracts slowly
    scale = torch.ones(8, 1, dtype=torch.float64)
    scale[0] = 0.2  # and is small, so the batch norm hides it
    f = lambda z: torch.tanh((1 - rows) * (z @ fast.T) + rows * (z @ slow.T) + x * scale)
    solve = get_solver(name)
    per_sample = solve(f, torch.zeros_like(x), max_iter=200, tol=1e-4, stop_mode="rel")
    per_batch = solve(f, torch.zeros_like(x), max_iter=200, tol=1e-4, stop_mode="batch_rel")
    assert per_batch.nfe < per_sample.nfe and per_sample.converged.all()
    assert per_batch.converged.all() and per_batch.rel_residual[0] > 1e-4  # the batch rule
    z = per_batch.z
    fz = f(z)
    assert ((fz - z).norm() / fz.norm()).item() <= 1e-4
    absolute = solve(f, torch.zeros_like(x), max_iter=200, tol=1e-3, stop_mode="batch_abs")
    fz = f(absolute.z)
    assert (fz - absolute.z).norm().item() <= 1e-3


def test_anderson_over_projection():
    """tau > 1 (the tutorial's beta > 1) is accepted and still finds the fixed point."""
    w = contraction(12, 0.8)
    x = torch.randn(3, 12, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    res = get_solver("anderson")(f, torch.zeros_like(x), max_iter=100, tol=1e-10, tau=1.5)
    assert res.converged.all()
    torch.testing.assert_close(res.z, f(res.z), rtol=1e-8, atol=1e-8)
    with pytest.raises(ValueError, match="tau must be > 0"):
        get_solver("anderson")(f, torch.zeros_like(x), max_iter=5, tol=1e-3, tau=0.0)


def _mixed_problem():
    """f(z) = a_i z + c per sample: samples with |a_i| < 1 improve at every step, those with
    |a_i| > 1 get worse, so per-sample best steps differ and the batch's best lies between."""
    a = torch.tensor([[0.5], [1.15], [0.9], [-1.1], [0.7]], dtype=torch.float64)
    c = torch.randn(5, 6, dtype=torch.float64)
    return lambda z: a * z + c, c


@pytest.mark.parametrize("stop_mode", ["batch_rel", "batch_abs"])
def test_batch_modes_return_the_iterate_with_the_lowest_batch_residual(stop_mode):
    """Per batch, the batch is one system (as in the reference code): one step for all
    samples, the one whose whole-batch residual is lowest; statistics are at that step."""
    f, x = _mixed_problem()
    n = 12
    res = get_solver("fixed_point")(
        f, torch.zeros_like(x), max_iter=n, tol=None, stop_mode=stop_mode, save_at=range(n)
    )
    iterates = res.saved
    batch_res = []
    for z in iterates:
        fz = f(z)
        r = (fz - z).norm()
        batch_res.append((r / fz.norm()).item() if stop_mode == "batch_rel" else r.item())
    best = min(range(n), key=batch_res.__getitem__)
    assert (res.best_step == best).all()
    torch.testing.assert_close(res.z, iterates[best], rtol=0, atol=0)
    rel, abs_ = rel_residual(f, res.z)
    torch.testing.assert_close(res.rel_residual, rel)
    torch.testing.assert_close(res.abs_residual, abs_)
    per_sample = get_solver("fixed_point")(f, torch.zeros_like(x), max_iter=n, tol=None)
    assert len(set(per_sample.best_step.tolist())) > 1  # the problem does tell them apart


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["rel", "batch_rel"])
def test_return_final_returns_the_last_iterate(name, stop_mode):
    f, x = _mixed_problem()
    n = 9
    res = get_solver(name)(
        f,
        torch.zeros_like(x),
        max_iter=n,
        tol=None,
        stop_mode=stop_mode,
        return_final=True,
        save_at=[n - 1],
    )
    torch.testing.assert_close(res.z, res.saved[0], rtol=0, atol=0)
    assert (res.best_step == n - 1).all()
    rel, _ = rel_residual(f, res.z)
    torch.testing.assert_close(res.rel_residual, rel)


@pytest.mark.parametrize("name", SOLVERS)
def test_return_final_on_a_wandering_solve(name):
    """On an f no solver settles in 9 steps, some sample's best iterate is an earlier one;
    return_final returns the last iterate of every sample all the same."""
    x = torch.randn(4, 6, dtype=torch.float64)
    w = 1.5 * torch.randn(6, 6, dtype=torch.float64)
    f = lambda z: 2 * torch.tanh(z @ w.T) + x
    solve = lambda **kw: get_solver(name)(f, torch.zeros_like(x), max_iter=9, tol=None, **kw)
    assert (solve().best_step < 8).any()  # the premise: the best is not always the last
    res = solve(return_final=True, save_at=[8])
    assert (res.best_step == 8).all()
    torch.testing.assert_close(res.z, res.saved[0], rtol=0, atol=0)


@pytest.mark.parametrize("name", SOLVERS)
def test_a_solvers_own_defaults_are_the_configs(name):
    """get_solver(name)(f, z0, ...) in Python and solver.name=<name> with no options behave
    the same: every option the solver takes defaults to the config's value."""
    from deqlab.solvers import SolverConfig

    cfg = SolverConfig(name=name)
    for option, default in solver_options(name).items():
        assert getattr(cfg, option) == default, option


@pytest.mark.parametrize(
    "name,options,message",
    [
        ("anderson", {"m": 0}, "anderson: memory m must be >= 1, got 0"),
        ("anderson", {"lam": -1e-3}, "anderson: regularisation lam must be >= 0, got -0.001"),
        (
            "anderson",
            {"lam_mode": "rel"},
            "anderson: lam_mode must be relative or absolute, got 'rel'",
        ),
        ("broyden", {"memory": 0}, "broyden: memory must be >= 1, got 0"),
    ],
)
def test_bad_solver_options_are_named(name, options, message):
    with pytest.raises(ValueError) as err:
        get_solver(name)(lambda z: z, torch.zeros(1, 2), max_iter=3, tol=None, **options)
    assert str(err.value) == message


@pytest.mark.parametrize(
    "name,options", [("anderson", {"m": 1, "lam": 0.0}), ("broyden", {"memory": 1})]
)
def test_the_smallest_valid_options_solve(name, options):
    p = LinearProblem(norm=0.5)
    res = get_solver(name)(p.f, torch.zeros_like(p.x), max_iter=60, tol=1e-10, **options)
    torch.testing.assert_close(res.z, p.z_star(), rtol=1e-8, atol=1e-8)


def test_return_final_keeps_a_converged_samples_iterate():
    """Per sample, a sample that converged is frozen at the iterate it converged at."""
    a = torch.tensor([[0.5], [0.6], [0.999]], dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    f = lambda z: a * z + x
    res = get_solver("fixed_point")(
        f, torch.zeros_like(x), max_iter=40, tol=1e-6, return_final=True
    )
    assert res.converged[:2].all() and not res.converged[2]
    assert (res.best_step[:2] < 39).all() and res.best_step[2] == 39


def test_anderson_with_absolute_regularization_is_the_tutorials_anderson():
    """lam_mode=absolute, batch_rel and return_final reproduce the implicit-layers tutorial's
    Anderson iterate for iterate (benchmarks/baseline.py transcribes its code): its first two
    plain iterations are deqlab's one-slot first step, its H = G G^T + lam I our Gram matrix."""
    cell = ConvCell().double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    f = lambda z: cell(z, x)
    with torch.no_grad():
        for m, beta in ((5, 1.0), (3, 2.0)):
            theirs, res = tutorial_anderson(
                f, torch.zeros_like(x), m=m, lam=1e-4, max_iter=11, tol=0.0, beta=beta
            )
            ours = get_solver("anderson")(
                f,
                torch.zeros_like(x),
                max_iter=11,
                tol=None,
                stop_mode="batch_rel",
                m=m,
                lam=1e-4,
                lam_mode="absolute",
                tau=beta,
                return_final=True,
            )
            torch.testing.assert_close(ours.z, theirs, rtol=1e-10, atol=1e-12)
            assert ours.nfe == 11 and len(res) == 9  # the tutorial traces steps 2..10


def test_fixed_point_damping_follows_its_formula():
    """z_{k+1} = tau f(z_k) + (1 - tau) z_k, iterate by iterate, on an f whose trajectory
    depends on tau."""
    w = contraction(8, 0.9)
    x = torch.randn(3, 8, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    res = get_solver("fixed_point")(
        f, torch.zeros_like(x), max_iter=6, tol=None, tau=0.4, save_at=range(6)
    )
    z = torch.zeros_like(x)
    for k in range(6):
        torch.testing.assert_close(res.saved[k], z, rtol=1e-14, atol=1e-14)
        z = 0.4 * f(z) + 0.6 * z


@pytest.mark.parametrize("name,history", [("anderson", (2, 10, 64)), ("broyden", (2, 6, 64))])
def test_cpu_solves_recycle_their_history_buffers(name, history):
    """A solver's history on the CPU comes from the scratch pool: a second solve of the same
    shape allocates none (README: histories recycled across solves)."""
    w = contraction(64, 0.5, dtype=torch.float32)
    x = torch.randn(2, 64)
    f = lambda z: torch.tanh(z @ w.T + x)
    shapes = []
    original = torch.empty

    def counting_empty(*args, **kwargs):
        out = original(*args, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    get_solver(name)(f, torch.zeros_like(x), max_iter=5, tol=None)  # warms the pool
    torch.empty = counting_empty
    try:
        get_solver(name)(f, torch.zeros_like(x), max_iter=5, tol=None)
    finally:
        torch.empty = original
    assert history not in shapes  # (batch, 2 slots, dim): from the pool, not allocated


# each solver's options as the config sets them (solver.<option> in conf/solver/<name>.yaml)
CONFIG_OPTIONS = {
    "fixed_point": ("tau", "return_final", "check_every"),
    "anderson": ("m", "lam", "lam_mode", "tau", "return_final", "check_every"),
    "broyden": ("memory", "ls", "keep_inverse", "return_final", "check_every"),
}


@pytest.mark.parametrize("name", SOLVERS)
def test_a_solver_called_without_options_solves_as_the_config_does(name):
    """Behaviour, not signatures: a call with no options gives bit for bit the iterates of
    one that passes every option at the config's value (40 steps, so that Broyden's 30-slot
    memory and Anderson's 5-slot window both fill)."""
    from deqlab.solvers import SolverConfig

    cfg = SolverConfig(name=name)
    w = contraction(48, 0.99)
    x = torch.randn(3, 48, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    plain = get_solver(name)(f, torch.zeros_like(x), max_iter=40, tol=None)
    options = {k: getattr(cfg, k) for k in CONFIG_OPTIONS[name]}
    configured = get_solver(name)(f, torch.zeros_like(x), max_iter=40, tol=None, **options)
    torch.testing.assert_close(plain.z, configured.z, rtol=0, atol=0)
    torch.testing.assert_close(plain.trace, configured.trace, rtol=0, atol=0)
    assert set(CONFIG_OPTIONS[name]) == set(solver_options(name))


def test_window_and_memory_sizes_change_the_iterates():
    """The premise of the test above: on its problem, Anderson's m and Broyden's memory show
    in the trajectory, one slot more or less."""
    w = contraction(48, 0.99)
    x = torch.randn(3, 48, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    for name, option, a, b in (("anderson", "m", 5, 6), ("broyden", "memory", 30, 31)):
        ra = get_solver(name)(f, torch.zeros_like(x), max_iter=40, tol=None, **{option: a})
        rb = get_solver(name)(f, torch.zeros_like(x), max_iter=40, tol=None, **{option: b})
        assert not torch.equal(ra.trace, rb.trace), name


@pytest.mark.parametrize("on_cpu", [True, False])
@pytest.mark.parametrize("scalar", [True, False])
def test_set_rows_writes_exactly_the_masked_rows(on_cpu, scalar):
    from deqlab.solvers.base import set_rows_

    dst = torch.zeros(4, 3)
    rows = torch.tensor([True, False, True, False])
    src = 7.0 if scalar else torch.arange(12.0).reshape(4, 3)
    set_rows_(dst, rows, src, on_cpu)
    want = torch.zeros(4, 3)
    want[0] = 7.0 if scalar else src[0]
    want[2] = 7.0 if scalar else src[2]
    torch.testing.assert_close(dst, want, rtol=0, atol=0)


def test_a_solver_must_be_a_function(restore_registries):
    with pytest.raises(TypeError) as e:
        register_solver("number", 3)
    assert str(e.value) == "solver 'number' must be a function, got int"


# --- Broyden's line search (ls) ----------------------------------------------------------


def overshooting_problem(batch: int = 3, dim: int = 8, start: float = 3.0):
    """g(z) = f(z) - z = -atan(A (z - c)): the secant steps aim at the root like Newton's,
    which overshoots atan's flat tails from ``start`` away."""
    torch.manual_seed(0)
    c = torch.randn(batch, dim, dtype=torch.float64)
    a = 3 * torch.eye(dim, dtype=torch.float64) + 0.3 * torch.randn(dim, dim, dtype=torch.float64)
    return (lambda z: z - torch.atan((z - c) @ a.T)), c + start, c


def test_line_search_rescues_broyden_where_the_full_step_overshoots():
    f, z0, c = overshooting_problem()
    kw = dict(max_iter=40, tol=1e-8, stop_mode="abs")
    plain = get_solver("broyden")(f, z0, **kw)
    searched = get_solver("broyden")(f, z0, ls=True, **kw)
    # the premise: the full steps run away, to |z| ~ 1e16, where f(z) - z rounds to 0
    assert (plain.z - c).abs().max() > 1e6
    assert searched.converged.all()
    torch.testing.assert_close(searched.z, c, rtol=0, atol=1e-8)
    assert searched.nfe > len(searched.trace)  # trials are f evaluations, not steps


def test_line_search_solves_each_sample_as_if_alone():
    """Each sample takes its own step size: a batch's solve is its samples' solves."""
    f, z0, _ = overshooting_problem(batch=3)
    together = get_solver("broyden")(f, z0, max_iter=25, tol=None, ls=True)
    for i in range(3):
        alone = get_solver("broyden")(
            lambda z, i=i: f(z.expand(3, -1))[i : i + 1],
            z0[i : i + 1],
            max_iter=25,
            tol=None,
            ls=True,
        )
        torch.testing.assert_close(alone.z, together.z[i : i + 1], rtol=1e-12, atol=1e-12)


def test_armijo_step_on_atan_takes_the_quadratics_minimiser():
    """g(z) = -atan(z) from z = 3 along Newton's direction d = -atan(3) (1 + 3^2): the full step
    (to -9.49) raises ||g||^2; the quadratic through phi(0), phi'(0) = -phi(0) and phi(1) has
    its minimum at s = phi(0) / (2 phi(1)), which Armijo's condition accepts. Beside it, a
    sample whose full step lands on the root keeps s = 1: each sample searches for itself."""
    from deqlab.solvers.broyden import armijo_step

    f = lambda z: z - torch.atan(z)
    z = torch.tensor([[3.0], [0.5]], dtype=torch.float64)
    gz = f(z) - z
    d = torch.cat([-torch.atan(z[:1]) * 10, -z[1:]])
    phi0, phi1 = torch.atan(z[0]) ** 2, torch.atan(z[0] + d[0]) ** 2
    expected = phi0 / (2 * phi1)
    z_new, fz_new, s, evals = armijo_step(f, z, gz, d)
    assert evals == 2
    torch.testing.assert_close(s[0], expected, rtol=1e-13, atol=0)
    assert s[1].item() == 1.0 and z_new[1].item() == 0.0
    torch.testing.assert_close(z_new, z + s * d, rtol=1e-15, atol=0)
    assert torch.equal(fz_new, f(z_new))
    assert (torch.atan(z_new[0]) ** 2 <= phi0 * (1 - 1e-4 * s[0])).all()


def test_armijo_step_takes_the_full_step_when_no_step_size_helps():
    """Along an ascent direction every trial fails: s shrinks to below 0.01 (at most 8
    evaluations), then the full step is taken, as the references' search does."""
    from deqlab.solvers.broyden import armijo_step

    f = lambda z: z - torch.atan(z)
    z = torch.tensor([[3.0], [0.5]], dtype=torch.float64)
    d = torch.tensor([[1.0], [-0.5]], dtype=torch.float64)  # sample 1: straight to the root
    z_new, _, s, evals = armijo_step(f, z, f(z) - z, d)
    assert s.flatten().tolist() == [1.0, 1.0]
    assert torch.equal(z_new, z + d)
    assert 2 <= evals <= 8


def _armijo_by_hand(phi, phi0, c1=1e-4, min_step=1e-2):
    """The documented search for one sample, in plain floats: (s, f evaluations, accepted)."""
    s, value, evals = 1.0, phi(1.0), 1
    if value <= phi0 * (1 - c1):
        return s, evals, True
    while True:
        quad = phi0 * s * s / (2 * (value - phi0 + phi0 * s))
        quad = quad if math.isfinite(quad) else 0.5 * s
        s = min(max(quad, 0.1 * s), 0.5 * s)
        if s < min_step:
            return 1.0, evals, False
        value, evals = phi(s), evals + 1
        if value <= phi0 * (1 - c1 * s):
            return s, evals, True


def _armijo_on_atan(c1: float):
    """armijo_step on 48 samples of g(z) = -k atan(z) along d = -c z, beside the search
    written out by hand for each sample."""
    from deqlab.solvers.broyden import armijo_step

    k = torch.linspace(0.5, 2.0, 48, dtype=torch.float64).unsqueeze(1)
    downhill = torch.logspace(math.log10(0.3), math.log10(300.0), 40, dtype=torch.float64)
    uphill = -torch.logspace(-3, -1, 8, dtype=torch.float64)
    c = torch.cat([downhill, uphill]).unsqueeze(1)
    z = torch.linspace(-4.0, 4.0, 48, dtype=torch.float64).unsqueeze(1) + 0.05
    f = lambda y: y + k * torch.atan(y)
    d = -c * z
    z_new, fz_new, s, evals = armijo_step(f, z, f(z) - z, d, c1=c1)
    by_hand = [
        _armijo_by_hand(
            lambda t, i=i: (k[i, 0].item() * math.atan(z[i, 0].item() + t * d[i, 0].item())) ** 2,
            (k[i, 0].item() * math.atan(z[i, 0].item())) ** 2,
            c1=c1,
        )
        for i in range(48)
    ]
    want_s = torch.tensor([[h[0]] for h in by_hand], dtype=torch.float64)
    torch.testing.assert_close(s, want_s, rtol=1e-12, atol=0)
    torch.testing.assert_close(z_new, z + want_s * d, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(fz_new, f(z_new), rtol=0, atol=0)
    assert evals == max(h[1] for h in by_hand)
    return s, by_hand


def test_armijo_step_agrees_with_the_search_written_out_by_hand():
    """48 samples stepped along d = -c z, with c from 0.3 (too short, the full step accepted)
    to 300 (no step helps), and slightly uphill (c < 0: each trial halves s until it is below
    min_step): each sample's step size, iterate and f value are those of the one-sample search
    written out in floats, and the batch spends the f evaluations of its slowest sample. With
    a demanding sufficient decrease (c1 = 0.9; TorchDEQ's and scipy's is 1e-4) the same
    holds, and the condition decides differently for some samples."""
    s, by_hand = _armijo_on_atan(1e-4)
    # every branch is taken: accepted at once, after one or two trials, refused after 3 or 7
    branches = {(h[1], h[2]) for h in by_hand}
    assert branches == {(1, True), (2, True), (3, True), (3, False), (7, False)}, branches
    strict, _ = _armijo_on_atan(0.9)
    assert int((strict != s).sum()) >= 3


def test_line_search_is_refused_where_it_cannot_run():
    f, z0, _ = overshooting_problem()
    with pytest.raises(ValueError) as e:
        get_solver("broyden")(f, z0, max_iter=5, tol=1e-3, ls=True, check_every=2)
    assert str(e.value) == (
        "broyden: ls reads its Armijo test back at every trial, so it cannot defer its "
        "convergence tests: set check_every=1 (and capture=false) or ls=false"
    )
    from deqlab import SolverConfig

    with pytest.raises(ValueError) as e:
        SolverConfig(name="anderson", ls=True)
    assert str(e.value) == (
        "solver.ls=True: solver 'anderson' takes no ls (its options: check_every, lam, lam_mode, "
        "m, return_final, tau); ls is an option of broyden (a fallback's options go in "
        "solver.fallback_options.<name>)"
    )


# -- on a GPU (skipped without CUDA) ---------------------------------------------------------


@pytest.mark.requires_cuda
@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_solvers_on_cuda(name, dtype):
    cell = ConvCell(8, 12, 4).cuda().to(dtype)
    x = torch.randn(4, 8, 8, 8, device="cuda", dtype=dtype)
    with torch.no_grad():
        res = get_solver(name)(lambda z: cell(z, x), torch.zeros_like(x), max_iter=60, tol=2e-2)
    assert res.z.device.type == "cuda" and res.z.dtype == dtype
    assert torch.isfinite(res.z).all() and res.converged.all()
