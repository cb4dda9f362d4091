"""The DEQ module: configuration, budgets, sampled states, statistics and warnings."""

from __future__ import annotations

import pytest
import torch

from deqlab import DEQ, DivergenceWarning, GradConfig, SolverConfig

from .helpers.problems import LinearProblem, contraction


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown solver key 'max_itr'.*max_iter"):
        DEQ(solver={"max_itr": 5})
    with pytest.raises(ValueError, match=r"unknown grad key 'step'.*steps"):
        DEQ(grad={"name": "phantom", "step": 5})


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="unknown solver 'newton'"):
        DEQ(solver={"name": "newton"})
    with pytest.raises(ValueError, match="unknown gradient mode 'exact'"):
        DEQ(grad={"name": "exact"})
    with pytest.raises(ValueError, match="stop_mode"):
        DEQ(solver={"stop_mode": "max"})
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['beta'\]"):
        DEQ(solver={"name": "broyden", "options": {"beta": 1.0}})


def test_only_the_solvers_own_options_are_passed():
    common = {"return_final": False, "check_every": 1}
    assert SolverConfig(name="anderson", m=3).solver_kwargs() == {
        "m": 3,
        "lam": 1e-4,
        "lam_mode": "relative",
        "tau": 1.0,
        **common,
    }
    assert SolverConfig(name="broyden", memory=7).solver_kwargs() == {
        "memory": 7,
        "ls": False,
        "keep_inverse": False,
        **common,
    }
    assert SolverConfig(name="fixed_point", tau=0.5).solver_kwargs() == {"tau": 0.5, **common}


def test_dataclass_and_mapping_configs_agree():
    p = LinearProblem()
    a, _ = DEQ(SolverConfig(name="broyden", max_iter=9), GradConfig(name="onestep"))(
        p.f, torch.zeros_like(p.x)
    )
    b, _ = DEQ({"name": "broyden", "max_iter": 9}, {"name": "onestep"})(p.f, torch.zeros_like(p.x))
    torch.testing.assert_close(a, b)


def test_eval_budget_and_call_override():
    p = LinearProblem(norm=0.99)
    deq = DEQ(solver={"max_iter": 4, "eval_max_iter": 9, "tol": 1e-30})
    _, info = deq(p.f, torch.zeros_like(p.x))
    assert info.nfe == 4
    deq.eval()
    with torch.no_grad():
        _, info = deq(p.f, torch.zeros_like(p.x))
    assert info.nfe == 9
    _, info = deq(p.f, torch.zeros_like(p.x), max_iter=2)
    assert info.nfe == 2


@pytest.mark.parametrize("core", ["indexing", "sliced"])
def test_per_call_solver_options_solve_as_a_layer_built_with_them(core):
    """deq(f, z0, tol=..., m=..., tau=...) gives what a layer configured so gives, in training
    (forward and gradient) and in evaluation; the layer's own settings stay as they were."""
    from deqlab.core import SlicedDEQ

    make = DEQ if core == "indexing" else SlicedDEQ
    p = LinearProblem(norm=0.95)
    base = {"name": "anderson", "max_iter": 40, "tol": 1e-2, "m": 5, "tau": 1.0}
    per_call = {"tol": 1e-9, "m": 2, "tau": 0.7, "stop_mode": "abs"}
    layer = make(solver=base, grad={"name": "ift", "tol": 1e-10, "max_iter": 60})
    built = make(solver={**base, **per_call}, grad={"name": "ift", "tol": 1e-10, "max_iter": 60})
    for train in (True, False):
        layer.train(train), built.train(train)
        a, info_a = layer(p.f, torch.zeros_like(p.x), **per_call)
        b, info_b = built(p.f, torch.zeros_like(p.x))
        assert torch.equal(a, b) and info_a.nfe == info_b.nfe
        assert torch.equal(info_a.abs_residual, info_b.abs_residual)
        assert (info_a.abs_residual < 1e-8).all()  # tol 1e-9 at the solve, 1e-2 without
    (ga,) = torch.autograd.grad(layer(p.f, torch.zeros_like(p.x), **per_call)[0].sum(), p.W)
    (gb,) = torch.autograd.grad(built(p.f, torch.zeros_like(p.x))[0].sum(), p.W)
    assert torch.equal(ga, gb)
    assert layer.solver_cfg == SolverConfig(**base)
    _, info = layer(p.f, torch.zeros_like(p.x))  # without options: the layer's tol again
    assert info.rel_residual.max() > 1e-9 and info.nfe < info_a.nfe


