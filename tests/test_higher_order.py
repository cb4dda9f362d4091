"""Derivatives beyond dL/dtheta in training: input gradients in eval mode (TorchDEQ issue 4:
a model used as an energy, forces = -dE/dx), against the closed form; and second derivatives
(create_graph=True): exact under grad=ift (closed forms, a long unrolled iteration, gradcheck
and gradgradcheck), the approximations' own under phantom / onestep, refused by name where
they would be wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqlab import DEQ, Bound, apply_norm

from .helpers.problems import LinearProblem, contraction


class LinearDEQ(nn.Module):
    """E(x) = sum(c * z*(x)), z* = W z* + U x: a DEQ used as an energy."""

    def __init__(self, problem: LinearProblem, grad: str):
        super().__init__()
        self.problem = problem
        solver = {"name": "anderson", "max_iter": 200, "tol": 1e-13, "stop_mode": "abs"}
        backward = {"name": grad}
        if grad == "ift":
            backward.update(solver="anderson", max_iter=200, tol=1e-14, stop_mode="abs")
        self.deq = DEQ(solver, backward)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.problem
        return self.deq(lambda z: z @ p.W.T + x @ p.U.T, torch.zeros_like(x))[0]


def test_input_gradients_in_eval_mode_are_the_closed_form():
    """model.eval() changes the solver's budget, never whether a gradient exists: forces
    -dE/dx = -c (I - W)^-1 U, the closed form, in eval mode as in training."""
    torch.manual_seed(0)
    problem = LinearProblem(batch=3, d=6)
    model = LinearDEQ(problem, "ift").eval()
    c = torch.randn(3, 6, dtype=torch.float64)
    x = problem.x.detach().requires_grad_()
    (forces,) = torch.autograd.grad(-(c * model(x)).sum(), x)
    eye = torch.eye(6, dtype=torch.float64)
    with torch.no_grad():
        want = -c @ torch.linalg.inv(eye - problem.W) @ problem.U  # z* = x U^T (I - W^T)^-1
    torch.testing.assert_close(forces, want, rtol=1e-9, atol=1e-10)
    model.train()
    (again,) = torch.autograd.grad(-(c * model(x)).sum(), x)
    torch.testing.assert_close(again, forces, rtol=1e-10, atol=1e-12)


TIGHT = {"max_iter": 200, "tol": 1e-14, "stop_mode": "abs"}


def exact_deq(**grad) -> DEQ:
    """Forward and ift backward solved to rounding error (float64)."""
    return DEQ(
        {"name": "anderson", **TIGHT}, {"name": "ift", "solver": "anderson", **TIGHT, **grad}
    )


def linear_cell(z, x, w, u):
    return z @ w.T + x @ u.T


def test_ift_second_derivatives_are_the_closed_forms():
    """z* = x U^T (I - W^T)^-1: the Hessian-vector product of E = ||z*||^2 in x, and the
    gradient in W and U of the input-gradient penalty ||dE/dx||^2, equal autograd's through
    the closed form (a linear solve)."""
    torch.manual_seed(3)
    p = LinearProblem(batch=3, d=5, norm=0.7)
    deq = exact_deq()
    v = torch.randn(3, 5, dtype=torch.float64)

    def closed(x, w, u):
        return torch.linalg.solve(torch.eye(5, dtype=torch.float64) - w, (x @ u.T).T).T

    def through_deq(x, w, u):
        return deq(Bound(linear_cell, x, w, u), torch.zeros_like(x))[0]

    found = []
    for z_star in (through_deq, closed):
        energy = z_star(p.x, p.W, p.U).pow(2).sum()
        (dx,) = torch.autograd.grad(energy, p.x, create_graph=True)
        hvp = torch.autograd.grad((dx * v).sum(), p.x, retain_graph=True)[0]
        found.append([hvp, *torch.autograd.grad(dx.pow(2).sum(), [p.W, p.U])])
    for got, want in zip(*found):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    m = torch.linalg.inv(torch.eye(5, dtype=torch.float64) - p.W.T.detach())
    m = p.U.T.detach() @ m  # z* = x M
    torch.testing.assert_close(found[0][0], 2 * v @ m @ m.T, rtol=1e-10, atol=1e-10)


class TanhCell(nn.Module):
    """f(z, x) = tanh(A z + B x + b) with ||A|| = 0.6: a contraction."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.mix = nn.Linear(d, d).double()
        self.inject = nn.Linear(d, d, bias=False).double()
        with torch.no_grad():
            self.mix.weight.mul_(0.6 / torch.linalg.matrix_norm(self.mix.weight, 2))

    def forward(self, z, x):
        return torch.tanh(self.mix(z) + self.inject(x))


