"""Deferred convergence tests and captured solves (``solver.check_every``, ``solver.capture``),
and the bf16 policy (f in bf16, the solver in fp32), on the CPU; the CUDA-graph replays
themselves at the end (``requires_cuda``)."""

from __future__ import annotations

import math

import pytest
import torch

from deqlab import DEQ, Bound, get_solver, register_solver
from deqlab.solvers import SolverConfig
from deqlab.solvers import capture as capture_mod

from .helpers.problems import SOLVERS, ConvCell, StaggeredCell, contraction

MODES = ("rel", "abs", "batch_rel", "batch_abs")


def staggered(batch: int = 6, dim: int = 32):
    cell = StaggeredCell(batch, dim)
    x = torch.randn(batch, dim, dtype=torch.float64)
    return Bound(cell, x), torch.zeros_like(x)


def same_result(a, b, steps: int | None = None) -> None:
    for field in ("z", "abs_residual", "rel_residual", "best_step", "converged"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    n = steps or min(len(a.trace), len(b.trace))
    assert torch.equal(a.trace[:n], b.trace[:n])
    assert a.nonfinite == b.nonfinite


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("stop_mode", MODES)
@pytest.mark.parametrize("return_final", [False, True])
@pytest.mark.parametrize("every", [2, 3, 7])
def test_deferred_tests_return_what_testing_every_step_returns(
    name, stop_mode, return_final, every
):
    """Only nfe may differ: rounded up to the next test (a multiple of k, at most the budget)."""
    torch.manual_seed(0)
    f, z0 = staggered()
    kw = dict(max_iter=60, tol=1e-6, stop_mode=stop_mode, return_final=return_final)
    eager = get_solver(name)(f, z0, **kw)
    deferred = get_solver(name)(f, z0, check_every=every, **kw)
    assert eager.converged.all() and eager.nfe < 60  # the premise: it stops early
    assert len(set(eager.best_step.tolist())) > 1 or stop_mode.startswith("batch")
    same_result(eager, deferred, eager.nfe)
    assert deferred.nfe == min(60, math.ceil(eager.nfe / every) * every)


@pytest.mark.parametrize("name", SOLVERS)
def test_deferred_tests_report_a_non_finite_residual(name):
    """Sample 1 overflows at the fourth step (f = 1e100 z + 1): the solve still stops and says
    so, and every sample returns its best finite iterate, as when testing every step."""
    w = contraction(16, 0.5)
    x = torch.randn(3, 16, dtype=torch.float64)
    blowup = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ w.T + x) * (1 - blowup) + blowup * (1e100 * z + 1)

    kw = dict(max_iter=30, tol=1e-8, stop_mode="abs")
    eager = get_solver(name)(f, torch.zeros_like(x), **kw)
    deferred = get_solver(name)(f, torch.zeros_like(x), check_every=4, **kw)
    assert eager.nonfinite and deferred.nonfinite
    assert deferred.nfe < 30 and deferred.nfe % 4 == 0
    assert torch.isfinite(deferred.z).all()
    assert torch.equal(eager.best_step[1], deferred.best_step[1])


@pytest.mark.parametrize("stop_mode", MODES)
def test_deferred_tests_return_the_best_iterate_of_a_rising_residual(stop_mode):
    """f(z) = A z + x with A non-normal (||A^k e|| grows for steps before it decays) from
    z0 = z* + e: the residual falls, then rises over the rest of the budget, so the best
    iterate is an early one (step 2), in the batch modes too."""
    torch.manual_seed(0)
    a = torch.zeros(8, 8, dtype=torch.float64)
    for i in range(0, 8, 2):
        a[i, i] = a[i + 1, i + 1] = 0.6
        a[i, i + 1] = 4.0
    x = 100 * torch.randn(5, 8, dtype=torch.float64)  # ||f(z)|| large: rel rises with abs

    def f(z):
        return z @ a.T + x

    z_star = torch.linalg.solve(torch.eye(8, dtype=torch.float64) - a, x.T).T
    z0 = z_star + torch.randn(5, 8, dtype=torch.float64) * torch.tensor([0.0, 1.0] * 4)
    kw = dict(max_iter=7, tol=1e-12, stop_mode=stop_mode)
    eager = get_solver("fixed_point")(f, z0, **kw)
    deferred = get_solver("fixed_point")(f, z0, check_every=2, **kw)
    assert (eager.best_step == 2).all() and not eager.converged.any()  # the premise
    same_result(eager, deferred)


