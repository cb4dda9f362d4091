"""GMRES for affine fixed points (grad.solver=gmres, solver=gmres on linear cells): the closed
form where fixed-point iteration diverges, the implicit gradient against the closed form and
gradcheck, one Krylov space and one stop per sample, and bad settings refused or reported."""

from __future__ import annotations

import pytest
import torch

from deqlab import DEQ
from deqlab.solvers import fixed_point, gmres

from .helpers.problems import LinearProblem


def expanding(d: int, radius: float = 1.5) -> torch.Tensor:
    """A random d x d matrix of spectral radius ``radius`` > 1 (I - W stays invertible)."""
    w = torch.randn(d, d, dtype=torch.float64)
    return radius * w / torch.linalg.eigvals(w).abs().max()


def test_the_forward_solve_is_the_closed_form_where_iteration_diverges():
    torch.manual_seed(0)
    problem = LinearProblem(batch=3, d=12)
    with torch.no_grad():
        problem.W.copy_(expanding(12))
    start = torch.zeros(3, 12, dtype=torch.float64)
    with torch.no_grad():
        res = gmres(problem.f, start, max_iter=40, tol=1e-12, stop_mode="abs")
        diverged = fixed_point(problem.f, start, max_iter=40, tol=1e-12, stop_mode="abs")
    assert bool(res.converged.all()) and res.nfe <= 14  # at most d + 1 evaluations, no restart
    torch.testing.assert_close(res.z, problem.z_star().detach(), rtol=1e-9, atol=1e-9)
    assert not bool(diverged.converged.any())


def test_the_implicit_gradient_is_the_closed_form_where_iteration_diverges():
    """grad.solver=gmres solves (I - J^T) g = u with ||J|| > 1: dL/dx, dL/dU and dL/dW match
    autograd through the closed form z* = x U^T (I - W)^-T."""
    torch.manual_seed(1)
    problem = LinearProblem(batch=4, d=10)
    with torch.no_grad():
        problem.W.copy_(expanding(10, 2.0))
    deq = DEQ(
        {"name": "gmres", "max_iter": 30, "tol": 1e-12, "stop_mode": "abs"},
        {"name": "ift", "solver": "gmres", "max_iter": 30, "tol": 1e-13, "stop_mode": "abs"},
    )
    c = torch.randn(4, 10, dtype=torch.float64)
    leaves = [problem.x, problem.U, problem.W]
    z, info = deq(problem.f, torch.zeros(4, 10, dtype=torch.float64))
    got = torch.autograd.grad((c * z).sum(), leaves)
    want = torch.autograd.grad((c * problem.z_star()).sum(), leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-9)
    assert info.backward and bool(info.backward[0].converged.all())


def test_gradcheck_through_a_gmres_backward():
    torch.manual_seed(2)
    w = expanding(5, 1.3)
    deq = DEQ(
        {"name": "gmres", "max_iter": 20, "tol": 1e-13, "stop_mode": "abs"},
        {"name": "ift", "solver": "gmres", "max_iter": 20, "tol": 1e-14, "stop_mode": "abs"},
    )

    def solve(x, u):
        return deq(lambda z: z @ w.T + x @ u.T, torch.zeros_like(x))[0]

    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(solve, (x, u))


def test_each_sample_has_its_own_krylov_space_and_stop():
    """Samples with 2, 5 and 9 active coordinates of a block-diagonal map converge at
    different steps; each returns what it returns when solved alone."""
    torch.manual_seed(3)
    w = torch.block_diag(expanding(4), expanding(4), expanding(4))
    b = torch.zeros(3, 12, dtype=torch.float64)
    b[0, :1] = 1.0  # one block: a Krylov space of dimension <= 4
    b[1, :5] = torch.randn(5, dtype=torch.float64)
    b[2] = torch.randn(12, dtype=torch.float64)
    f = lambda z: z @ w.T + b
    kw = {"max_iter": 40, "tol": 1e-10, "stop_mode": "abs", "restart": 30}
    together = gmres(f, torch.zeros_like(b), **kw)
    assert bool(together.converged.all())
    assert together.best_step[0] < together.best_step[2]
    for i in range(3):
        alone = gmres(lambda z, i=i: z @ w.T + b[i : i + 1], torch.zeros(1, 12).double(), **kw)
        torch.testing.assert_close(together.z[i], alone.z[0], rtol=1e-10, atol=1e-12)
        assert together.best_step[i] == alone.best_step[0]


def test_bad_settings_are_refused_and_a_nonlinear_map_reported():
    f = lambda z: 0.5 * z + 1.0
    with pytest.raises(ValueError, match="restart length must be >= 1"):
        gmres(f, torch.zeros(1, 3), max_iter=5, tol=1e-6, restart=0)
    with pytest.warns(UserWarning, match="f is not affine"):
        gmres(
            lambda z: torch.tanh(2 * z + 1.0), torch.zeros(2, 6), max_iter=12, tol=1e-12, restart=3
        )
