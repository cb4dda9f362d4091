"""Newton-Krylov (solver=newton_krylov): converges where fixed-point iteration does not settle
(tanh(W z + x) with ||W|| = 2), agrees with Anderson on a contraction, with forward-mode and
finite-difference Jacobian products alike, one stop per sample, an implicit gradient through
its equilibrium that passes gradcheck, and bad settings refused or reported."""

from __future__ import annotations

import pytest
import torch

from deqlab import DEQ
from deqlab.solvers import anderson, fixed_point, newton_krylov

from .helpers.problems import StaggeredCell, contraction


def tanh_map(norm: float, batch: int = 4, d: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    w = contraction(d, norm)
    x = torch.randn(batch, d, dtype=torch.float64)
    return (lambda z: torch.tanh(z @ w.T + x)), w, x


def residual(f, z):
    return float(torch.linalg.vector_norm(f(z) - z, dim=1).max())


@pytest.mark.parametrize("jvp", ["autograd", "fd"])
def test_it_converges_where_fixed_point_iteration_does_not_settle(jvp):
    f, _, x = tanh_map(2.0)
    start = torch.zeros_like(x)
    iterated = fixed_point(f, start, max_iter=200, tol=1e-10, stop_mode="abs")
    assert not bool(iterated.converged.all())
    res = newton_krylov(f, start, max_iter=40, tol=1e-10, stop_mode="abs", jvp=jvp)
    assert bool(res.converged.all())
    assert residual(f, res.z) <= 1e-10


def test_on_a_contraction_it_finds_andersons_fixed_point_with_both_products():
    f, _, x = tanh_map(0.9)
    start = torch.zeros_like(x)
    want = anderson(f, start, max_iter=200, tol=1e-12, stop_mode="abs").z
    for jvp in ("autograd", "fd"):
        got = newton_krylov(f, start, max_iter=30, tol=1e-12, stop_mode="abs", jvp=jvp)
        torch.testing.assert_close(got.z, want, rtol=0, atol=1e-10)
        assert got.best_step.max() <= 8  # superlinear: a few Newton steps


def test_warmup_takes_fixed_point_steps_first():
    """warmup=3: the first three steps are fixed-point iteration's, step for step."""
    f, _, x = tanh_map(0.9)
    start = torch.zeros_like(x)
    plain = fixed_point(f, start, max_iter=4, tol=None)
    warm = newton_krylov(f, start, max_iter=12, tol=1e-12, stop_mode="abs", warmup=3)
    torch.testing.assert_close(warm.trace[:4], plain.trace[:4], rtol=0, atol=0)
    assert bool(warm.converged.all())


def test_each_sample_stops_on_its_own():
    torch.manual_seed(0)
    cell = StaggeredCell(batch=6, dim=16)
    x = torch.randn(6, 16, dtype=torch.float64)
    kw = {"max_iter": 30, "tol": 1e-10, "stop_mode": "abs"}
    together = newton_krylov(lambda z: cell(z, x), torch.zeros_like(x), **kw)
    assert bool(together.converged.all())
    for i in range(6):
        one = lambda z, i=i: cell.scale[i] * torch.tanh(z @ cell.w.T + x[i : i + 1])
        alone = newton_krylov(one, torch.zeros_like(x[:1]), **kw)
        torch.testing.assert_close(together.z[i], alone.z[0], rtol=0, atol=1e-12)
        assert together.best_step[i] == alone.best_step[0]


def test_gradcheck_through_its_equilibrium_with_a_gmres_backward():
    """||W|| = 2: the forward by Newton-Krylov, the implicit backward by GMRES (fixed-point
    iteration on J^T could diverge there): gradcheck on the input."""
    torch.manual_seed(1)
    w = contraction(6, 2.0)
    deq = DEQ(
        {"name": "newton_krylov", "max_iter": 40, "tol": 1e-13, "stop_mode": "abs"},
        {"name": "ift", "solver": "gmres", "max_iter": 30, "tol": 1e-14, "stop_mode": "abs"},
    )

    def solve(x):
        return deq(lambda z: torch.tanh(z @ w.T + x), torch.zeros_like(x))[0]

    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (x,))


def test_bad_settings_are_refused_and_a_stalled_line_search_reported():
    f = lambda z: 0.5 * z
    for bad, message in (
        ({"inner_iters": 0}, "inner_iters must be >= 1"),
        ({"inner_tol": 0.0}, r"inner_tol must lie in \(0, 1\)"),
        ({"jvp": "complex"}, "jvp must be one of"),
        ({"min_step": 0.0}, r"min_step must lie in \(0, 1\]"),
        ({"warmup": -1}, "warmup must be >= 0"),
    ):
        with pytest.raises(ValueError, match=message):
            newton_krylov(f, torch.zeros(1, 3), max_iter=5, tol=1e-6, **bad)
    # f(z) = z + 1 has no fixed point: I - J = 0, and no step decreases the residual
    with pytest.warns(UserWarning, match="line search could not decrease the residual"):
        res = newton_krylov(lambda z: z + 1.0, torch.zeros(2, 3), max_iter=4, tol=1e-6)
    assert not bool(res.converged.any()) and bool(torch.isfinite(res.z).all())
