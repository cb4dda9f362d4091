"""The engine and the runner on a GPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from deqlab import DEQ, get_solver

from .problems import SOLVERS, ConvCell, StaggeredCell, contraction

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_solvers_on_cuda(name, dtype):
    cell = ConvCell(8, 12, 4).cuda().to(dtype)
    x = torch.randn(4, 8, 8, 8, device="cuda", dtype=dtype)
    with torch.no_grad():
        res = get_solver(name)(lambda z: cell(z, x), torch.zeros_like(x), max_iter=60, tol=2e-2)
    assert res.z.device.type == "cuda" and res.z.dtype == dtype
    assert torch.isfinite(res.z).all() and res.converged.all()


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


def test_bf16_autocast_training_step():
    from deqlab.tasks.cifar.model import TutorialDEQ
    from deqlab.tasks.cifar.module import CifarModule

    module = CifarModule(
        TutorialDEQ(16, 16, groups=4), solver={"max_iter": 10}, grad={"max_iter": 10}
    ).cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs, info = module(x)
        loss = module.criterion(outputs[-1].float(), y)
    loss.backward()
    assert torch.isfinite(loss) and len(info.backward) == 1
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


def test_runner_on_gpu(tmp_path):
    from deqlab.runner.main import run

    from .runs import TINY, compose_cfg, write_cifar_folder

    data = write_cifar_folder(tmp_path / "data")
    overrides = [o for o in TINY if not o.startswith("trainer=")]
    cfg = compose_cfg(
        [f"paths.data_dir={data}", *overrides, "trainer=gpu", "trainer.precision=bf16-mixed"],
        tmp_path / "out",
    )
    assert run(cfg) is not None


# -- captured solves (solver.capture) ---------------------------------------------------------


def _captured_and_eager(name, stop_mode="rel", every=4, **solver):
    cfg = {"name": name, "max_iter": 100, "tol": 1e-8, "stop_mode": stop_mode, **solver}
    eager = DEQ(solver={**cfg, "check_every": every}).eval()
    captured = DEQ(solver={**cfg, "check_every": every, "capture": True}).eval()
    return eager, captured


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


def test_capture_refuses_what_it_cannot_replay():
    from deqlab import Bound
    from deqlab.tasks.cifar.model import TutorialDEQ

    cell = ConvCell(8, 12, 4).cuda()
    x = torch.randn(2, 8, 8, 8, device="cuda")
    deq = DEQ(solver={"capture": True, "check_every": 5})
    with pytest.raises(ValueError, match=r"closure.*deqlab.Bound\(cell, x\)"):
        deq(lambda z: cell(z, x), torch.zeros_like(x))
    net = TutorialDEQ(16, 16, groups=4, dropout=0.2).cuda().train()
    u = torch.randn(2, 16, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="mask is drawn anew for each batch"):
        deq(Bound(net.cell, u), torch.zeros_like(u))


def test_runner_trains_with_captured_solves_in_bf16(tmp_path):
    from deqlab.runner.main import run

    from .runs import TINY, compose_cfg, write_cifar_folder

    data = write_cifar_folder(tmp_path / "data")
    overrides = [o for o in TINY if not o.startswith("trainer=")]
    cfg = compose_cfg(
        [f"paths.data_dir={data}", *overrides, "trainer=gpu", "trainer.precision=bf16-mixed",
         "solver.capture=true", "solver.check_every=4"],
        tmp_path / "out",
    )  # fmt: skip
    assert run(cfg) is not None
