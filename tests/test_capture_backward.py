"""The backward solve replayed from CUDA graphs (``grad.capture``): what the recording holds
(one evaluation of f at the Jacobian's point, then the adjoint solve) checked on the CPU
through an eager stand-in for the replayer; its refusals; and the replays themselves at the
end (``requires_cuda``)."""

from __future__ import annotations

import warnings

import pytest
import torch

from deqlab import DEQ, Bound, apply_norm, register_solver
from deqlab import grad as grad_mod
from deqlab.grad import GradConfig, UnreadSettingWarning
from deqlab.solvers.capture import _copy_into, _static

from .helpers.problems import contraction


class NormedCell(torch.nn.Module):
    """tanh(W z + V x) with ||W|| = 0.8, W and V Linear layers (weight norm applies)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.lin = torch.nn.Linear(dim, dim, bias=False)
        self.inj = torch.nn.Linear(dim, dim)
        with torch.no_grad():
            self.lin.weight.copy_(contraction(dim, 0.8, self.lin.weight.dtype))

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + self.inj(x))


class EagerReplayer:
    """:meth:`CapturedSolver.replay` without CUDA graphs: the first call of each tag keeps its
    ``make`` and static copies of the inputs (the recording); every call copies its inputs
    into those buffers and reruns the kept ``make`` on them, then solves (a replay reruns the
    recorded kernels on the same addresses). So a ``make`` that reads anything but its
    arguments sees the first call's tensors, as a replayed graph would."""

    def __init__(self, name: str):
        from deqlab import get_solver

        self.solve, self.recordings = get_solver(name), {}

    def replay(self, tag, make, z0, inputs, kwargs):
        if tag not in self.recordings:
            self.recordings[tag] = (make, _static(z0), _static(inputs))
            make(*self.recordings[tag][2])  # the warm-up
        kept, static_z0, static_inputs = self.recordings[tag]
        _copy_into(static_z0, z0)
        _copy_into(static_inputs, inputs)
        fn, _ = kept(*static_inputs)
        return self.solve(fn, static_z0, **kwargs)


def train(capture: bool, jacobian_at: str, replayer=None, monkeypatch=None, steps=3, device="cpu"):
    """Three SGD steps of a weight-normed cell under ift (x a leaf too), on ``device`` (on
    CUDA the forward solve is captured too); each step's gradients and backward step count,
    and the cell."""
    torch.manual_seed(0)
    cell = NormedCell().to(device).double()
    apply_norm(cell, "weight_norm")
    opt = torch.optim.SGD(cell.parameters(), lr=0.1)
    grad = {
        "max_iter": 60,
        "tol": 1e-10,
        "capture": capture,
        "check_every": 4,
        "output": "fz" if jacobian_at == "fz" else "z",
        "jacobian_at": jacobian_at,
    }
    forward = {
        "max_iter": 60,
        "tol": 1e-10,
        "check_every": 4,
        "capture": capture and device == "cuda",
    }
    deq = DEQ(solver=forward, grad=grad)
    if replayer is not None:
        monkeypatch.setattr(grad_mod, "captured_adjoint", lambda f, cfg, device: replayer)
    out = []
    for _ in range(steps):
        x = torch.randn(5, 16, device=device, dtype=torch.float64, requires_grad=True)
        z, info = deq(Bound(cell, x), torch.zeros_like(x))
        opt.zero_grad()
        (z.sin() ** 2).sum().backward()
        out.append(
            ([p.grad.clone() for p in cell.parameters()], x.grad.clone(), info.backward[0].nfe)
        )
        opt.step()
    return out, cell


