"""Gradient modes against ground truth: closed forms, long unrolled autograd, gradcheck."""

from __future__ import annotations

import pytest
import torch

from benchmarks.baseline import TutorialDEQFixedPoint
from deqlab import DEQ

from .helpers.problems import GRADS, SOLVERS, ConvCell, LinearProblem, contraction

TIGHT = {"max_iter": 400, "tol": 1e-13}


def tight_deq(solver="anderson", grad="ift", **grad_opts):
    return DEQ(solver={"name": solver, **TIGHT}, grad={"name": grad, **TIGHT, **grad_opts})


@pytest.mark.parametrize("fwd", SOLVERS)
@pytest.mark.parametrize("bwd", SOLVERS)
def test_ift_linear_closed_form(fwd, bwd):
    """dL/dW, dL/dU, dL/dx for L = <c, z*> with z* = x U^T (I - W)^-T."""
    p = LinearProblem(batch=3, d=8)
    deq = DEQ(solver={"name": fwd, **TIGHT}, grad={"name": "ift", "solver": bwd, **TIGHT})
    z, info = deq(p.f, torch.zeros_like(p.x))
    c = torch.randn_like(z)
    (z * c).sum().backward()

    W, U, x = p.W.detach(), p.U.detach(), p.x.detach()
    g = c @ torch.linalg.inv(torch.eye(8, dtype=torch.float64) - W)  # (I - W)^-T applied per row
    z_star = p.z_star().detach()
    for got, want in ((p.x.grad, g @ U), (p.U.grad, g.T @ x), (p.W.grad, g.T @ z_star)):
        err = (got - want).norm() / want.norm()
        assert err < 1e-8, err
    assert len(info.backward) == 1 and info.backward[0].converged.all()


def unrolled(f, z0, steps):
    z = z0
    for _ in range(steps):
        z = f(z)
    return z


def grads_of(loss, params):
    return torch.autograd.grad(loss, params)


def test_ift_tanh_matches_long_unrolled_autograd():
    w = contraction(10, 0.9).requires_grad_()
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    f = lambda z: torch.tanh(z @ w.T + x)
    c = torch.randn(4, 10, dtype=torch.float64)
    z, _ = tight_deq()(f, torch.zeros_like(x))
    got = grads_of((z * c).sum(), [w, x])
    want = grads_of((unrolled(f, torch.zeros_like(x), 600) * c).sum(), [w, x])
    for a, b in zip(got, want):
        assert (a - b).norm() / b.norm() < 1e-6


def test_ift_conv_cell_matches_long_unrolled_autograd():
    cell = ConvCell().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    f = lambda z: cell(z, x)
    c = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    params = [x, *cell.parameters()]
    z, info = tight_deq("broyden")(f, torch.zeros_like(x))
    assert info.converged.all()
    got = grads_of((z * c).sum(), params)
    want = grads_of((unrolled(f, torch.zeros_like(x), 300) * c).sum(), params)
    for a, b in zip(got, want):
        assert (a - b).norm() / b.norm().clamp_min(1e-12) < 1e-6


def test_ift_gradcheck_wrt_input_and_weights():
    x = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    w = contraction(5, 0.7).requires_grad_()
    u = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)
    deq = tight_deq()

    def layer(x, w, u):
        z, _ = deq(lambda z: torch.tanh(z @ w.T + x @ u.T), torch.zeros_like(x))
        return z

    assert torch.autograd.gradcheck(layer, (x, w, u), eps=1e-6, atol=1e-6)


