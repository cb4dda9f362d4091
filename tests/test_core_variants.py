"""The pluggable cores: indexing and sliced graphs, TorchDEQ's sampling options, the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqlab import DEQ, register_core
from deqlab.core import CORES, Core, DEQInfo, SlicedDEQ, build_core
from deqlab.grad import GradMode

from .helpers.problems import contraction


def problem(d: int = 6, norm: float = 0.9):
    w = contraction(d, norm).requires_grad_()
    x = torch.randn(3, d, dtype=torch.float64, requires_grad=True)
    return w, x, (lambda z: torch.tanh(z @ w.T + x))


def iterate(f, z, steps: int):
    """``steps`` plain fixed-point steps without a tape."""
    with torch.no_grad():
        for _ in range(steps):
            z = f(z)
    return z


def damped(f, z, steps: int, tau: float) -> list:
    out = []
    for _ in range(steps):
        z = tau * f(z) + (1 - tau) * z
        out.append(z)
    return out


FP = {"name": "fixed_point", "max_iter": 12, "tol": None}


def test_indexing_samples_the_listed_steps_each_with_its_phantom_steps():
    w, x, f = problem()
    grad = {"name": "phantom", "steps": [1, 2, 3], "tau": 0.7}
    z, info = DEQ(FP, grad, indexing=[3, 7])(f, torch.zeros_like(x))
    # states at solver steps 3 and 7, then the equilibrium (the best of the 12 steps: z_11)
    starts = [iterate(f, torch.zeros_like(x), k) for k in (3, 7, 11)]
    want = [damped(f, s, k, 0.7)[-1] for s, k in zip(starts, (1, 2, 3))]
    assert len(info.states) == 3 and info.states[-1] is z
    for got, ref in zip(info.states, want):
        torch.testing.assert_close(got, ref)
    c = [torch.randn_like(x) for _ in range(3)]
    loss = lambda states: sum((s * ci).sum() for s, ci in zip(states, c))
    for a, b in zip(
        torch.autograd.grad(loss(info.states), [w, x]), torch.autograd.grad(loss(want), [w, x])
    ):
        torch.testing.assert_close(a, b)


def test_n_states_follows_torchdeqs_spacing():
    deq = DEQ(n_states=3)
    assert deq.sample_steps(12) == [4, 8, 12] and deq.sample_steps(10) == [4, 7, 10]
    assert DEQ(indexing=[5, 20]).sample_steps(12) == [5, 12]  # steps past the budget are dropped
    assert SlicedDEQ(n_states=3).segments(12) == [4, 4, 4]
    assert SlicedDEQ(indexing=[2, 5]).segments(12) == [2, 3, 7]
    assert SlicedDEQ(indexing=[4, 12]).segments(12) == [4, 8]  # a step at the budget ends it
    assert SlicedDEQ(n_states=3).segments(2) == [1, 1, 1]  # at least one step each


def test_n_states_are_all_returned_when_the_solve_converges_first():
    """The states sampled at steps the solve never reached (it converged at ~15 of 60) are the
    equilibrium: n_states=3 returns 3 states (TorchDEQ returns fewer)."""
    _, x, f = problem(norm=0.3)
    solver = {"name": "anderson", "max_iter": 60, "tol": 1e-10}
    _, info = DEQ(solver, {"name": "onestep"}, n_states=3)(f, torch.zeros_like(x))
    assert info.nfe < 20 and info.converged.all()  # before the first sampled step (20)
    assert len(info.states) == 3
    for state in info.states:  # one step of f from the equilibrium
        torch.testing.assert_close(state, f(info.z), rtol=0, atol=0)


def test_ift_core_gives_earlier_states_a_phantom_gradient():
    w, x, f = problem()
    grad = {"name": "ift", "steps": 2, "tau": 0.5, "tol": 1e-12, "max_iter": 100}
    solver = {"name": "anderson", "max_iter": 12, "tol": None}
    _, info = DEQ(solver, grad, indexing=[4])(f, torch.zeros_like(x))
    (g,) = torch.autograd.grad(info.states[0].sum(), [w])
    z4 = (
        DEQ(solver, n_states=1)
        .solve(f, torch.zeros_like(x).detach(), max_iter=12, tol=None, save_at=[4])
        .saved[0]
    )
    (want,) = torch.autograd.grad(damped(f, z4.detach(), 2, 0.5)[-1].sum(), [w])
    torch.testing.assert_close(g, want)
    info.states[-1].sum().backward()
    assert len(info.backward) == 1  # only the equilibrium ran the implicit backward solve


@pytest.mark.parametrize(
    "sup_gap,sup_loc,want",
    [
        (2, [], [2, 4, 5]),
        (1, [], [1, 2, 3, 4, 5]),
        (-1, [1, 3], [1, 3, 5]),
        (5, [], [5]),
        (-1, [2, 5], [2, 5]),
    ],
)
def test_phantom_sup_gap_and_sup_loc_return_the_intermediate_steps(sup_gap, sup_loc, want):
    _, x, f = problem()
    grad = {"name": "phantom", "steps": 5, "tau": 0.6, "sup_gap": sup_gap, "sup_loc": sup_loc}
    _, info = DEQ(FP, grad)(f, torch.zeros_like(x))
    steps = damped(f, info.z, 5, 0.6)
    assert len(info.states) == len(want)
    for got, k in zip(info.states, want):
        torch.testing.assert_close(got, steps[k - 1])


@pytest.mark.parametrize("grad", ["ift", "phantom", "onestep"])
def test_sliced_and_indexing_agree_with_one_state_and_at_test_time(grad):
    w, x, f = problem()
    solver = {"name": "anderson", "max_iter": 30, "tol": 1e-10}
    a, b = DEQ(solver, {"name": grad}), SlicedDEQ(solver, {"name": grad})
    za, _ = a(f, torch.zeros_like(x))
    zb, _ = b(f, torch.zeros_like(x))
    torch.testing.assert_close(za, zb)
    for ga, gb in zip(torch.autograd.grad(za.sum(), [w, x]), torch.autograd.grad(zb.sum(), [w, x])):
        torch.testing.assert_close(ga, gb)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(f, torch.zeros_like(x))[0], b(f, torch.zeros_like(x))[0])


def test_sliced_gradients_follow_each_segments_recorded_graph():
    w, x, f = problem()
    grad = {"name": "phantom", "steps": 2, "tau": 0.5}
    _, info = SlicedDEQ(FP, grad, n_states=2)(f, torch.zeros_like(x))
    # segment 1: 6 steps from 0 (best: z_5), 2 recorded damped steps; segment 2 resumes there
    s1 = damped(f, iterate(f, torch.zeros_like(x), 5), 2, 0.5)[-1]
    s2 = damped(f, iterate(f, s1.detach(), 5), 2, 0.5)[-1]
    assert info.nfe == 12 and info.trace.shape[0] == 12
    c = [torch.randn_like(x) for _ in range(2)]
    for got, ref in zip(info.states, [s1, s2]):
        torch.testing.assert_close(got, ref)
    loss = lambda states: sum((s * ci).sum() for s, ci in zip(states, c))
    for a, b in zip(
        torch.autograd.grad(loss(info.states), [w, x]), torch.autograd.grad(loss([s1, s2]), [w, x])
    ):
        torch.testing.assert_close(a, b)


def test_sliced_core_budget_override_jacobian_and_backward_statistics():
    """A call's max_iter wins in training and at test time; no Jacobian penalty unless asked
    for; every segment's ift backward solve lands in the one statistics list returned."""
    _, x, f = problem()
    core = SlicedDEQ(FP, {"name": "ift", "tol": 1e-10, "max_iter": 60}, indexing=[3])
    z, info = core(f, torch.zeros_like(x), max_iter=8)
    assert info.nfe == 8 and info.jac_loss is None
    z.sum().backward()
    assert len(info.backward) == 1  # the last segment's implicit solve (the first: phantom)
    core.eval()
    with torch.no_grad():
        assert core(f, torch.zeros_like(x), max_iter=5)[1].nfe == 5


