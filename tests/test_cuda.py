"""The engine and the runner on a GPU (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from deqlab import DEQ, get_solver

from .problems import SOLVERS, ConvCell

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
        [f"data_dir={data}", *overrides, "trainer=gpu", "trainer.precision=bf16-mixed"],
        tmp_path / "out",
    )
    assert run(cfg) is not None