@pytest.mark.parametrize("stop_mode", ["abs", "batch_abs"])
def test_a_residual_equal_to_tol_converges_under_deferred_tests(stop_mode):
    """f(z) = z / 2 from z0 = 1: the residual is 2^-(k+1), exactly tol = 1/8 at step 2. That
    step converges (residual <= tol) whether tested at once or at step 4."""
    z0 = torch.ones(1, 1, dtype=torch.float64)
    kw = dict(max_iter=10, tol=0.125, stop_mode=stop_mode)
    eager = get_solver("fixed_point")(lambda z: z / 2, z0, **kw)
    deferred = get_solver("fixed_point")(lambda z: z / 2, z0, check_every=4, **kw)
    assert eager.nfe == 3 and eager.best_step.item() == 2  # the premise
    same_result(eager, deferred, 3)


@pytest.mark.parametrize("every", [1, 3])
def test_deferred_tests_keep_the_states_asked_for(every):
    """save_at keeps z_k at the listed steps, whether the tests run at every step or not."""
    f, z0 = staggered()
    kw = dict(max_iter=30, tol=1e-6, save_at=[1, 4, 9])
    eager = get_solver("anderson")(f, z0, **kw)
    deferred = get_solver("anderson")(f, z0, check_every=every, **kw)
    unrolled = [z0]
    for _ in range(9):  # the first Anderson step is a plain f step; later ones mix
        unrolled.append(f(unrolled[-1]))
    assert torch.equal(eager.saved[0], unrolled[1])
    for a, b in zip(eager.saved, deferred.saved, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("check_every", [1, 2])
def test_batch_relative_residual_is_scaled_by_the_norm_of_f(check_every):
    """batch_rel = ||F(Z) - Z|| / (||F(Z)|| + 1e-9), checked where the 1e-9 decides: F = 0
    and Z = 1e-12 give 1e-3 at step 0 (above tol 5e-4), then 0 at step 1."""
    z0 = torch.full((1, 1), 1e-12, dtype=torch.float64)
    out = get_solver("fixed_point")(
        lambda z: 0 * z, z0, max_iter=4, tol=5e-4, stop_mode="batch_rel", check_every=check_every
    )
    assert out.best_step.item() == 1 and out.converged.all()


class FakeRecorder:
    """A recorder without graphs: the tracker runs eagerly and hands over its flags."""

    def __init__(self):
        self.flags: list = []

    def cut(self, done):
        self.flags.append(None if done is None else done.clone())  # read after the solve


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("stop_mode", MODES)
def test_a_recorded_solve_reads_nothing_and_cuts_at_every_test(name, stop_mode, monkeypatch):
    torch.manual_seed(0)
    f, z0 = staggered()
    eager = get_solver(name)(f, z0, max_iter=40, tol=1e-6, stop_mode=stop_mode)
    rec = FakeRecorder()
    monkeypatch.setattr(capture_mod._local, "recorder", rec, raising=False)
    with monkeypatch.context() as m:
        for attr in ("item", "tolist", "__bool__", "nonzero"):
            m.setattr(torch.Tensor, attr, lambda *a, **k: pytest.fail("host read"))
        res = get_solver(name)(f, z0, max_iter=40, tol=1e-6, stop_mode=stop_mode, check_every=5)
    capture_mod._local.recorder = None
    rec.flags = [None if flag is None else bool(flag) for flag in rec.flags]
    # a test after steps 5, 10, ..., 35 (none after the last step), then the result graph
    assert rec.flags[-1] is None and len(rec.flags) == 8
    assert rec.flags.index(True) == math.ceil(eager.nfe / 5) - 1  # the replay stops there
    assert res.nfe == 40 and isinstance(res.nonfinite, torch.Tensor)
    res.nonfinite = bool(res.nonfinite)
    same_result(eager, res, eager.nfe)


def test_check_every_and_capture_are_validated():
    with pytest.raises(ValueError, match="check_every must be a positive int"):
        SolverConfig(check_every=0)
    with pytest.raises(ValueError, match="check_every must be a positive int"):
        get_solver("anderson")(lambda z: z, torch.zeros(1, 2), max_iter=3, tol=1e-3, check_every=0)

    def plain(f, z0, *, max_iter, tol, stop_mode="rel", save_at=()):
        raise AssertionError("not called")

    register_solver("no_deferral", plain)
    with pytest.raises(ValueError, match=r"takes no check_every.*capture=false"):
        SolverConfig(name="no_deferral", capture=True)
    with pytest.raises(ValueError, match="takes no check_every"):
        SolverConfig(name="no_deferral", check_every=4)


def test_capture_on_a_cpu_warns_once_and_solves_eagerly():
    torch.manual_seed(0)
    cell = ConvCell().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    solver = {"name": "anderson", "max_iter": 40, "tol": 1e-8, "check_every": 5}
    eager = DEQ(solver=solver).eval()
    captured = DEQ(solver={**solver, "capture": True}).eval()
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device; on cpu"):
        z, info = captured(Bound(cell, x), torch.zeros_like(x))
    ref, ref_info = eager(lambda z: cell(z, x), torch.zeros_like(x))
    assert torch.equal(z, ref) and info.nfe == ref_info.nfe and info.nfe % 5 == 0
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        captured(Bound(cell, x), torch.zeros_like(x))  # once per layer


def test_bound_is_the_cell_on_its_inputs():
    cell = ConvCell().double()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    z = torch.randn_like(x)
    assert torch.equal(Bound(cell, x)(z), cell(z, x))


# -- bf16 inside f, fp32 in the solver --------------------------------------------------------


class Spy:
    """Dtypes of what the solvers allocate and solve with while active."""

    def __init__(self, monkeypatch):
        import importlib

        from deqlab.solvers import base

        anderson = importlib.import_module("deqlab.solvers.anderson")
        broyden = importlib.import_module("deqlab.solvers.broyden")

        self.dtypes: dict[str, set] = {"scratch": set(), "tracker": set(), "gram": set()}
        real_scratch, real_solve = base.scratch, torch.linalg.solve_ex
        real_init = base.Tracker.__init__

        def scratch(shape, dtype, device):
            self.dtypes["scratch"].add(dtype)
            return real_scratch(shape, dtype, device)

        def solve_ex(h, b, **kw):
            self.dtypes["gram"].add(h.dtype)
            return real_solve(h, b, **kw)

        def init(tracker, z0, *a, **k):
            real_init(tracker, z0, *a, **k)
            self.dtypes["tracker"].update({z0.dtype, tracker.trace.dtype})

        monkeypatch.setattr(anderson, "scratch", scratch)
        monkeypatch.setattr(broyden, "scratch", scratch)
        monkeypatch.setattr(torch.linalg, "solve_ex", solve_ex)
        monkeypatch.setattr(base.Tracker, "__init__", init)


@pytest.mark.parametrize(
    ("name", "jacobian_at"), [(n, "z") for n in SOLVERS] + [("anderson", "fz")]
)
def test_under_bf16_autocast_f_runs_in_bf16_and_the_solver_in_fp32(name, jacobian_at, monkeypatch):
    """The DEQ-Flow pattern: the cell's convolutions in bf16, the state, Anderson's Gram
    system, Broyden's low-rank factors, the residuals, and the backward solve in fp32; the
    statistics agree with a float32 solve to bf16's precision."""
    torch.manual_seed(0)
    cell = ConvCell(4, 8, 2)
    x = torch.randn(4, 4, 6, 6)
    xb = x.detach().requires_grad_()
    seen = set()  # the dtypes the cell's convolutions compute in
    cell.conv1.register_forward_hook(lambda module, args, out: seen.add(out.dtype))
    f = Bound(cell, xb)

    solver = {"name": name, "max_iter": 40, "tol": 1e-2}
    grad = {
        "solver": name,
        "max_iter": 40,
        "tol": 1e-2,
        "jacobian_at": jacobian_at,
        "output": jacobian_at,
    }
    reference, ref_info = DEQ(solver=solver, grad=grad)(f, torch.zeros_like(x))
    reference = reference.detach()
    spy = Spy(monkeypatch)
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z0 = torch.zeros_like(x, dtype=torch.bfloat16)  # as a bf16 injection gives it
        z, info = DEQ(solver=solver, grad=grad)(f, z0)
    assert seen == {torch.bfloat16}  # f's convolutions ran in bf16
    if jacobian_at == "z":
        assert z.dtype == torch.bfloat16  # the state keeps the caller's dtype...
    assert spy.dtypes["tracker"] == {torch.float32}  # ...but is solved in fp32
    if name != "fixed_point":
        assert spy.dtypes["scratch"] == {torch.float32}
    if name == "anderson":
        assert spy.dtypes["gram"] == {torch.float32}
    assert info.trace.dtype == torch.float32
    rel = (z.float() - reference).norm() / reference.norm()
    assert rel < 3e-2, rel
    assert abs(info.nfe - ref_info.nfe) <= 3
    spy.dtypes["tracker"].clear()
    seen.clear()
    z.float().square().sum().backward()
    # jacobian_at=fz evaluates f again in the backward pass: in the forward's precision
    assert seen == ({torch.bfloat16} if jacobian_at == "fz" else set())
    assert spy.dtypes["tracker"] == {torch.float32}  # the backward solve, in fp32
    assert info.backward[0].trace.dtype == torch.float32 and info.backward[0].converged.all()
    assert xb.grad is not None and torch.isfinite(xb.grad).all()


# -- on a GPU (skipped without CUDA) ---------------------------------------------------------


def _captured_and_eager(name, stop_mode="rel", every=4, **solver):
    cfg = {"name": name, "max_iter": 100, "tol": 1e-8, "stop_mode": stop_mode, **solver}
    eager = DEQ(solver={**cfg, "check_every": every}).eval()
    captured = DEQ(solver={**cfg, "check_every": every, "capture": True}).eval()
    return eager, captured


@pytest.mark.requires_cuda
@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["rel", "batch_abs"])
def test_captured_solves_replay_what_eager_solves_return(name, stop_mode):
    """Three calls on new inputs and a new z0, the cell's weights changed in place between
    them (as an optimizer does): each replay returns the eager solve's statistics, stops at
    the same test, and one recording serves all three."""
    from deqlab import Bound

    torch.manual_seed(0)
    cell = StaggeredCell().cuda()
    eager, captured = _captured_and_eager(name, stop_mode)
    for _ in range(3):
        x = torch.randn(6, 32, device="cuda", dtype=torch.float64)
        z0 = 0.1 * torch.randn_like(x)
        with torch.no_grad():
            z, info = captured(Bound(cell, x), z0)
            ref, ref_info = eager(Bound(cell, x), z0)
        torch.testing.assert_close(z, ref, rtol=1e-9, atol=1e-12)
        assert info.nfe == ref_info.nfe < 100 and info.nfe % 4 == 0
        assert torch.equal(info.best_step, ref_info.best_step)
        assert torch.equal(info.converged, ref_info.converged) and info.converged.all()
        torch.testing.assert_close(info.rel_residual, ref_info.rel_residual)
        assert info.trace.shape == ref_info.trace.shape
        cell.w.mul_(0.9)
    assert len(captured.captured.recordings) == 1


