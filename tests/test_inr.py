"""Implicit neural representations: the pixel grid and its refusals, the equilibrium MFN at
its closed-form fixed point, and the equilibrium and explicit networks fitting a real
photograph through the runner, with warm starts carried across steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("skimage")

from deqlab import DEQ, Bound
from deqlab.tasks.inr.data import (
    ImageDataModule,
    ImageError,
    check_grid,
    coordinate_grid,
    image_tensor,
)
from deqlab.tasks.inr.model import ImplicitMFN


def test_the_grid_has_one_row_per_pixel_in_row_major_order():
    grid = coordinate_grid(3, 4)
    assert grid.shape == (12, 2)
    assert grid[0].tolist() == [-1.0, -1.0] and grid[-1].tolist() == [1.0, 1.0]
    assert grid[1, 0] > grid[0, 0] and grid[1, 1] == grid[0, 1]  # x runs along a row
    with pytest.raises(ImageError, match=r"grid of shape \(12, 2\) for a 4x4 image"):
        check_grid(grid, torch.zeros(3, 4, 4))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((0, 4, 3), np.uint8), "the image is empty"),
        (np.zeros((4, 4, 4), np.uint8), "alpha channel"),
        (np.zeros((4, 4, 3), np.float64), "dtype is float64"),
        (np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
    ],
)
def test_an_image_the_task_cannot_fit_is_refused_by_name(array, message):
    with pytest.raises(ImageError, match=message):
        image_tensor(array, None)


def test_the_images_channels_must_be_the_networks():
    with pytest.raises(ImageError, match=r"'camera' has 1 channel\(s\).*task.channels=1"):
        ImageDataModule("camera", size=16, channels=3).setup()
    with pytest.raises(ImageError, match="scikit-image ships no image 'nosuch'"):
        ImageDataModule("nosuch", size=16).setup()
    module = ImageDataModule("astronaut", size=16, steps_per_epoch=3, channels=3)
    module.setup()
    coords, targets = module.train_set[2]
    assert coords.shape == (256, 2) and targets.shape == (256, 3)
    assert float(targets.min()) >= -1 and float(targets.max()) <= 1


def test_the_equilibrium_mfn_is_its_closed_form():
    """z = g1 * (W (z + g0) + b) is linear in z: per pixel, (I - diag(g1) W) z* = g1 * (W g0
    + b). Anderson's solve matches numpy's linear solve in float64."""
    torch.manual_seed(0)
    net = ImplicitMFN(channels=1, width=6, input_scale=4.0).double()
    with torch.no_grad():
        net.cell.mix.weight.mul_(0.5)
    coords = coordinate_grid(3, 3).double()[None]
    u, z0 = net.inject(coords)
    deq = DEQ({"name": "anderson", "max_iter": 200, "tol": 1e-12, "stop_mode": "abs"})
    z, info = deq(Bound(net.cell, u), z0)
    assert bool(info.converged.all())
    g0, g1 = u[0].chunk(2, -1)
    g1 = torch.sin(g1)  # the second filter's phase, then its sine
    w, b = net.cell.mix.weight, net.cell.mix.bias
    for p in range(9):
        a = torch.eye(6, dtype=torch.float64) - g1[p, :, None] * w
        want = torch.linalg.solve(a, g1[p] * (w @ g0[p] + b))
        torch.testing.assert_close(z[0, p], want, rtol=0, atol=1e-10)


def test_the_authors_onestep_backward_is_ift_with_one_fixed_point_step():
    """Their ``OnestepBackward`` sends (I + J^T) g through f(z*): grad=ift returning f(z*),
    its backward one fixed-point step from g (a budget of 2: deqlab's budget k returns the
    (k-1)-th iterate), gives the same gradients, for both filters."""
    for filter in ("fourier", "siren_like"):
        torch.manual_seed(0)
        net = ImplicitMFN(channels=1, width=5, input_scale=4.0, filter=filter).double()
        coords = coordinate_grid(2, 3).double()[None]
        grad = {"name": "ift", "solver": "fixed_point", "max_iter": 2, "tol": None}
        deq = DEQ(
            {"name": "fixed_point", "max_iter": 300, "tol": 1e-12, "stop_mode": "abs"},
            {**grad, "output": "fz"},
        )
        params = [net.cell.mix.weight, net.cell.mix.bias]
        u, z0 = net.inject(coords)
        z, _ = deq(Bound(net.cell, u), z0)
        got = torch.autograd.grad(z.pow(2).sum(), params)
        star = z.detach().requires_grad_()
        fz = net.cell(star, u.detach())
        g = 2 * fz.detach()
        (jtg,) = torch.autograd.grad(fz, star, g, retain_graph=True)
        want = torch.autograd.grad(fz, params, g + jtg)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("net", ["implicit_mfn", "mfn", "siren", "fourier_features"])
def test_each_network_fits_a_photograph_through_the_runner(net, tmp_path):
    """A few full-image steps on scikit-image's astronaut at 16 x 16: the loss falls, PSNR,
    SSIM and (for the DEQ) the budget curve are reported, the fitted image is drawn, and the
    equilibrium network's steps after the first start warm (deq/warm_share = 1)."""
    from deqlab.runner.main import run

    from .helpers.runs import compose_cfg, metrics

    overrides = [
        "experiment=deq_inr_image",
        f"net={net}",
        "task.datamodule.size=16",
        "task.datamodule.steps_per_epoch=6",
        "task.module.net.width=16",
        "task.module.net.input_scale=8",
        "optim.optimizer.lr=1e-2",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "~callbacks.progress",
    ]
    if net != "implicit_mfn":
        overrides += ["init=zeros", "norm=none"]
    if net == "fourier_features":  # no frequency scale: its Gaussian frequencies' sigma
        overrides.remove("task.module.net.input_scale=8")
        overrides += ["~task.module.net.input_scale", "task.module.net.features=8"]
    run(compose_cfg(overrides, tmp_path))
    rows = metrics(tmp_path)
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses[-1] < losses[0]
    tested = next(r for r in rows if r.get("test/psnr"))
    assert float(tested["test/psnr"]) > 8 and tested.get("test/ssim")
    assert list(tmp_path.glob("csv/version_0/figures/val_image_step*.png"))
    if net == "implicit_mfn":
        assert tested.get("test/psnr@1")
        shares = [float(r["deq/warm_share"]) for r in rows if r.get("deq/warm_share")]
        assert shares[0] == 0.0 and set(shares[1:]) == {1.0}


def test_warm_starts_where_a_sample_has_no_fixed_state_shape_are_refused(tmp_path):
    pytest.importorskip("torch_geometric")
    from deqlab.runner.main import run
    from deqlab.warm_start import WarmStartError

    from .helpers.runs import compose_cfg

    with pytest.raises(WarmStartError, match=r"task=tu pads each batch .* use init=zeros"):
        run(compose_cfg(["experiment=ignn_mutag", "init=cached", "trainer=cpu"], tmp_path))
