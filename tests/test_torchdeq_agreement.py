"""Agreement with TorchDEQ (the dev extra's reference): same f, same settings, same answers."""

from __future__ import annotations

import pytest
import torch

from deqlab import DEQ, get_solver

from .helpers.problems import ConvCell, contraction

torchdeq = pytest.importorskip("torchdeq")
from torchdeq.solver import get_solver as td_get_solver  # noqa: E402

PAIRS = [("fixed_point", "fixed_point_iter"), ("anderson", "anderson"), ("broyden", "broyden")]


@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_same_fixed_point(ours, theirs):
    w = contraction(32, 0.9)
    x = torch.randn(4, 32, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    mine = get_solver(ours)(f, torch.zeros_like(x), max_iter=200, tol=1e-10)
    ref, _, _ = td_get_solver(theirs)(
        f, torch.zeros_like(x), max_iter=200, tol=1e-10, stop_mode="rel"
    )
    torch.testing.assert_close(mine.z, ref, rtol=1e-8, atol=1e-8)


def test_same_fixed_point_conv_cell_float32():
    cell = ConvCell(chan=8, inner=12, groups=4)
    x = torch.randn(2, 8, 6, 6)
    f = lambda z: cell(z, x)
    with torch.no_grad():
        mine = get_solver("anderson")(f, torch.zeros_like(x), max_iter=100, tol=1e-5)
        ref, _, _ = td_get_solver("anderson")(
            f, torch.zeros_like(x), max_iter=100, tol=1e-5, stop_mode="rel"
        )
    assert mine.converged.all()
    # Both stop at residual 1e-5; this cell's contraction factor is ~0.97, so each iterate
    # lies within ~1e-5 / (1 - 0.97) of z*.
    assert (mine.z - ref).norm() / ref.norm() < 1e-3


def test_same_ift_gradient():
    w = contraction(12, 0.8).requires_grad_()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    f = lambda z: torch.tanh(z @ w.T + x)
    z, _ = DEQ(solver={"max_iter": 200, "tol": 1e-12}, grad={"max_iter": 200, "tol": 1e-12})(
        f, torch.zeros_like(x)
    )
    ours = torch.autograd.grad((z**2).sum(), [w, x])
    ref_deq = torchdeq.get_deq(
        f_solver="anderson",
        f_max_iter=200,
        f_tol=1e-12,
        b_solver="anderson",
        b_max_iter=200,
        b_tol=1e-12,
        ift=True,
    )
    zs, _ = ref_deq(f, torch.zeros_like(x))
    theirs = torch.autograd.grad((zs[-1] ** 2).sum(), [w, x])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("grad", ["ift", "phantom", "onestep"])
@pytest.mark.parametrize("graph", ["indexing", "sliced"])
def test_torchdeq_core_agrees_with_ours(grad, graph):
    from deqlab import build_core

    w = contraction(12, 0.8).requires_grad_()
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    f = lambda z: torch.tanh(z @ w.T + x)
    solver = {"name": "anderson", "max_iter": 100, "tol": 1e-12}
    grad_cfg = {"name": grad, "max_iter": 200, "tol": 1e-12, "steps": 3, "tau": 0.5}
    results = []
    for core in ({"name": graph}, {"name": "torchdeq", "options": {"graph": graph}}):
        z, info = build_core(core, solver, grad_cfg)(f, torch.zeros_like(x))
        results.append((z, torch.autograd.grad((z**2).sum(), [w, x]), info))
        assert info.rel_residual.max() < 1e-11 and info.nfe > 0
        assert len(info.backward) == (grad == "ift")
    (za, ga, _), (zb, gb, _) = results
    torch.testing.assert_close(za, zb, rtol=1e-9, atol=1e-11)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_torchdeq_core_refuses_what_it_cannot_do():
    from deqlab import build_core

    with pytest.raises(ValueError, match="batch_rel has no TorchDEQ counterpart"):
        build_core({"name": "torchdeq"}, {"stop_mode": "batch_rel"}, None)
    with pytest.raises(ValueError, match=r"set solver\.tol"):
        build_core({"name": "torchdeq"}, {"tol": None}, None)
    with pytest.raises(ValueError, match=r"solver\.capture and solver\.check_every need core"):
        build_core({"name": "torchdeq"}, {"capture": True}, None)
    with pytest.raises(ValueError, match=r"solver\.capture and solver\.check_every need core"):
        build_core({"name": "torchdeq"}, {"check_every": 5}, None)


def test_torchdeq_core_takes_the_solvers_own_options_per_call():
    """Per call TorchDEQ takes m, lam, tau, ls, return_final (its tol and stop mode are fixed at
    construction): the same iterates as a TorchDEQ core built with those options."""
    from deqlab import build_core

    w = contraction(12, 0.9)
    x = torch.randn(3, 12, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    solver = {"name": "anderson", "max_iter": 12, "tol": 1e-12, "lam_mode": "absolute"}
    layer = build_core({"name": "torchdeq"}, solver, None).eval()
    built = build_core({"name": "torchdeq"}, {**solver, "m": 2, "tau": 0.6}, None).eval()
    with torch.no_grad():
        za, _ = layer(f, torch.zeros_like(x), m=2, tau=0.6)
        zb, _ = built(f, torch.zeros_like(x))
        zc, _ = layer(f, torch.zeros_like(x))
    assert torch.equal(za, zb)
    assert not torch.allclose(za, zc, rtol=1e-6)  # the options took effect
    with pytest.raises(ValueError) as e:
        layer(f, torch.zeros_like(x), tol=1e-3)
    assert str(e.value) == (
        "core=torchdeq: TorchDEQ takes no per-call ['tol']; per call it takes "
        "['m', 'lam', 'tau', 'ls', 'return_final'] (or use core=indexing)"
    )
