"""The reversible DEQ (McCallum, Arora & Foster, 2025): its gradient is autograd's through the
unrolled reversible iteration, each sample from its own returned step, in memory that does not
grow with the step count."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from deqlab import DEQ, Bound, build_core

BETA = 0.7


class Cell(nn.Module):
    """f(z, x) = s tanh(W z + x) with per-sample scales s: samples converge at different steps."""

    def __init__(self, batch: int = 5, dim: int = 12):
        super().__init__()
        self.lin = nn.Linear(dim, dim, dtype=torch.float64)
        with torch.no_grad():
            self.lin.weight.mul_(2.0 / torch.linalg.matrix_norm(self.lin.weight, 2))
        self.register_buffer(
            "scale", torch.linspace(0.2, 0.45, batch, dtype=torch.float64)[:, None]
        )

    def forward(self, z, x):
        return self.scale * torch.tanh(self.lin(z) + x)


def unrolled(cell, x, steps: int, beta: float = BETA) -> list[torch.Tensor]:
    """z_0 .. z_steps of the reversible iteration, recorded by autograd."""
    y = z = torch.zeros_like(x)
    zs = [z]
    for _ in range(steps):
        y = (1 - beta) * y + beta * cell(z, x)
        z = (1 - beta) * z + beta * cell(y, x)
        zs.append(z)
    return zs


def grads(loss, cell, x):
    return torch.autograd.grad(loss, [x, *cell.parameters()])


def reversible_deq(**solver) -> DEQ:
    # grad.tol=None: no drift warning (a long solve of a contraction drifts at its start, where
    # the gradient depends least on the states; see the drift test)
    return DEQ({"name": "reversible", "beta": BETA, **solver}, {"name": "reversible", "tol": None})


@pytest.mark.parametrize("tol", [None, 1e-7])
def test_gradient_is_autograd_through_the_unrolled_iteration(tol):
    """tol None: every sample returns step 11; tol 1e-7: each its own step (15 to 19), and
    the reference unrolls each sample to its own."""
    torch.manual_seed(0)
    cell, x = Cell(), torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    c = torch.randn(5, 12, dtype=torch.float64)
    z, info = reversible_deq(max_iter=12 if tol is None else 40, tol=tol, return_final=True)(
        Bound(cell, x), torch.zeros_like(x)
    )
    steps = info.best_step.tolist()
    if tol is None:
        assert steps == [11] * 5
    else:
        assert len(set(steps)) > 1 and max(steps) < 39
    zs = unrolled(cell, x, max(steps))
    ref = torch.stack([zs[s][i] for i, s in enumerate(steps)])
    torch.testing.assert_close(z, ref, rtol=0, atol=1e-14)
    for got, want in zip(grads((z * c).sum(), cell, x), grads((ref * c).sum(), cell, x)):
        assert (got - want).norm() <= 1e-10 * want.norm()


def test_gradcheck_of_a_fixed_number_of_steps():
    torch.manual_seed(1)
    cell = Cell(batch=2, dim=4)
    deq = reversible_deq(max_iter=6, tol=None)

    def fn(x, w):
        f = Bound(lambda z, x, w: cell.scale * torch.tanh(z @ w.T + x), x, w)
        return deq(f, torch.zeros_like(x))[0]

    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    w = (0.5 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x, w))


class SavedBytes:
    """The most bytes autograd held saved for backward at once, forward and backward."""

    def __init__(self):
        self.now = self.peak = 0

    def __enter__(self):
        meter = self

        class Held:
            def __init__(self, t):
                self.t, self.n = t, t.numel() * t.element_size()
                meter.now += self.n
                meter.peak = max(meter.peak, meter.now)

            def __del__(self):
                meter.now -= self.n

        self.hooks = torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.t)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


def test_memory_does_not_grow_with_the_step_count():
    torch.manual_seed(0)
    cell, x = Cell(batch=4, dim=64), torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    peaks, unrolled_peaks = [], []
    for steps in (4, 16, 64):
        with SavedBytes() as m:
            z, _ = reversible_deq(max_iter=steps + 1, tol=None)(Bound(cell, x), torch.zeros_like(x))
            z.sum().backward()
        peaks.append(m.peak)
        with SavedBytes() as m:
            unrolled(cell, x, steps)[-1].sum().backward()
        unrolled_peaks.append(m.peak)
    assert peaks[0] == peaks[1] == peaks[2] > 0
    assert unrolled_peaks[2] > 10 * unrolled_peaks[0]  # the premise: unrolling grows


def test_float32_drift_is_measured_and_warned_of():
    """On the tutorial's conv cell in float32 the recovered states drift from the forward's by
    about (1 + b L) / (1 - b) per step. A short solve with a small beta stays within grad.tol
    of its start and within 1e-3 of autograd's gradient; a long one with beta 0.8 ends far from
    its start, and says so (deq/bwd_rel_residual, DivergenceWarning)."""
    from deqlab.grad import DivergenceWarning

    from .helpers.problems import ConvCell

    torch.manual_seed(0)
    cell, x = ConvCell(chan=4, inner=8), torch.randn(3, 4, 8, 8, requires_grad=True)
    for beta, steps, drifts in ((0.3, 5, False), (0.8, 12, True)):
        deq = DEQ(
            {"name": "reversible", "beta": beta, "max_iter": steps + 1, "tol": None},
            {"name": "reversible", "tol": 1e-4},
        )
        z, info = deq(Bound(cell, x), torch.zeros_like(x))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = grads(z.square().sum(), cell, x)
        (reverse,) = info.backward
        assert reverse.nfe == 2 * steps
        warned = [w for w in caught if issubclass(w.category, DivergenceWarning)]
        assert bool(warned) == drifts == bool((reverse.rel_residual > 1e-4).any())
        if not drifts:
            want = grads(unrolled(cell, x, steps, beta)[-1].square().sum(), cell, x)
            for g, w in zip(got, want):
                assert (g - w).norm() <= 1e-3 * w.norm()


def test_bad_settings_are_refused():
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="beta must lie in"):
        reversible_deq(beta=1.0)
    with pytest.raises(ValueError, match=r"set solver\.name=reversible"):
        DEQ({"name": "anderson"}, {"name": "reversible"})
    with pytest.raises(ValueError, match="one state"):
        DEQ({"name": "reversible"}, {"name": "reversible"}, n_states=2)
    with pytest.raises(ValueError, match="core=sliced"):
        build_core({"name": "sliced"}, {"name": "reversible"}, {"name": "reversible"})
    with pytest.raises(TypeError, match=r"deqlab\.Bound"):
        reversible_deq()(lambda z: 0.5 * torch.tanh(z + x), torch.zeros_like(x))


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0, 2.5, -0.5])
def test_beta_outside_the_open_interval_or_one_is_refused(beta):
    from deqlab.solvers.reversible import check_beta

    with pytest.raises(ValueError, match="beta must lie in"):
        check_beta(beta)


def test_the_solver_counts_two_evaluations_per_step_and_names_itself():
    """max_iter k: k - 1 steps of two f evaluations after the first, 2 (k - 1) + 1 in all; a
    solve that converges earlier stops there; the default relaxation is the paper's 0.5;
    a non-finite f is reported under the solver's name."""
    from deqlab.solvers import reversible

    cell, x = Cell(), torch.randn(5, 12, dtype=torch.float64)
    f = lambda z: cell(z, x)
    z0 = torch.zeros_like(x)
    with torch.no_grad():
        for k in (1, 2, 7):
            res = reversible(f, z0, max_iter=k, tol=None, beta=BETA)
            assert res.nfe == 2 * (k - 1) + 1 and res.trace.shape[0] == k
            torch.testing.assert_close(res.z, unrolled(cell, x, k - 1)[-1], rtol=1e-12, atol=0)
        early = reversible(f, z0, max_iter=200, tol=1e-6, stop_mode="batch_rel", beta=BETA)
        steps = early.trace.shape[0]
        assert bool(early.converged.all()) and steps < 200 and early.nfe == 2 * (steps - 1) + 1
        default = reversible(f, z0, max_iter=9, tol=None)
        assert torch.equal(default.z, reversible(f, z0, max_iter=9, tol=None, beta=0.5).z)
        assert default.aux["beta"] == 0.5
        with pytest.raises(FloatingPointError, match=r"^reversible: f returned non-finite"):
            reversible(lambda z: z * float("nan"), z0, max_iter=5, tol=1e-3)


def test_the_jacobian_penalty_is_taken_at_the_reversible_solves_equilibrium():
    """jac_vecs > 0 under grad=reversible: info.jac_loss is the Hutchinson estimate at the
    returned z* (the same probes drawn from the same seed), and its gradient reaches the cell."""
    from deqlab.regularize import jacobian_loss

    torch.manual_seed(0)
    cell, x = Cell(), torch.randn(5, 12, dtype=torch.float64)
    f = Bound(cell, x)
    deq = reversible_deq(max_iter=60, tol=1e-10)
    torch.manual_seed(1)
    z, info = deq(f, torch.zeros_like(x), jac_vecs=3)
    z_star = z.detach().requires_grad_()
    torch.manual_seed(1)
    want = jacobian_loss(cell(z_star, x), z_star, vecs=3)
    torch.testing.assert_close(info.jac_loss, want, rtol=1e-8, atol=0)
    (g,) = torch.autograd.grad(info.jac_loss, [cell.lin.weight])
    assert g.abs().sum() > 0
    _, silent = deq(f, torch.zeros_like(x))
    assert silent.jac_loss is None