class NormedCell(torch.nn.Module):
    """tanh(W z + x) with ||W|| = 0.8 through a Linear layer (which weight norm applies to)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(32, 32, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(contraction(32, 0.8))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


@pytest.mark.requires_cuda
def test_captured_training_step_gives_the_eager_gradients_with_weight_norm():
    """ift through a captured forward solve of a weight-normed cell: the parametrization is
    recomputed inside the graph, so each SGD step on g and v shows in the next replay, and
    the gradients equal the eager ones bit for bit (H100, 2026-11-28: three steps, 25
    evaluations each, difference 0.0)."""
    from deqlab import Bound, apply_norm

    torch.manual_seed(0)
    cells = [NormedCell().cuda().double() for _ in range(2)]
    cells[1].load_state_dict(cells[0].state_dict())
    for c in cells:
        apply_norm(c, "weight_norm")
    grad = {"max_iter": 60, "tol": 1e-12}
    solver = {"name": "anderson", "max_iter": 60, "tol": 1e-12, "check_every": 5}
    layers = [DEQ(solver=solver, grad=grad), DEQ(solver={**solver, "capture": True}, grad=grad)]
    opts = [torch.optim.SGD(c.parameters(), lr=0.1) for c in cells]
    x = torch.randn(6, 32, device="cuda", dtype=torch.float64)
    for _ in range(3):
        grads, nfe = [], []
        for cell, layer, opt in zip(cells, layers, opts):
            z, info = layer(Bound(cell, x), torch.zeros_like(x))
            opt.zero_grad()
            (z**2).sum().backward()
            grads.append([p.grad.clone() for p in cell.parameters()])
            nfe.append(info.nfe)
            opt.step()
        assert nfe[0] == nfe[1] < 60
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.requires_cuda
def test_capture_refuses_what_it_cannot_replay():

    cell = ConvCell(8, 12, 4).cuda()
    x = torch.randn(2, 8, 8, 8, device="cuda")
    deq = DEQ(solver={"capture": True, "check_every": 5})
    with pytest.raises(ValueError, match=r"closure.*deqlab.Bound\(cell, x\)"):
        deq(lambda z: cell(z, x), torch.zeros_like(x))


@pytest.mark.requires_cuda
def test_captured_training_with_variational_dropout_gives_the_eager_gradients():
    """Each batch's masks are redrawn in place, where the replays read them: three steps of
    the tutorial's cell with dropout 0.2, both solves captured, give the eager gradients."""
    from deqlab import Bound, reset_dropout
    from deqlab.tasks.cifar.model import TutorialDEQ

    def run(capture: bool):
        torch.manual_seed(0)
        net = TutorialDEQ(16, 16, groups=4, dropout=0.2).cuda().double().train()
        solver = {"max_iter": 30, "tol": 1e-8, "check_every": 5, "capture": capture}
        deq = DEQ(solver=solver, grad={"max_iter": 30, "tol": 1e-8, "capture": capture})
        grads = []
        for step in range(3):
            torch.manual_seed(step)
            reset_dropout(net)
            u = torch.randn(2, 16, 8, 8, device="cuda", dtype=torch.float64)
            z, _ = deq(Bound(net.cell, u), torch.zeros_like(u))
            net.zero_grad()
            z.square().sum().backward()
            grads.append([p.grad.clone() for p in net.cell.parameters()])
        return grads

    for eager, replayed in zip(run(False), run(True)):
        for a, b in zip(eager, replayed):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_the_arguments_a_recording_keeps_are_walked_to_every_tensor():
    """A captured solve copies its arguments into static buffers and keys its recordings on
    their structure: tuples, named tuples, lists, dicts and dataclasses (a language model's
    context) are walked to every tensor, anything else is kept; the key sees every shape,
    dtype and grad flag, and not the values."""
    import dataclasses
    from collections import namedtuple

    from deqlab.bound import map_tensors
    from deqlab.solvers.capture import _copy_into, _signature, _static

    Pair = namedtuple("Pair", "a b")

    @dataclasses.dataclass
    class Context:
        mask: torch.Tensor
        lengths: list
        derived: torch.Tensor = dataclasses.field(init=False, default=None)

    args = (
        torch.ones(2),
        Pair(torch.zeros(1), 3),
        [torch.full((2, 2), 2.0), "tag"],
        {"pos": torch.arange(3.0)},
        Context(torch.ones(1, 4), [torch.ones(1)]),
    )
    doubled = map_tensors(lambda t: t * 2, args)
    assert type(doubled) is tuple and type(doubled[1]) is Pair and doubled[1].b == 3
    assert doubled[2][1] == "tag" and type(doubled[2]) is list
    assert torch.equal(doubled[3]["pos"], torch.arange(3.0) * 2)
    assert type(doubled[4]) is Context and torch.equal(doubled[4].mask, torch.full((1, 4), 2.0))
    assert torch.equal(doubled[4].lengths[0], torch.full((1,), 2.0))
    assert map_tensors(lambda t: t, Context) is Context  # a class is kept as it is
    static = _static(args)
    assert static[0] is not args[0] and torch.equal(static[0], args[0])
    _copy_into(static, doubled)
    assert torch.equal(static[2][0], torch.full((2, 2), 4.0)) and torch.equal(
        args[2][0], torch.full((2, 2), 2.0)
    )
    assert _signature(args) == _signature(doubled)  # the values do not matter
    for other in (
        (torch.ones(3), *args[1:]),
        (torch.ones(2, dtype=torch.float64), *args[1:]),
        (torch.ones(2, requires_grad=True), *args[1:]),
        (torch.ones(2), Pair(torch.zeros(1), 4), *args[2:]),
    ):
        assert _signature(other) != _signature(args)


def test_the_old_home_of_bound_warns_and_hands_it_over():
    import deqlab

    with pytest.warns(DeprecationWarning) as seen:
        assert capture_mod.Bound is deqlab.Bound
    assert str(seen[0].message) == (
        "deqlab.solvers.capture.Bound moved to deqlab.bound: use deqlab.Bound"
    )
    with pytest.raises(AttributeError) as err:
        capture_mod.Bounds  # noqa: B018
    assert str(err.value) == "module 'deqlab.solvers.capture' has no attribute 'Bounds'"