@pytest.mark.parametrize("norm", ["none", "weight_norm"])
def test_ift_second_derivatives_match_a_long_unrolled_iteration(norm):
    """A nonlinear energy: forces -dE/dx trained against targets (the parameters' gradient
    of a loss on a gradient) and a Hessian-vector product, through the DEQ and through 300
    steps of f unrolled (a 0.6-contraction: converged to rounding error, and so are its
    derivatives). Under weight norm the parameters reach f through parametrizations."""
    torch.manual_seed(4)
    cell = apply_norm(TanhCell(), norm)
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    v, target = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    deq = exact_deq()

    def unrolled(x):
        z = torch.zeros_like(x)
        for _ in range(300):
            z = cell(z, x)
        return z

    found = []
    for z_star in (lambda x: deq(Bound(cell, x), torch.zeros_like(x))[0], unrolled):
        energy = (z_star(x).pow(2).sum(1) + z_star(x).sum(1)).sum()
        (forces,) = torch.autograd.grad(-energy, x, create_graph=True)
        hvp = torch.autograd.grad((forces * v).sum(), x, retain_graph=True)[0]
        force_loss = (forces - target).pow(2).sum()
        found.append([hvp, *torch.autograd.grad(force_loss, list(cell.parameters()))])
    for got, want in zip(*found):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


class PairCell(nn.Module):
    """A state of two parts: (a, b) -> (tanh(W a + b + x), 0.5 tanh(a) + c)."""

    def forward(self, z, x, w, c):
        a, b = z
        return torch.tanh(a @ w.T + b + x), 0.5 * torch.tanh(a) + c


@pytest.mark.parametrize("state", ["tensor", "pair"])
def test_ift_passes_gradcheck_and_gradgradcheck(state):
    torch.manual_seed(5)
    deq = exact_deq()
    w = contraction(3, 0.5).requires_grad_()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    if state == "tensor":

        def z_star(x, w, c):
            f = Bound(lambda z, x, w, c: torch.tanh(z @ w.T + x) * c, x, w, c)
            return deq(f, torch.zeros_like(x))[0]
    else:

        def z_star(x, w, c):
            zeros = (torch.zeros_like(x), torch.zeros_like(x))
            return deq(Bound(PairCell(), x, w, c), zeros)[0]

    assert torch.autograd.gradcheck(z_star, (x, w, c))
    assert torch.autograd.gradgradcheck(z_star, (x, w, c))


def test_second_derivatives_are_refused_where_they_would_be_wrong():
    """Each refusal names the fix: a closure hides what f reads; a Bound whose function
    reads a tensor needing a gradient that it was not given; the references' Jacobian at
    f(z*); a third derivative; and the modes whose backward is not differentiable."""
    torch.manual_seed(6)
    p = LinearProblem(batch=2, d=4)

    def second(deq, f):
        energy = deq(f, torch.zeros_like(p.x))[0].pow(2).sum()
        (dx,) = torch.autograd.grad(energy, p.x, create_graph=True)
        return dx

    with pytest.raises(RuntimeError, match=r"pass f as deqlab\.Bound\(cell, \*inputs\)"):
        second(exact_deq(), p.f)
    hidden = Bound(lambda z, x: z @ p.W.T + x @ p.U.T, p.x)  # W, U read but not given
    with pytest.raises(RuntimeError, match=r"2 tensor\(s\) that need a gradient besides"):
        second(exact_deq(), hidden)
    f = Bound(linear_cell, p.x, p.W, p.U)
    with pytest.raises(RuntimeError, match=r"set grad\.jacobian_at=z"):
        second(exact_deq(output="fz", jacobian_at="fz"), f)
    dx = second(exact_deq(), f)
    with pytest.raises(RuntimeError, match=r"a third .* would need"):  # a graph of a second
        torch.autograd.grad(dx.pow(2).sum(), p.x, create_graph=True)
    shine = DEQ({"name": "broyden", **TIGHT}, {"name": "shine", **TIGHT})
    with pytest.raises(RuntimeError, match="grad=shine gives first derivatives only"):
        second(shine, f)
    reversible = DEQ({"name": "reversible", "max_iter": 50}, {"name": "reversible"})
    with pytest.raises(RuntimeError, match="grad=reversible gives first derivatives only"):
        second(reversible, f)


@pytest.mark.parametrize("grad", ["phantom", "onestep"])
def test_phantom_and_onestep_differentiate_twice(grad):
    """Their gradients are autograd graphs of a few f steps from z* (held fixed): a
    Hessian-vector product through the DEQ equals the one through those steps written out
    (phantom: 5 steps damped by 0.5; onestep: one step)."""
    torch.manual_seed(2)
    w = contraction(4, 0.6)
    u = torch.randn(4, 4, dtype=torch.float64)
    deq = DEQ(
        {"name": "anderson", "max_iter": 100, "tol": 1e-12, "stop_mode": "abs"}, {"name": grad}
    )
    f = lambda z, x: torch.tanh(z @ w.T + x @ u.T)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 4, dtype=torch.float64)

    def hvp(energy):
        (g,) = torch.autograd.grad(energy(x), x, create_graph=True)
        return torch.autograd.grad((g * v).sum(), x)[0]

    def through_deq(x):
        return deq(lambda z: f(z, x), torch.zeros_like(x))[0].pow(2).sum()

    with torch.no_grad():
        z_star = deq(lambda z: f(z, x), torch.zeros_like(x))[0]

    def written_out(x):
        z = z_star
        for _ in range(5 if grad == "phantom" else 1):
            z = 0.5 * f(z, x) + 0.5 * z if grad == "phantom" else f(z, x)
        return z.pow(2).sum()

    torch.testing.assert_close(hvp(through_deq), hvp(written_out), rtol=1e-10, atol=1e-12)