def test_sliced_core_collects_every_segments_backward_statistics(restore_registries):
    """A gradient mode that reports a backward solve at every sampled state (one not bound
    to the equilibrium) reports into one list, whatever segment it ran in."""
    from deqlab import register_grad

    def reporting(f, z, fz, cfg, steps, on_backward):
        on_backward(steps)
        return [fz]

    register_grad("test_reporting", reporting)
    _, x, f = problem()
    _, info = SlicedDEQ(FP, {"name": "test_reporting"}, n_states=3)(f, torch.zeros_like(x))
    assert info.backward == [1, 1, 1]


def test_per_state_steps_must_match_the_states():
    with pytest.raises(ValueError, match="2 step counts for 3 sampled states"):
        DEQ(grad={"name": "phantom", "steps": [1, 2]}, n_states=3)
    with pytest.raises(ValueError, match=r"core\.indexing lists increasing"):
        DEQ(indexing=[5, 3])


class Unrolled(nn.Module):
    """A user's core: plain unrolled iteration with backprop through every step."""

    def __init__(self, solver=None, grad=None, n_states=1, indexing=(), steps: int = 8):
        super().__init__()
        self.steps = steps

    def max_iter_for_training(self) -> int:
        return self.steps

    def forward(self, f, z0, *, max_iter=None, jac_vecs=0):
        z = z0
        for _ in range(max_iter or self.steps):
            z = f(z)
        res = f(z) - z
        abs_res = res.flatten(1).norm(dim=1).detach()
        zeros = torch.zeros(z.shape[0], dtype=torch.long)
        info = DEQInfo(
            z, abs_res, abs_res, self.steps, zeros, zeros.bool(), abs_res[None], states=[z]
        )
        return z, info