@pytest.mark.parametrize("jacobian_at", ["z", "fz"])
def test_the_recorded_adjoint_solve_gives_the_eager_gradients(jacobian_at, monkeypatch):
    """The recording's f(z*) is evaluated on static copies of z* (or f(z*)), u and x, with the
    weight-norm parametrization recomputed: each step's gradients, of the parameters and of x,
    equal the eager backward's, and the step counts agree."""
    eager, _ = train(False, jacobian_at)
    replayer = EagerReplayer("anderson")
    replayed, _ = train(True, jacobian_at, replayer, monkeypatch)
    assert len(replayer.recordings) == 1
    for (pa, xa, na), (pb, xb, nb) in zip(eager, replayed):
        assert na == nb < 60 and na % 4 == 0
        torch.testing.assert_close(xa, xb, rtol=1e-12, atol=0)
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_the_recorded_adjoint_solve_reenters_the_forwards_autocast(monkeypatch):
    """Under bf16 autocast the recording evaluates f(z*) in bf16, as the forward recorded it
    (the backward pass itself runs outside the autocast region)."""

    def run(replayer):
        torch.manual_seed(0)
        cell = NormedCell()
        grad = {"max_iter": 30, "tol": 1e-4, "capture": replayer is not None}
        deq = DEQ(solver={"max_iter": 30, "tol": 1e-4}, grad=grad)
        if replayer is not None:
            monkeypatch.setattr(grad_mod, "captured_adjoint", lambda *a: replayer)
        x = torch.randn(5, 16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, info = deq(Bound(cell, x), torch.zeros_like(x))
        z.float().square().sum().backward()
        return [p.grad for p in cell.parameters()], info.backward[0].nfe

    (ga, na), (gb, nb) = run(None), run(EagerReplayer("anderson"))
    assert na == nb
    for a, b in zip(ga, gb):
        assert torch.equal(a, b)


def test_grad_capture_on_a_cpu_warns_once_per_cell_and_solves_eagerly():
    eager, _ = train(False, "z", steps=2)
    with pytest.warns(UserWarning, match="grad.capture: CUDA graphs need a CUDA device; on cpu"):
        on_cpu, _ = train(True, "z", steps=1)
    for a, b in zip(eager[0][0], on_cpu[0][0]):
        assert torch.equal(a, b)
    cell = NormedCell().double()
    deq = DEQ(grad={"capture": True})
    x = torch.randn(2, 16, dtype=torch.float64)
    with pytest.warns(UserWarning, match="grad.capture"):
        deq(Bound(cell, x), torch.zeros_like(x))[0].sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq(Bound(cell, x), torch.zeros_like(x))[0].sum().backward()  # once per cell


def test_grad_capture_refuses_a_closure_on_any_device():
    cell = NormedCell().double()
    x = torch.randn(2, 16, dtype=torch.float64)
    deq = DEQ(grad={"capture": True})
    with pytest.raises(ValueError, match=r"grad.capture replays f .*deqlab.Bound\(cell, x\)"):
        deq(lambda z: cell(z, x), torch.zeros_like(x))


def test_grad_capture_refuses_running_statistics_in_training(monkeypatch):
    class BatchNormed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)
            self.bn = torch.nn.BatchNorm1d(8)

        def forward(self, z, x):
            return 0.5 * torch.tanh(self.bn(self.lin(z)) + x)

    cell = BatchNormed().double()
    monkeypatch.setattr(grad_mod, "captured_adjoint", lambda *a: EagerReplayer("anderson"))
    deq = DEQ(grad={"capture": True})
    x = torch.randn(4, 8, dtype=torch.float64)
    z, _ = deq(Bound(cell, x), torch.zeros_like(x))
    with pytest.raises(ValueError, match="BatchNorm1d 'bn' updates its running statistics"):
        z.sum().backward()
    cell.eval()  # frozen statistics: replayed
    deq(Bound(cell, x), torch.zeros_like(x))[0].sum().backward()


def test_grad_capture_is_validated():
    def plain(f, z0, *, max_iter, tol, stop_mode="rel", save_at=()):
        raise AssertionError("not called")

    register_solver("no_tracker", plain)
    for switch in ({"capture": True}, {"check_every": 3}):
        with pytest.raises(ValueError, match=r"backward solver 'no_tracker' does not report"):
            GradConfig(solver="no_tracker", **switch)
        with pytest.raises(ValueError, match="ls reads its Armijo test back at every trial"):
            GradConfig(solver="broyden", solver_options={"ls": True}, **switch)
    with pytest.raises(ValueError, match=r"grad\.check_every must be a positive int"):
        GradConfig(check_every=0)
    with pytest.raises(ValueError, match=r"set grad\.check_every"):
        GradConfig(solver_options={"check_every": 4})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradConfig(name="shine", solver="broyden", capture=True)  # shine's solve is ift's
    with pytest.warns(UnreadSettingWarning, match="grad=phantom does not read capture=True"):
        GradConfig(name="phantom", capture=True)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("jacobian_at", ["z", "fz"])
def test_captured_backward_solves_give_the_eager_gradients(jacobian_at):
    """Three SGD steps of a weight-normed cell: the replayed backward solve (one recording)
    returns the eager gradients and step counts, with the forward solve captured too."""

    eager, _ = train(False, jacobian_at, device="cuda")
    replayed, cell = train(True, jacobian_at, device="cuda")
    assert len(grad_mod._ADJOINT_RECORDINGS[cell]["anderson"].recordings) == 1
    for (pa, xa, na), (pb, xb, nb) in zip(eager, replayed):
        assert na == nb < 60
        torch.testing.assert_close(xa, xb, rtol=1e-10, atol=1e-14)
        for a, b in zip(pa, pb):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.requires_cuda
def test_captured_backward_under_bf16_autocast_matches_the_eager_one():
    """f(z*) re-enters the forward's bf16 autocast inside the recording."""

    def run(capture: bool):
        torch.manual_seed(0)
        cell = NormedCell().cuda()
        grad = {
            "max_iter": 30,
            "tol": 1e-4,
            "capture": capture,
            "solver_options": {"check_every": 2},
        }
        deq = DEQ(solver={"max_iter": 30, "tol": 1e-4}, grad=grad)
        x = torch.randn(5, 16, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            z, info = deq(Bound(cell, x), torch.zeros_like(x))
        z.float().square().sum().backward()
        return [p.grad for p in cell.parameters()], info.backward[0].nfe

    (ga, na), (gb, nb) = run(False), run(True)
    assert na == nb
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)
