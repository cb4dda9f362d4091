"""solver.fallback: the samples Anderson leaves stalled are rescued by Broyden from where
Anderson left them; the others keep exactly Anderson's result."""

from __future__ import annotations

import pytest
import torch

from deqlab import DEQ, Bound
from deqlab.solvers import SolverConfig, get_solver

from .helpers.problems import RotatingCell

SOLVER = {"name": "anderson", "max_iter": 60, "tol": 1e-8, "m": 5}


def setup():
    torch.manual_seed(0)
    cell = RotatingCell()
    x = torch.randn(6, 16, dtype=torch.float64)
    return Bound(cell, x), x


def test_anderson_alone_stalls_and_broyden_rescues_its_samples():
    f, x = setup()
    with torch.no_grad():
        _, alone = DEQ(SOLVER).eval()(f, torch.zeros_like(x))
        z, info = DEQ({**SOLVER, "fallback": ["broyden"]}).eval()(f, torch.zeros_like(x))
    stalled = ~alone.converged
    assert 0 < int(stalled.sum()) < 6  # the premise: some samples stall, the others converge
    assert info.converged.all() and (info.rel_residual <= 1e-8).all()
    assert info.fallbacks == [int(stalled.sum())]
    # the converged samples keep Anderson's result exactly
    kept = ~stalled
    assert torch.equal(z[kept], alone.z[kept])
    assert torch.equal(info.rel_residual[kept], alone.rel_residual[kept])
    assert torch.equal(info.best_step[kept], alone.best_step[kept])
    # the rescued ones are Broyden's solve from Anderson's best iterate
    broyden = get_solver("broyden")(f, alone.z, max_iter=60, tol=1e-8, memory=30)
    assert torch.equal(z[stalled], broyden.z[stalled])
    assert info.nfe == alone.nfe + broyden.nfe
    assert torch.equal(info.best_step[stalled], broyden.best_step[stalled] + alone.trace.shape[0])
    assert info.trace.shape[0] == alone.trace.shape[0] + broyden.trace.shape[0]


def test_a_chain_stops_once_every_sample_converged():
    f, x = setup()
    cfg = {**SOLVER, "fallback": ["fixed_point", "broyden", "anderson"]}
    with torch.no_grad():
        _, info = DEQ(cfg).eval()(f, torch.zeros_like(x))
    # fixed-point iteration diverges on the stalled samples: they pass on to Broyden
    assert len(info.fallbacks) == 3 and info.fallbacks[0] == info.fallbacks[1] > 0
    assert info.fallbacks[2] == 0 and info.converged.all()


def test_the_gradient_is_taken_at_the_rescued_equilibrium():
    """ift at the fallback's z*: the gradient of a linear DEQ's closed form."""
    f, x = setup()
    x.requires_grad_()
    cell = f.fn
    z, _ = DEQ(
        {**SOLVER, "fallback": ["broyden"]},
        {"name": "ift", "tol": 1e-10, "max_iter": 200, "solver": "broyden"},
    )(f, torch.zeros_like(x))
    eye = torch.eye(16, dtype=torch.float64)
    exact = torch.stack(
        [torch.linalg.solve(eye - s * cell.q, xi) for s, xi in zip(cell.scale[:, 0], x)]
    )
    torch.testing.assert_close(z, exact, rtol=1e-6, atol=1e-8)
    c = torch.randn_like(x)
    (g,) = torch.autograd.grad((z * c).sum(), x)
    (want,) = torch.autograd.grad((exact * c).sum(), x)
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)


def test_fallback_settings_are_checked():
    with pytest.raises(ValueError, match=r"^unknown solver 'newton'; known: "):
        SolverConfig(fallback=["newton"])
    with pytest.raises(ValueError, match="needs a tol"):
        SolverConfig(tol=None, fallback=["broyden"])
    f, x = setup()
    deq = DEQ({**SOLVER, "fallback": ["broyden"]}).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"solver\.fallback=\[\] for a budget"):
        deq(f, torch.zeros_like(x), budgets=[2])
    with pytest.raises(ValueError, match="cannot change per call"):
        deq(f, torch.zeros_like(x), fallback=[])
    # a fallback takes its own options from fallback_options, and those of the main solver it
    # also takes (fixed_point's tau from anderson's); Anderson's m goes to neither
    cfg = SolverConfig(
        name="anderson",
        m=3,
        tau=0.5,
        fallback=["broyden", "fixed_point"],
        fallback_options={"broyden": {"memory": 12}},
    )
    broyden, fixed_point = cfg.fallback_configs()
    assert (broyden.name, broyden.memory, hasattr(broyden, "m")) == ("broyden", 12, False)
    assert (fixed_point.name, fixed_point.tau) == ("fixed_point", 0.5)
    with pytest.raises(ValueError, match=r"takes no m \(its options: check_every, ls, memory"):
        SolverConfig(fallback=["broyden"], fallback_options={"broyden": {"m": 3}})
    with pytest.raises(ValueError, match=r"fallback_options names \['fixed_point'\], which"):
        SolverConfig(fallback=["broyden"], fallback_options={"fixed_point": {"tau": 0.5}})


def test_a_config_saved_with_the_flat_schema_keeps_its_meaning():
    """Run folders and checkpoints written when one schema held every built-in solver's
    options load as they ran: another solver's options at their defaults are dropped, and one
    set for a fallback (the old way to reach it) moves to fallback_options."""
    from deqlab.core import to_config

    flat = {"name": "anderson", "m": 3, "memory": 12, "ls": False, "beta": 0.5}
    cfg = to_config(SolverConfig, {**flat, "fallback": ["broyden"]}, "solver")
    assert (cfg.m, cfg.fallback_options) == (3, {"broyden": {"memory": 12}})
    assert not hasattr(cfg, "beta") and not hasattr(cfg, "memory")
    with pytest.raises(ValueError, match=r"solver\.memory=12: solver 'anderson' takes no memory"):
        to_config(SolverConfig, flat, "solver")