def test_per_call_options_are_checked_as_a_config_is():
    p = LinearProblem()
    deq = DEQ(solver={"name": "anderson"})
    z0 = torch.zeros_like(p.x)
    with pytest.raises(ValueError) as e:
        deq(p.f, z0, tol=0)
    assert str(e.value) == "solver.tol must be > 0 (or null: exactly max_iter steps), got 0"
    with pytest.raises(ValueError) as e:
        deq(p.f, z0, gamma=2)
    assert str(e.value).startswith("solver 'anderson' takes no option(s) ['gamma']; its options")
    with pytest.raises(ValueError) as e:
        deq(p.f, z0, beta=0.3)
    assert str(e.value).startswith("solver 'anderson' takes no option(s) ['beta']; its options")
    with pytest.raises(ValueError) as e:
        deq(p.f, z0, name="broyden")
    assert str(e.value) == (
        "['name'] cannot change per call: they are the layer's (build another DEQ, or set them "
        "in its solver config)"
    )
    deq.eval()
    with torch.no_grad():  # the eval budget too
        assert deq(p.f, z0, tol=None, eval_max_iter=6)[1].nfe == 6


def test_eval_budget_is_max_iter_times_eval_factor():
    """TorchDEQ's eval_factor: in eval mode the budget is int(max_iter * eval_factor) f
    evaluations; eval_max_iter, when set, wins."""
    p = LinearProblem(norm=0.99)
    deq = DEQ(solver={"max_iter": 4, "eval_factor": 2.5, "tol": None}).eval()
    with torch.no_grad():
        assert deq(p.f, torch.zeros_like(p.x))[1].nfe == 10
    deq.train()
    assert deq(p.f, torch.zeros_like(p.x))[1].nfe == 4
    both = DEQ(solver={"max_iter": 4, "eval_factor": 2.5, "eval_max_iter": 7, "tol": None}).eval()
    with torch.no_grad():
        assert both(p.f, torch.zeros_like(p.x))[1].nfe == 7
    tiny = DEQ(solver={"max_iter": 3, "eval_factor": 0.1, "tol": None}).eval()
    with torch.no_grad():  # int(0.3) = 0 evaluations would be no solve: at least one
        assert tiny(p.f, torch.zeros_like(p.x))[1].nfe == 1


