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
    with pytest.raises(
        ValueError, match=r"takes no m \(its options: check_every, keep_inverse, ls, memory"
    ):
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


def _result(offset: float, converged: list[bool], nonfinite: bool, steps: int = 3):
    from deqlab.solvers.base import SolverResult

    b = len(converged)
    return SolverResult(
        z=(
            torch.arange(b * 2, dtype=torch.float64).reshape(b, 2) + offset,
            torch.full((b, 1), offset),
        ),
        abs_residual=torch.arange(b, dtype=torch.float64) + offset,
        rel_residual=torch.arange(b, dtype=torch.float64) + 2 * offset,
        nfe=steps + int(offset),
        best_step=torch.arange(b) % steps,
        converged=torch.tensor(converged),
        trace=torch.full((steps, b), offset, dtype=torch.float64),
        nonfinite=nonfinite,
        saved=[torch.full((b, 1), offset)],
    )


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize(("first_bad", "again_bad"), [(False, False), (True, False), (False, True)])
def test_merge_takes_every_field_of_the_rescued_rows_from_the_fallback(
    per_batch, first_bad, again_bad
):
    """Row by row (the whole batch in the batch modes), each per-sample field comes from the
    fallback's solve for the rows handed to it; the trace and the count add up; a non-finite
    iterate in either solve is reported; the saved iterates stay the first solve's."""
    from deqlab.solvers.fallback import _merge

    first = _result(10.0, [True, False, True, False], first_bad, steps=3)
    again = _result(100.0, [True, True, True, False], again_bad, steps=2)
    todo = ~first.converged
    res = _merge(first, again, todo, per_batch=per_batch)
    rows = torch.ones_like(todo) if per_batch else todo
    for name in ("abs_residual", "rel_residual", "converged"):
        want = torch.where(rows, getattr(again, name), getattr(first, name))
        assert torch.equal(getattr(res, name), want), name
    assert torch.equal(res.best_step, torch.where(rows, again.best_step + 3, first.best_step))
    for got, a, b in zip(res.z, first.z, again.z):
        assert torch.equal(got, torch.where(rows.unsqueeze(1), b, a))
    assert res.nfe == first.nfe + again.nfe and res.trace.shape == (5, 4)
    assert torch.equal(res.trace, torch.cat([first.trace, again.trace]))
    assert res.nonfinite is (first_bad or again_bad)
    assert res.saved is first.saved


def test_each_fallback_is_called_with_the_budget_the_stop_rule_and_its_options(
    restore_registries,
):
    from deqlab import register_solver

    calls = []

    def spy(f, z0, *, max_iter, tol, stop_mode="rel", save_at=(), depth: int = 1):
        calls.append((max_iter, tol, stop_mode, depth))
        return get_solver("broyden")(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)

    register_solver("spy", spy)
    f, x = setup()
    cfg = {**SOLVER, "stop_mode": "abs", "fallback": ["spy", "spy"]}
    deq = DEQ({**cfg, "fallback_options": {"spy": {"depth": 4}}, "eval_max_iter": 70}).eval()
    with torch.no_grad():
        _, info = deq(f, torch.zeros_like(x))
    # the second spy finds every sample converged: it is not called, and counts none
    assert calls == [(70, 1e-8, "abs", 4)] and info.fallbacks[1] == 0 < info.fallbacks[0]
