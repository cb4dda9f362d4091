"""Multiscale DEQ: published sizes, tuple-state solves, gradients, training, real data."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from deqlab import DEQ, get_solver
from deqlab.tasks.cifar.mdeq import MDEQCell, MDEQClassifier

from .helpers.problems import GRADS
from .helpers.runs import compose_cfg, short_real_cifar_run
from .test_cifar import HAS_CIFAR, REAL_DATA


def build(experiment: str, tmp_path, *overrides: str):
    cfg = compose_cfg([f"experiment={experiment}", *overrides], tmp_path)
    return instantiate(cfg.task.module)


@pytest.mark.parametrize(
    "experiment,published", [("cifar_mdeq_small", 0.16e6), ("cifar_mdeq_large", 11e6)]
)
def test_parameter_counts_match_the_published_sizes(experiment, published, tmp_path):
    n = sum(p.numel() for p in build(experiment, tmp_path).parameters())
    assert abs(n - published) / published < 0.05, n


def test_forward_solves_the_tuple_state_and_reports_true_residuals(tmp_path):
    module = build("cifar_mdeq_small", tmp_path, "solver.max_iter=30", "solver.tol=1e-4").eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        u, z0 = module.net.inject(x)
        f = lambda z: module.net.cell(z, u)
        z, info = module.deq(f, z0)
        assert isinstance(z, tuple) and [t.shape for t in z] == [(4, 24, 32, 32), (4, 24, 16, 16)]
        fz = f(z)
        diff = torch.cat([(a - b).flatten(1) for a, b in zip(fz, z)], 1).norm(dim=1)
        rel = diff / torch.cat([a.flatten(1) for a in fz], 1).norm(dim=1)
    torch.testing.assert_close(info.abs_residual, diff, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(info.rel_residual, rel, rtol=1e-4, atol=1e-6)
    # Untrained, the cell is no contraction (see tasks/cifar/mdeq.py), but Broyden still
    # cuts the residual well below where it starts.
    assert (info.rel_residual < 0.7 * info.trace[0]).all()


@pytest.mark.parametrize("grad", GRADS)
def test_every_gradient_mode_trains_the_small_model(grad, tmp_path):
    """A few Adam steps on one fixed batch: losses finite and falling."""
    torch.manual_seed(0)
    module = build(
        "cifar_mdeq_small", tmp_path, f"grad={grad}", "solver.max_iter=8", "grad.max_iter=8"
    )
    module.fit_cfg.pretrain_steps = 0
    module.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.Adam(module.parameters(), lr=2e-3)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = module.criterion(module(x)[0][-1], y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] * 0.8, losses


def test_mdeq_cell_ift_gradients_match_unrolled_autograd():
    torch.manual_seed(0)
    cell = MDEQCell([4, 6, 4], blocks=1, expansion=2, groups=2).double()
    # Shrink each block's output gain (gn3) so the cell is a contraction and plain unrolled
    # iteration converges: the untrained MDEQ cell is not one (see tasks/cifar/mdeq.py).
    for blocks in cell.branches:
        for block in blocks:
            block.gn3.weight.data.fill_(0.2)
            block.gn3.bias.data = torch.randn_like(block.gn3.bias)
    u = torch.randn(2, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    z0 = tuple(
        torch.zeros(2, c, 8 >> i, 8 >> i, dtype=torch.float64) for i, c in enumerate([4, 6, 4])
    )
    f = lambda z: cell(z, u)
    weights = [torch.randn_like(t) for t in z0]
    params = [u, *cell.parameters()]

    deq = DEQ(
        solver={"name": "broyden", "max_iter": 200, "tol": 1e-12},
        grad={"solver": "broyden", "max_iter": 200, "tol": 1e-12},
    )
    z, info = deq(f, z0)
    assert info.converged.all()
    got = torch.autograd.grad(sum((a * w).sum() for a, w in zip(z, weights)), params)

    zu = z0
    for _ in range(250):
        zu = f(zu)
    want = torch.autograd.grad(sum((a * w).sum() for a, w in zip(zu, weights)), params)
    for a, b in zip(got, want):
        assert (a - b).norm() / b.norm().clamp_min(1e-12) < 1e-6


def test_classifier_rejects_mismatched_head_widths():
    with pytest.raises(ValueError, match="one head channel count per branch"):
        MDEQClassifier(channels=(8, 8, 8), head_channels=(4, 8))


def test_each_solver_handles_the_multiscale_state():
    net = MDEQClassifier(
        channels=(8, 8), head_channels=(4, 8), final_channels=16, expansion=2, groups=2
    ).eval()
    with torch.no_grad():
        u, z0 = net.inject(torch.randn(2, 3, 16, 16))
        for name in ("fixed_point", "anderson", "broyden"):
            res = get_solver(name)(lambda z: net.cell(z, u), z0, max_iter=20, tol=1e-3)
            assert [t.shape for t in res.z] == [t.shape for t in z0], name
            assert torch.isfinite(res.rel_residual).all() and res.nfe == res.trace.shape[0]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CIFAR, reason="set DEQLAB_DATA to a folder holding cifar10/")
def test_real_cifar_mdeq_short_run_beats_chance(tmp_path):
    # 50 of the first epoch's 54 steps are unrolled pre-training: give the DEQ a second epoch.
    best = short_real_cifar_run("cifar_mdeq_cpu", REAL_DATA, tmp_path, epochs=2)
    assert best > 0.25, best  # chance is 0.10