def test_sampled_states_carry_gradients():
    w = contraction(6, 0.9).requires_grad_()
    x = torch.randn(2, 6, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    deq = DEQ(
        solver={"name": "fixed_point", "max_iter": 12, "tol": None},
        grad={"name": "onestep"},
        n_states=3,
    )
    z, info = deq(f, torch.zeros_like(x))
    assert len(info.states) == 3 and info.states[-1] is z
    # States are sampled at steps 4, 8 and 12 (TorchDEQ's rule); state 0 is the one-step
    # gradient at z_4, the iterate after 4 steps of plain iteration.
    z4 = torch.zeros_like(x)
    for _ in range(4):
        z4 = f(z4).detach()
    torch.testing.assert_close(info.states[0], f(z4))
    for s in info.states:
        assert s.requires_grad
    g = torch.autograd.grad(info.states[0].sum(), w)[0]
    torch.testing.assert_close(g, torch.autograd.grad(f(z4).sum(), w)[0])


def test_jacobian_loss_on_request():
    p = LinearProblem(d=6)
    _z, info = DEQ()(p.f, torch.zeros_like(p.x), jac_vecs=2000)
    exact = (p.W.detach() ** 2).sum() / 6  # J = W: ||J||_F^2 / dim
    assert info.jac_loss.requires_grad
    assert abs(info.jac_loss.item() - exact.item()) / exact.item() < 0.1
    (gw,) = torch.autograd.grad(info.jac_loss, p.W)
    torch.testing.assert_close(gw, 2 * p.W.detach() / 6, rtol=0.15, atol=0.02)
    _, info = DEQ()(p.f, torch.zeros_like(p.x))
    assert info.jac_loss is None


def test_divergence_is_reported_not_hidden():
    x = torch.randn(2, 4)
    calls = 0

    def f(z):
        nonlocal calls
        calls += 1
        return z * 3 + x if calls < 6 else z * float("nan")

    with pytest.warns(DivergenceWarning) as record:
        _z, info = DEQ(solver={"name": "fixed_point", "max_iter": 20})(f, torch.zeros_like(x))
    assert info.nonfinite and not info.converged.any()
    assert torch.isfinite(info.z).all()
    assert [str(w.message) for w in record] == [  # names the solver and the cures
        "DEQ forward solve (fixed_point) met non-finite iterates; returning each sample's best "
        "finite iterate (see info.rel_residual). Consider weight/spectral normalization, "
        "Jacobian regularization or a smaller learning rate."
    ]


def test_half_precision_layer():
    w = contraction(16, 0.5, torch.float32)
    lin = torch.nn.Linear(16, 16).to(torch.bfloat16)
    lin.weight.data = w.to(torch.bfloat16)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    z, info = DEQ(solver={"max_iter": 20, "tol": 1e-2})(
        lambda z: torch.tanh(lin(z) + x), torch.zeros_like(x)
    )
    z.float().sum().backward()
    assert z.dtype == torch.bfloat16 and info.converged.all()
    assert torch.isfinite(lin.weight.grad).all()


def test_initial_states():
    from deqlab import mixed_init, zeros_init

    z = mixed_init((64, 100), dtype=torch.float64)
    zero_share = (z == 0).double().mean().item()
    assert 0.4 < zero_share < 0.6 and z[z != 0].std() > 0.8
    assert torch.equal(zeros_init((2, 3)), torch.zeros(2, 3))
    p = LinearProblem(batch=64, d=8)  # any start reaches the same fixed point
    with torch.no_grad():
        a, _ = DEQ(solver={"max_iter": 200, "tol": 1e-12})(
            p.f, mixed_init(p.x.shape, dtype=torch.float64)
        )
        torch.testing.assert_close(a, p.z_star(), rtol=1e-8, atol=1e-8)


def test_init_group_shapes_the_start_like_the_template():
    from deqlab import InitConfig

    template = (torch.zeros(4, 3, 8, 8), torch.zeros(4, 6, 4, 4, dtype=torch.float64))
    z0 = InitConfig("mixed").like(template)
    assert [p.shape for p in z0] == [p.shape for p in template]
    assert z0[1].dtype == torch.float64 and 0.3 < (z0[0] == 0).float().mean() < 0.7
    assert all(torch.equal(p, torch.zeros_like(p)) for p in InitConfig("zeros").like(template))
    for kind in ("zeros", "mixed"):
        assert [p.dtype for p in InitConfig(kind).like(template)] == [torch.float32, torch.float64]
    with pytest.raises(ValueError, match=r"init\.name must be one of"):
        InitConfig("ones")


def test_forward_solve_uses_the_configured_stop_mode():
    """|f(z)| ~ 1e4: rel and abs residuals differ by that factor; the layer stops where a
    direct solve with solver.stop_mode stops."""
    from deqlab.solvers import get_solver

    p = LinearProblem(batch=3, d=8, norm=0.9)
    with torch.no_grad():
        p.x.mul_(1e4)
    nfe = {}
    for mode in ("rel", "abs"):
        solver = {"name": "fixed_point", "max_iter": 500, "tol": 1e-6, "stop_mode": mode}
        _z, info = DEQ(solver=solver)(p.f, torch.zeros_like(p.x))
        with torch.no_grad():
            direct = get_solver("fixed_point")(
                p.f, torch.zeros_like(p.x), max_iter=500, tol=1e-6, stop_mode=mode
            )
        assert info.nfe == direct.nfe
        nfe[mode] = info.nfe
    assert nfe["abs"] > nfe["rel"]


def test_what_a_budget_curve_and_a_reversible_core_cannot_do_is_said_in_full():
    x = torch.randn(3, 4, dtype=torch.float64)
    f = lambda z: 0.5 * torch.tanh(z + x)
    z0 = torch.zeros_like(x)
    cases = [
        (
            DEQ({"fallback": ["broyden"]}).eval(),
            torch.no_grad,
            "budgets: with solver.fallback a shorter budget would also cut the fallback's "
            "solve, which one solve cannot show; set solver.fallback=[] for a budget curve",
        ),
        (
            DEQ(),
            torch.enable_grad,
            "budgets: a budget curve is read from a solve without a gradient (evaluation, or "
            "under torch.no_grad()); a training solve keeps no per-budget states",
        ),
    ]
    for deq, mode, message in cases:
        with mode(), pytest.raises(ValueError) as e:
            deq(f, z0, budgets=[2])
        assert str(e.value) == message
    with pytest.raises(ValueError) as e:
        DEQ({"name": "reversible"}, {"name": "reversible"}, indexing=[2])
    assert str(e.value) == (
        "grad=reversible returns one state, the solve's own: set core.n_states=1 and "
        "core.indexing=[]"
    )
    from deqlab.core import SlicedDEQ

    with pytest.raises(ValueError) as e:
        SlicedDEQ({"name": "reversible"}, {"name": "reversible"})
    assert str(e.value) == (
        "grad=reversible reverses one solve from its start; core=sliced restarts the solve "
        "between segments: use core=indexing"
    )


@pytest.mark.parametrize(
    "option", ["capture", "options", "fallback", "fallback_options", "per_solver", "name"]
)
def test_the_layers_own_solver_settings_do_not_change_per_call(option):
    x = torch.randn(3, 4)
    with pytest.raises(ValueError) as e:
        DEQ()(lambda z: 0.5 * torch.tanh(z + x), torch.zeros_like(x), **{option: {}})
    assert str(e.value) == (
        f"['{option}'] cannot change per call: they are the layer's (build another DEQ, or set "
        "them in its solver config)"
    )


def test_a_budget_curve_is_kept_only_by_a_plain_solve_of_a_solver_that_keeps_one():
    assert DEQ({"name": "anderson"}).keeps_budgets()
    assert not DEQ({"name": "anderson", "capture": True, "check_every": 2}).keeps_budgets()
    assert not DEQ({"name": "anderson", "fallback": ["broyden"]}).keeps_budgets()


def test_fallbacks_are_counted_only_when_a_sample_needs_one_and_named_when_all_fail():
    x = torch.randn(4, 6, dtype=torch.float64)
    deq = DEQ({"max_iter": 40, "tol": 1e-8, "fallback": ["broyden"]}).eval()
    with torch.no_grad():
        _, info = deq(lambda z: 0.5 * torch.tanh(z + x), torch.zeros_like(x))
    assert bool(info.converged.all()) and info.fallbacks == []

    # sample 1 climbs (z <- z + 1) until f is undefined (NaN beyond |z| = 5), in both solvers
    def bad(z):
        climb = torch.where(z.abs() < 5, z + 1, z * float("nan"))
        return torch.where(torch.arange(4)[:, None] == 1, climb, 0.5 * z + x)

    with torch.no_grad(), pytest.warns(DivergenceWarning) as seen:
        _, info = deq(bad, torch.zeros_like(x))
    assert info.fallbacks == [1]
    assert any(
        str(w.message).startswith(
            "DEQ forward solve (anderson and its fallbacks ['broyden']) met non-finite iterates"
        )
        for w in seen
    )
