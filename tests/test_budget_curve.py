"""Accuracy against budget from one pass: what a solve keeps at each budget is exactly what a
separate solve with that budget returns (issue: see inside the equilibrium)."""

from __future__ import annotations

import pytest
import torch

from deqlab.solvers import get_solver, register_solver

from .helpers.problems import SOLVERS, StaggeredCell


def _same(a, b) -> None:
    assert torch.equal(a.z, b.z)
    assert torch.equal(a.rel_residual, b.rel_residual)
    assert torch.equal(a.abs_residual, b.abs_residual)
    assert torch.equal(a.best_step, b.best_step)
    assert torch.equal(a.converged, b.converged)
    torch.testing.assert_close(a.trace, b.trace, rtol=0, atol=0, equal_nan=True)
    assert a.nfe == b.nfe
    assert a.nonfinite == b.nonfinite


@pytest.mark.parametrize("name", [*SOLVERS, "broyden_ls"])
@pytest.mark.parametrize("stop_mode", ["rel", "abs", "batch_rel"])
@pytest.mark.parametrize("check_every", [1, 3])
@pytest.mark.parametrize("return_final", [False, True])
@pytest.mark.parametrize("tol", [1e-6, None])
def test_each_budget_is_a_separate_solve(name, stop_mode, check_every, return_final, tol):
    torch.manual_seed(0)
    cell = StaggeredCell()
    x = torch.randn(6, 32, dtype=torch.float64)
    options = {"ls": True} if name == "broyden_ls" else {}
    if name == "broyden_ls":
        if check_every > 1:
            pytest.skip("ls tests every step")
        name = "broyden"
    solve = get_solver(name)
    common = dict(
        tol=tol,
        stop_mode=stop_mode,
        return_final=return_final,
        check_every=check_every,
        **options,
    )
    budgets = [1, 2, 3, 5, 8, 13, 40, 60]
    whole = solve(lambda z: cell(z, x), torch.zeros_like(x), max_iter=40, budgets=budgets, **common)
    assert sorted(whole.at_budget) == budgets
    if tol is not None:  # the solve stopped early: the last budgets are the final result
        assert whole.nfe < 40
    for k in budgets:
        alone = solve(lambda z: cell(z, x), torch.zeros_like(x), max_iter=min(k, 40), **common)
        _same(whole.at_budget[k], alone)


@pytest.mark.parametrize("core", ["indexing", "sliced"])
def test_core_budgets_equal_eval_max_iter(core):
    from deqlab import build_core

    torch.manual_seed(0)
    cell = StaggeredCell()
    x = torch.randn(6, 32, dtype=torch.float64)
    f = lambda z: cell(z, x)
    solver = {"name": "anderson", "max_iter": 10, "eval_max_iter": 25, "tol": 1e-8}
    deq = build_core({"name": core}, solver, {"name": "ift"}).eval()
    with torch.no_grad():
        z, info = deq(f, torch.zeros_like(x), budgets=[2, 6, 12, 25])
        for k in (2, 6, 12, 25):
            other = build_core({"name": core}, {**solver, "eval_max_iter": k}, {"name": "ift"})
            z_k, info_k = other.eval()(f, torch.zeros_like(x))
            assert torch.equal(info.at_budget[k].z, z_k)
            assert info.at_budget[k].nfe == info_k.nfe
        assert torch.equal(info.at_budget[25].z, z)


def test_budgets_are_checked():
    from deqlab import DEQ

    deq = DEQ({"max_iter": 5}).eval()
    x = torch.randn(2, 3)
    with torch.no_grad(), pytest.raises(ValueError, match="from 1 to this solve's budget 5"):
        deq(lambda z: 0.5 * z + x, torch.zeros_like(x), budgets=[2, 6])
    with pytest.raises(ValueError, match="without a gradient"):
        deq.train()(lambda z: 0.5 * z + x, torch.zeros_like(x), budgets=[2])

    def plain(f, z0, *, max_iter, tol, stop_mode="rel", save_at=()):
        return get_solver("fixed_point")(f, z0, max_iter=max_iter, tol=tol, stop_mode=stop_mode)

    register_solver("plain_for_budgets", plain)
    deq = DEQ({"name": "plain_for_budgets", "max_iter": 5}).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="takes no `budgets` option"):
        deq(lambda z: 0.5 * z + x, torch.zeros_like(x), budgets=[2])


@pytest.mark.parametrize("tol", [1e-6, None])
@pytest.mark.parametrize("check_every", [1, 4])
def test_budgets_of_a_solve_that_blows_up(tol, check_every):
    """z <- z^2 + 1 from 2 overflows at step 10: the budgets before know nothing of it, those
    after are the solve that stopped on it, as separate solves are."""
    z0 = torch.full((2, 3), 2.0, dtype=torch.float64)
    f = lambda z: z * z + 1
    solve = get_solver("fixed_point")
    common = dict(tol=tol, check_every=check_every)
    budgets = [3, 8, 10, 11, 12, 16]
    whole = solve(f, z0, max_iter=16, budgets=budgets, **common)
    assert whole.nonfinite
    for k in budgets:
        _same(whole.at_budget[k], solve(f, z0, max_iter=k, **common))
    assert not whole.at_budget[8].nonfinite


# --- in a run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from .helpers.runs import write_cifar_folder

    return write_cifar_folder(tmp_path_factory.mktemp("data"))


def test_one_test_pass_draws_the_curve_that_separate_runs_confirm(data_dir, tmp_path):
    """test/acc@k and test/nfe@k of a training run's test pass equal test/acc and
    deq/test_fwd_nfe of mode=test runs of its checkpoint with solver.eval_max_iter=k; with
    fit.budget_splits=[val,test] validation draws the curve too."""
    from deqlab.runner.main import run
    from deqlab.runner.report import budget_curve, find_runs, report

    from .helpers.runs import TINY, compose_cfg, last_value, metrics

    common = [f"paths.data_dir={data_dir}", *TINY, "solver.tol=1e-4", "test_ckpt=last"]
    run(
        compose_cfg(
            [*common, "solver.eval_max_iter=6", "task.module.fit.budget_splits=[val,test]"],
            tmp_path / "a",
        )
    )
    rows = metrics(tmp_path / "a")
    grid = [1, 2, 4, 6]  # powers of two below the eval budget, and the budget
    assert {f"val/acc@{k}" for k in grid} <= set(rows[0])
    assert last_value(rows, "test/acc@6") == last_value(rows, "test/acc")
    (one,) = find_runs(tmp_path / "a")
    assert budget_curve(one) == (
        "acc",
        [(last_value(rows, f"test/nfe@{k}"), last_value(rows, f"test/acc@{k}")) for k in grid],
    )
    report(tmp_path / "a")
    assert (tmp_path / "a" / "budget_curve.png").stat().st_size > 1000
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    for k in grid:
        out = tmp_path / f"k{k}"
        run(
            compose_cfg(
                [*common, "mode=test", f"ckpt_path={ckpt}", f"solver.eval_max_iter={k}"], out
            )
        )
        alone = metrics(out)
        assert last_value(rows, f"test/acc@{k}") == last_value(alone, "test/acc")
        assert last_value(rows, f"test/nfe@{k}") == pytest.approx(
            last_value(alone, "deq/test_fwd_nfe"), rel=1e-6
        )