def test_ift_gradcheck_tuple_state():
    """Two coupled blocks, as in a multi-scale model."""
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    w = contraction(7, 0.6).requires_grad_()
    deq = tight_deq("broyden")

    def f(z):
        out = torch.tanh(
            torch.cat([z[0], z[1]], 1) @ w.T + torch.cat([x, x[:, :1].expand(2, 4)], 1)
        )
        return out[:, :3], out[:, 3:]

    def layer(x, w):
        z, _ = deq(
            f, (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64))
        )
        return z[0].sum(1) + 2 * z[1].sum(1)

    assert torch.autograd.gradcheck(layer, (x, w), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps,tau", [(1, 1.0), (3, 0.5), (5, 0.8)])
def test_phantom_equals_autograd_through_its_steps(steps, tau):
    w = contraction(10, 0.9).requires_grad_()
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    f = lambda z: torch.tanh(z @ w.T + x)
    c = torch.randn(4, 10, dtype=torch.float64)
    deq = DEQ(
        solver={"max_iter": 40, "tol": 1e-3}, grad={"name": "phantom", "steps": steps, "tau": tau}
    )
    z_out, info = deq(f, torch.zeros_like(x))
    got = grads_of((z_out * c).sum(), [w, x])

    z = info.z.detach()  # the solver's z*, then exactly k damped steps with autograd
    for _ in range(steps):
        z = tau * f(z) + (1 - tau) * z
    torch.testing.assert_close(z_out, z, rtol=1e-12, atol=1e-12)
    want = grads_of((z * c).sum(), [w, x])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_onestep_equals_one_step_of_autograd():
    w = contraction(10, 0.9).requires_grad_()
    x = torch.randn(4, 10, dtype=torch.float64, requires_grad=True)
    f = lambda z: torch.tanh(z @ w.T + x)
    z_out, info = DEQ(solver={"max_iter": 40}, grad={"name": "onestep"})(f, torch.zeros_like(x))
    got = grads_of(z_out.sum(), [w, x])
    want = grads_of(f(info.z.detach()).sum(), [w, x])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ift_returns_exactly_the_solvers_iterate():
    p = LinearProblem()
    z, info = DEQ(solver={"max_iter": 5, "tol": 1e-3})(p.f, torch.zeros_like(p.x))
    assert torch.equal(z.detach(), info.z)  # the residuals in info are measured at this z
    assert z.requires_grad


def test_ift_same_deq_twice_in_one_graph():
    """Two calls share f's weights; gradients add up, each backward solve is separate."""
    w = contraction(6, 0.8).requires_grad_()
    x1 = torch.randn(2, 6, dtype=torch.float64)
    x2 = torch.randn(2, 6, dtype=torch.float64)  # a different starting point
    deq = tight_deq()
    z1, i1 = deq(lambda z: torch.tanh(z @ w.T + x1), torch.zeros_like(x1))
    z2, i2 = deq(lambda z: torch.tanh(z @ w.T + x1 + z1), x2)
    got = grads_of((z2**2).sum(), [w])[0]
    u1 = unrolled(lambda z: torch.tanh(z @ w.T + x1), torch.zeros_like(x1), 400)
    u2 = unrolled(lambda z: torch.tanh(z @ w.T + x1 + u1), torch.zeros_like(x1), 400)
    want = grads_of((u2**2).sum(), [w])[0]
    assert (got - want).norm() / want.norm() < 1e-6
    assert len(i1.backward) == 1 and len(i2.backward) == 1


@pytest.mark.parametrize("grad", GRADS)
def test_forward_solve_records_no_graph(grad):
    """Only the gradient mode's own f evaluations run with autograd on: the forward solver's
    iterates are never kept for backward."""
    w = contraction(6, 0.8).requires_grad_()
    x = torch.randn(2, 6, dtype=torch.float64)
    taped = []

    def f(z):
        taped.append(torch.is_grad_enabled())
        return torch.tanh(z @ w.T + x)

    deq = DEQ(solver={"max_iter": 30, "tol": 1e-8}, grad={"name": grad, "steps": 3})
    _z, info = deq(f, torch.zeros_like(x))
    expected = 3 if grad == "phantom" else 1
    assert sum(taped) == expected and len(taped) == info.nfe + expected


def test_backward_statistics_are_recorded():
    p = LinearProblem()
    z, info = DEQ(solver={"max_iter": 50}, grad={"name": "ift", "max_iter": 7, "tol": 1e-30})(
        p.f, torch.zeros_like(p.x)
    )
    assert info.backward == []
    z.sum().backward()
    (bwd,) = info.backward
    assert bwd.nfe == 7 and bwd.rel_residual.shape == (3,)
    assert not bwd.converged.any()


def test_no_grad_only_solves():
    p = LinearProblem()
    with torch.no_grad():
        z, info = DEQ()(p.f, torch.zeros_like(p.x))
    assert not z.requires_grad and info.states == [z]


def test_ift_reference_form_returns_one_more_step_with_the_implicit_gradient():
    """output=fz, solve_from=zeros (the DEQ reference code's hook): an unconverged solve
    returns f(z_k) for the solver's iterate z_k, and its gradient is the IFT vector
    y = (I - W^T)^-1 dL/dout sent through f at z_k (closed form on a linear problem)."""
    p = LinearProblem(batch=3, d=8, norm=0.9)
    deq = DEQ(
        solver={"name": "anderson", "max_iter": 4, "tol": None},
        grad={"solver": "broyden", **TIGHT, "output": "fz", "solve_from": "zeros"},
    )
    out, info = deq(p.f, torch.zeros_like(p.x))
    z_k = info.z
    assert info.rel_residual.min() > 1e-3  # far from converged: the forms differ
    torch.testing.assert_close(out.detach(), p.f(z_k).detach(), rtol=0, atol=0)
    c = torch.randn_like(out)
    (out * c).sum().backward()
    W, U, x = p.W.detach(), p.U.detach(), p.x.detach()
    y = c @ torch.linalg.inv(torch.eye(8, dtype=torch.float64) - W)
    for got, want in ((p.x.grad, y @ U), (p.U.grad, y.T @ x), (p.W.grad, y.T @ z_k.detach())):
        assert (got - want).norm() / want.norm() < 1e-9
    assert info.backward[0].best_step.min() > 0  # started from 0, not from dL/dout


def test_ift_jacobian_at_fz_is_the_tutorials_layer():
    """output=fz, jacobian_at=fz, solve_from=grad with the tutorial's Anderson on both sides
    (absolute lam, batch-wide rule, last iterate): the same output and the same gradients as
    the implicit-layers tutorial's DEQFixedPoint (benchmarks/baseline.py) at a budget far
    from convergence."""
    torch.manual_seed(0)
    cell = ConvCell().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    budget = 6
    anderson = {"m": 5, "lam": 1e-4, "lam_mode": "absolute", "return_final": True}
    deq = DEQ(
        solver={"name": "anderson", "max_iter": budget, "tol": None, "stop_mode": "batch_rel"}
        | {k: v for k, v in anderson.items()},
        grad={
            "solver": "anderson",
            "max_iter": budget,
            "tol": 1e-300,
            "stop_mode": "batch_rel",
            "solver_options": anderson,
            "output": "fz",
            "jacobian_at": "fz",
            "solve_from": "grad",
        },
    )
    params = [x, *cell.parameters()]
    c = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    ours, info = deq(lambda z: cell(z, x), torch.zeros_like(x))
    assert info.rel_residual.max() > 1e-4
    g_ours = torch.autograd.grad((ours * c).sum(), params)

    tutorial = TutorialDEQFixedPoint(cell, m=5, lam=1e-4, max_iter=budget, tol=0.0)
    theirs = tutorial(x)
    g_theirs = torch.autograd.grad((theirs * c).sum(), params)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_grad_options_are_checked():
    with pytest.raises(ValueError, match="takes no option"):
        DEQ(grad={"solver": "broyden", "solver_options": {"m": 3}})
    with pytest.raises(ValueError, match=r"grad\.output"):
        DEQ(grad={"output": "f"})
    with pytest.raises(ValueError, match=r"set grad\.output=fz"):
        DEQ(grad={"jacobian_at": "fz"})


def test_implicit_with_jacobian_at_fz_needs_f():
    from deqlab.grad import GradConfig, implicit

    p = LinearProblem()
    z = p.x.detach().clone().requires_grad_()
    fz = p.f(z)
    cfg = GradConfig(output="fz", jacobian_at="fz")
    with pytest.raises(ValueError) as e:
        implicit(z.detach(), z, fz, cfg, lambda res: None)
    assert str(e.value) == "implicit: jacobian_at=fz needs f"
    implicit(z.detach(), z, fz, GradConfig(), lambda res: None)  # jacobian_at=z needs none


def test_ift_tuple_state_whose_loss_reads_one_part_matches_the_closed_form():
    """f(a, b) = ([a, b] M^T + [x, 0]) split in two; L = <c, a*> reads a* only, so dL/db* is
    zero and dL/dx = ([c, 0] (I - M)^-1)[:, :d]."""
    d = 4
    M = contraction(2 * d, 0.8)
    x = torch.randn(3, d, dtype=torch.float64, requires_grad=True)

    def f(z):
        out = torch.cat(z, 1) @ M.T + torch.cat([x, torch.zeros_like(x)], 1)
        return out[:, :d], out[:, d:]

    (a, _b), _ = tight_deq()(f, (torch.zeros_like(x), torch.zeros_like(x)))
    c = torch.randn(3, d, dtype=torch.float64)
    (a * c).sum().backward()
    g = torch.cat([c, torch.zeros_like(c)], 1) @ torch.linalg.inv(torch.eye(2 * d).double() - M)
    torch.testing.assert_close(x.grad, g[:, :d], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("solve_from, terms", [("zeros", 2), ("grad", 3)])
def test_ift_backward_start_counts_in_the_partial_neumann_sum(solve_from, terms):
    """Three fixed-point evaluations of g = g W + c from g = 0 reach c + cW (the iterate that
    the third evaluation's residual ranks), from g = c one more term: c + cW + cW^2."""
    p = LinearProblem(batch=3, d=8, norm=0.9)
    deq = DEQ(
        solver={"name": "anderson", **TIGHT},
        grad={"solver": "fixed_point", "max_iter": 3, "tol": None, "solve_from": solve_from},
    )
    z, _ = deq(p.f, torch.zeros_like(p.x))
    c = torch.randn(3, 8, dtype=torch.float64)
    (z * c).sum().backward()
    W = p.W.detach()
    g = sum(c @ torch.linalg.matrix_power(W, i) for i in range(terms))
    torch.testing.assert_close(p.x.grad, g @ p.U.detach(), rtol=1e-10, atol=1e-12)


def test_ift_backward_solve_uses_its_own_stop_mode():
    """dL/dz* of size ~1e4: rel and abs residuals differ by that factor, and the backward solve
    stops where a direct solve with grad.stop_mode stops."""
    from deqlab.solvers import get_solver

    p = LinearProblem(batch=3, d=8, norm=0.9)
    c = 1e4 * torch.randn(3, 8, dtype=torch.float64)
    W = p.W.detach()
    nfe = {}
    for mode in ("rel", "abs"):
        deq = DEQ(
            solver={"name": "anderson", **TIGHT},
            grad={"solver": "fixed_point", "max_iter": 500, "tol": 1e-6, "stop_mode": mode},
        )
        z, info = deq(p.f, torch.zeros_like(p.x))
        (z * c).sum().backward()
        direct = get_solver("fixed_point")(
            lambda g: g @ W + c, c.clone(), max_iter=500, tol=1e-6, stop_mode=mode
        )  # from dL/dz* (grad.solve_from=grad)
        nfe[mode] = info.backward[0].nfe
        assert nfe[mode] == direct.nfe
    assert nfe["abs"] > nfe["rel"]


def test_nonfinite_backward_solve_warns_and_names_the_cures():
    """W = 1e150 I: the backward iteration g <- g W + 1 overflows at its third step."""
    from deqlab.grad import DivergenceWarning, GradConfig, implicit

    W = 1e150 * torch.eye(4, dtype=torch.float64)
    z = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    fz = z @ W.T + 1.0
    seen = []
    out = implicit(
        z.detach(), z, fz, GradConfig(solver="fixed_point", max_iter=10, tol=1e-8), seen.append
    )
    with pytest.warns(DivergenceWarning) as record:
        out.sum().backward()
    assert [str(w.message) for w in record] == [
        "DEQ backward (ift) solve met non-finite iterates; using the best finite one. The "
        "equilibrium may be unstable: consider Jacobian regularization or a smaller learning "
        "rate."
    ]
    assert seen[0].nonfinite and torch.isfinite(z.grad).all()


def test_register_grad_refuses_what_is_not_a_grad_mode():
    from deqlab.grad import GRAD_MODES

    with pytest.raises(TypeError) as e:
        GRAD_MODES.register("plain_function", lambda *a: None)
    assert str(e.value) == (
        "gradient mode 'plain_function' must be a deqlab.grad.GradMode, got function "
        "(wrap a function as GradMode(fn))"
    )


def test_a_full_step_is_f_itself_and_a_damped_step_promotes():
    """mix(z, fz, 1) returns fz untouched (its dtype and graph: a bf16 cell's step stays
    bf16); any other tau mixes in the wider of the two dtypes."""
    from deqlab.state import mix

    z = torch.randn(2, 3)
    fz = torch.randn(2, 3).bfloat16()
    assert mix(z, fz, 1.0) is fz
    half = mix(z, fz, 0.5)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, 0.5 * (z + fz.float()))


def saved_bytes(fn):
    """fn()'s result and the bytes its autograd graph saved for backward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.parametrize("name", ["phantom", "onestep"])
def test_mem_gc_gives_the_same_gradient_from_the_inputs_alone(name):
    """Checkpointed f evaluations: the gradient is the same, and the graph saves each step's
    input instead of the cell's activations (5 phantom steps of a conv cell: under a third)."""
    from .helpers.problems import ConvCell

    torch.manual_seed(0)
    cell = ConvCell(chan=4, inner=16).double()
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    grads, saved = [], []
    for gc in (False, True):
        deq = DEQ(
            solver={"max_iter": 8, "tol": None}, grad={"name": name, "steps": 5, "mem_gc": gc}
        )
        (z, _), nbytes = saved_bytes(lambda deq=deq: deq(lambda s: cell(s, x), torch.zeros_like(x)))
        grads.append(torch.autograd.grad((z**2).sum(), list(cell.parameters())))
        saved.append(nbytes)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert saved[1] < saved[0] / 3, saved


# -- on a GPU (skipped without CUDA) ---------------------------------------------------------


@pytest.mark.requires_cuda
def test_ift_gradients_on_cuda_match_cpu():
    cell = ConvCell().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    deq = DEQ(
        solver={"name": "broyden", "max_iter": 300, "tol": 1e-12},
        grad={"max_iter": 300, "tol": 1e-12},
    )
    grads = []
    for device in ("cpu", "cuda"):
        c = ConvCell().double().to(device)
        c.load_state_dict(cell.state_dict())
        xx = x.detach().to(device).requires_grad_()
        z, _ = deq(lambda z, c=c, xx=xx: c(z, xx), torch.zeros_like(xx))
        (z**2).sum().backward()
        grads.append([xx.grad.cpu(), *[p.grad.cpu() for p in c.parameters()]])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