def test_a_registered_or_imported_core_is_built_from_its_name():
    register_core("unrolled_test", Unrolled)
    core = build_core({"name": "unrolled_test", "options": {"steps": 3}}, None, None)
    assert isinstance(core, Unrolled) and isinstance(core, Core) and core.steps == 3
    imported = build_core({"name": "tests.test_core_variants:Unrolled"}, None, None)
    assert isinstance(imported, Unrolled) and "tests.test_core_variants:Unrolled" in CORES
    with pytest.raises(ValueError, match="unknown core 'nope'"):
        build_core({"name": "nope"}, None, None)
    with pytest.raises(TypeError, match="is not a DEQ core"):
        build_core(nn.Linear(2, 2), None, None)


def _half_step(f, z, fz, cfg, steps, on_backward):
    """A user's gradient mode: half a damped step from z*."""
    return [0.5 * (z + fz)]


HALF_STEP = GradMode(_half_step)


def test_solver_and_gradient_mode_by_import_path():
    _, x, f = problem()
    deq = DEQ(
        {"name": "deqlab.solvers.fixed_point:fixed_point", "max_iter": 50, "tol": 1e-12},
        {"name": "tests.test_core_variants:HALF_STEP"},
    )
    z, info = deq(f, torch.zeros_like(x))
    torch.testing.assert_close(z, 0.5 * (info.z + f(info.z)))
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_pkg\.solvers'"):
        DEQ({"name": "no_such_pkg.solvers:newton"})
    with pytest.raises(TypeError, match="must accept the keyword arguments"):
        DEQ({"name": "torch:tanh"})
    with pytest.raises(TypeError, match=r"must be a deqlab\.grad\.GradMode"):
        DEQ(grad={"name": "torch:tanh"})


def test_build_core_passes_every_setting_and_names_the_group_of_a_bad_key():
    core = build_core(
        {"name": "indexing", "indexing": [3, 7]}, {"name": "broyden", "max_iter": 9}, None
    )
    assert core.sample_steps(9) == [3, 7, 9]
    assert core.solver_cfg.name == "broyden" and core.solver_cfg.max_iter == 9
    with pytest.raises(ValueError, match=r"^unknown core key 'steps'; valid keys: name, "):
        build_core({"name": "indexing", "steps": 3}, None, None)
    with pytest.raises(ValueError, match=r"^unknown solver key 'm_'; valid keys: name, "):
        build_core(None, {"m_": 3}, None)
    with pytest.raises(ValueError, match=r"^unknown grad key 'tau_'; valid keys: name, "):
        build_core(None, None, {"tau_": 3})


def test_a_module_that_is_not_a_core_is_refused_by_name():
    with pytest.raises(TypeError) as err:
        build_core(nn.Linear(2, 2), None, None)
    assert str(err.value) == (
        "Linear is not a DEQ core: it needs forward(f, z0, *, max_iter, jac_vecs, "
        "**solver_options) -> (z, DEQInfo) and max_iter_for_training() (see deqlab.core.Core)"
    )


def test_a_step_listed_at_the_budget_is_the_equilibrium_once():
    assert DEQ(indexing=[4, 12]).sample_steps(12) == [4, 12]
    assert DEQ(indexing=[12]).sample_steps(12) == [12]
    _w, x, f = problem()
    z, info = DEQ(FP, {"name": "phantom", "steps": 1}, indexing=[4, 12])(f, torch.zeros_like(x))
    assert len(info.states) == 2 and info.states[-1] is z


def test_two_states_are_sampled_when_n_states_is_two():
    _w, x, f = problem()
    deq = DEQ(FP, {"name": "phantom", "steps": 1}, n_states=2)
    assert deq.core_cfg.sampled() == 2 and deq.sample_steps(12) == [6, 12]
    _z, info = deq(f, torch.zeros_like(x))
    assert len(info.states) == 2


def test_a_core_must_be_a_class():
    def make_core(**settings):
        return DEQ(**settings)

    with pytest.raises(TypeError) as err:
        register_core("factory", make_core)
    assert str(err.value) == "core 'factory' must be a class, got function"
    assert "factory" not in CORES
