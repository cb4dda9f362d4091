"""Derivatives beyond dL/dtheta in training: input gradients in eval mode (TorchDEQ issue 4:
a model used as an energy, forces = -dE/dx), against the closed form; and second derivatives
(create_graph=True), which grad=ift refuses by name and phantom / onestep give as ordinary
autograd graphs (gradgradcheck)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqlab import DEQ

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


def test_ift_refuses_a_second_derivative_by_name():
    torch.manual_seed(1)
    model = LinearDEQ(LinearProblem(batch=2, d=4), "ift")
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    energy = model(x).pow(2).sum()
    with pytest.raises(RuntimeError, match="grad=ift gives first derivatives only"):
        torch.autograd.grad(energy, x, create_graph=True)  # refused when the graph is asked


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
