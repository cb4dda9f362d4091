"""Inverse problems: deepinv's operators as the cells use them (A^T the adjoint of A), the
measurements a function of their seed, DE-Grad and DE-Prox at their closed-form fixed point
with an identity denoiser, the implicit gradient against autograd through the iteration, bad
operators and measurements refused by name, and both experiments through the runner."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("deepinv")

from deqlab import DEQ, Bound
from deqlab.tasks.inverse.data import MeasuredImages
from deqlab.tasks.inverse.model import Reconstructor
from deqlab.tasks.inverse.module import psnr
from deqlab.tasks.inverse.operators import OperatorError, check_measurement, make_physics

SMALL = (1, 8, 8)


def _matrix(physics, size):
    """A as a dense matrix, column by column (float64)."""
    n = size[0] * size[1] * size[2]
    basis = torch.eye(n, dtype=torch.float64).view(n, *size)
    return physics.A(basis).reshape(n, -1).t()


@pytest.mark.parametrize(
    ("kind", "padding"), [("blur", "circular"), ("blur", "constant"), ("downsampling", "circular")]
)
def test_the_adjoint_is_the_transpose_of_the_operator(kind, padding):
    physics = make_physics(
        kind, SMALL, blur_sigma=0.5, kernel_size=3, padding=padding, factor=2, noise=False
    ).double()
    a = _matrix(physics, SMALL)
    y = torch.randn(1, *physics.A(torch.zeros(1, *SMALL, dtype=torch.float64)).shape[1:])
    adjoint = physics.A_adjoint(y.double()).flatten()
    torch.testing.assert_close(adjoint, a.t() @ y.double().flatten(), rtol=1e-10, atol=1e-12)


def test_measurements_are_a_function_of_seed_split_and_index():
    images = [(torch.rand(3, 32, 32), 0) for _ in range(3)]
    operator = {"kind": "blur", "blur_sigma": 1.0, "noise_sigma": 0.05}
    one, two = MeasuredImages(images, operator, 0, 1), MeasuredImages(images, operator, 0, 1)
    assert torch.equal(one[1][0], two[1][0])  # the same measurement, read twice
    assert not torch.equal(one[1][0], MeasuredImages(images, operator, 0, 2)[1][0])
    y, target = one[0]
    clean = make_physics("blur", (3, 32, 32), noise=False).A(images[0][0][None])[0]
    noise = y - clean
    assert 0.04 < float(noise.std()) < 0.06 and torch.equal(target.baseline, y)
    assert psnr(target.baseline[None], target.clean[None]) < 40


@pytest.mark.parametrize("step", ["grad", "prox"])
def test_with_an_identity_denoiser_the_equilibrium_is_least_squares(step):
    """D = identity: DE-Grad's fixed point solves A^T A x = A^T y, and so does DE-Prox's
    (x = prox(x) is the same normal equation); checked against a dense least-squares solve."""
    torch.manual_seed(0)
    operator = {"kind": "blur", "blur_sigma": 0.5}
    net = Reconstructor(operator, SMALL, step=step, eta=1.0, depth=2).double()
    with torch.no_grad():
        net.cell.denoiser.noise[-1].weight.zero_()  # N = 0: D(x) = x
        net.cell.denoiser.noise[-1].bias.zero_()
    physics = make_physics("blur", SMALL, blur_sigma=0.5, noise=False).double()
    x = torch.rand(2, *SMALL, dtype=torch.float64)
    y = physics.A(x) + 0.01 * torch.randn_like(x)
    a = _matrix(physics, SMALL)
    want = torch.linalg.solve(a.t() @ a, a.t() @ y.flatten(1).t()).t().reshape_as(x)
    deq = DEQ({"name": "anderson", "max_iter": 500, "tol": 1e-11, "stop_mode": "abs"})
    u, z0 = net.inject(y)
    z, info = deq(Bound(net.cell, u), z0)
    assert bool(info.converged.all())
    torch.testing.assert_close(z, want, rtol=0, atol=1e-7)


def test_the_implicit_gradient_is_autograds_through_the_iteration():
    torch.manual_seed(0)
    net = Reconstructor({"kind": "blur", "blur_sigma": 0.5}, SMALL, eta=0.5, width=4, depth=3)
    net = net.double()
    with torch.no_grad():
        for p in net.cell.denoiser.parameters():
            p.mul_(0.3)  # a contraction: the unrolled iteration converges
    x = torch.rand(2, *SMALL, dtype=torch.float64)
    y = make_physics("blur", SMALL, blur_sigma=0.5, noise=False).A(x)
    deq = DEQ(
        {"name": "anderson", "max_iter": 200, "tol": 1e-12, "stop_mode": "abs"},
        {"name": "ift", "solver": "anderson", "max_iter": 200, "tol": 1e-13},
    )
    params = [p for p in net.parameters() if p.requires_grad]
    u, z0 = net.inject(y)
    z, _ = deq(Bound(net.cell, u), z0)
    got = torch.autograd.grad((z - x).pow(2).sum(), params)
    u, z = net.inject(y)
    for _ in range(300):
        z = net.cell(z, u)
    want = torch.autograd.grad((z - x).pow(2).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "inpainting"}, "unknown operator 'inpainting'"),
        ({"kind": "blur", "noise_sigma": -0.1}, r"noise_sigma=-0\.1: a noise level"),
        ({"kind": "blur", "blur_sigma": 5.0}, r"blur kernel is \d+x\d+ .* larger than the 16x16"),
        ({"kind": "downsampling", "factor": 3}, "factor=3 must divide the image size 16x16"),
        ({"kind": "blur", "kernel_size": 4}, "kernel_size=4 must be odd"),
        ({"kind": "blur", "padding": "mirror"}, "unknown padding 'mirror'"),
    ],
)
def test_an_operator_that_cannot_work_is_refused_by_name(kwargs, message):
    with pytest.raises(OperatorError, match=message):
        make_physics(image_size=(3, 16, 16), **kwargs)


def test_the_authors_blur_is_a_zero_padded_5x5_gaussian():
    """kernel_size=5, padding=constant: Gilton et al.'s GaussianBlur (kernel exp(-d^2 /
    2 sigma^2) on a 5 x 5 grid, normalized to sum 1, conv2d with zero padding 2)."""
    physics = make_physics("blur", (3, 16, 16), blur_sigma=5.0, kernel_size=5, padding="constant")
    grid = torch.arange(5.0) - 2
    kernel = torch.exp(-((grid / 5.0) ** 2) / 2)
    kernel = kernel[:, None] * kernel[None]
    kernel = (kernel / kernel.sum()).expand(3, 1, 5, 5)
    x = torch.rand(2, 3, 16, 16)
    want = torch.nn.functional.conv2d(x, kernel, groups=3, padding=2)
    torch.testing.assert_close(physics.A(x), want, rtol=0, atol=1e-6)


def test_the_ridge_start_and_the_dncnn_layout():
    """start_ridge=lambda starts the solve from (A^T A + lambda I)^-1 A^T y (the authors' CG
    start), A^T y without it; batch_norm=True is DnCNN's layout: BN after each hidden
    convolution and no biases; clamp=True keeps every step's image in [0, 1]."""
    operator = {"kind": "blur", "blur_sigma": 0.5, "kernel_size": 3, "padding": "constant"}
    net = Reconstructor(operator, SMALL, start_ridge=0.1, batch_norm=True, depth=4, clamp=True)
    net = net.double()
    physics = make_physics(image_size=SMALL, noise=False, **operator).double()
    a = _matrix(physics, SMALL)
    y = torch.rand(2, *SMALL, dtype=torch.float64)
    u, z0 = net.inject(y)
    want = torch.linalg.solve(a.t() @ a + 0.1 * torch.eye(a.shape[1]), a.t() @ y.flatten(1).t())
    torch.testing.assert_close(
        z0, want.t().reshape_as(z0), rtol=0, atol=5e-5
    )  # deepinv's CG, to 1e-6
    plain = Reconstructor(operator, SMALL).double()
    torch.testing.assert_close(plain.inject(y)[1], physics.A_adjoint(y))
    layers = list(net.cell.denoiser.noise)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in layers) == 2
    assert all(m.bias is None for m in layers if isinstance(m, torch.nn.Conv2d))
    image = net.cell(torch.randn(2, *SMALL, dtype=torch.float64) * 5, u)
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    with pytest.raises(ValueError, match=r"net\.start_ridge=0"):
        Reconstructor(operator, SMALL, start_ridge=0)


def test_a_measurement_the_operator_cannot_give_is_refused_by_name():
    physics = make_physics("downsampling", (3, 32, 32), factor=2, noise=False)
    with pytest.raises(OperatorError, match=r"measurements of shape \(3, 32, 32\).*\(3, 16, 16\)"):
        check_measurement(physics, torch.zeros(2, 3, 32, 32), (3, 32, 32))
    y = torch.zeros(2, 3, 16, 16)
    y[1, 0, 0, 0] = float("nan")
    with pytest.raises(OperatorError, match="1 measurement"):
        check_measurement(physics, y, (3, 32, 32))


@pytest.mark.slow  # two runs, then the TV baseline's lambda search on 256 x 256 photographs
def test_deq_and_unrolled_deblurring_train_through_the_runner(tmp_path):
    """deq_deblur_cifar solves in training (deq/fwd_nfe); unrolled_deblur_cifar trains its
    10 iterations by backprop (no solve), and both report PSNR, SSIM, the input's PSNR and
    the budget curve at test."""
    from deqlab.runner.main import run

    from .helpers.runs import compose_cfg, metrics, write_cifar_folder

    data = write_cifar_folder(tmp_path / "data", train_per_class=4, test_per_class=1)
    quick = [f"paths.data_dir={data}", "trainer.max_epochs=1", "trainer.num_sanity_val_steps=0"]
    quick += ["task.datamodule.subset=null", "task.datamodule.val_size=8", "logger=csv"]
    quick += ["trainer.log_every_n_steps=1"]
    quick += ["task.datamodule.batch_size=8", "task.module.net.width=4", "~callbacks.progress"]
    experiments = ("deq_deblur_cifar", "unrolled_deblur_cifar")
    scores = {}
    for experiment, solves in zip(experiments, (True, False)):
        folder = tmp_path / experiment
        run(compose_cfg([f"experiment={experiment}", "solver.max_iter=5", *quick], folder))
        rows = metrics(folder)
        assert any(r.get("deq/fwd_nfe") for r in rows) == solves
        tested = next(r for r in rows if r.get("test/psnr"))
        scores[experiment] = float(tested["test/psnr"])
        for key in ("test/ssim", "test/psnr_input", "test/psnr@1"):
            assert tested.get(key), key
    # the side-by-side comparison: both models, the measurement and Tikhonov on one table
    from deqlab.tasks.inverse.compare import compare

    deq, unrolled = (tmp_path / e / "checkpoints" / "last.ckpt" for e in experiments)
    report = compare(deq, unrolled, tmp_path / "compare", photos=True).read_text()
    for method in (
        "measurement",
        "Tikhonov (gamma=",
        "total variation (lambda=",
        "unrolled",
        "DEQ",
    ):
        assert f"| {method}" in report
    deq_psnr = float(report.split("| DEQ | ")[1].split(" |")[0])
    assert deq_psnr == pytest.approx(scores["deq_deblur_cifar"], abs=0.01)
    assert (tmp_path / "compare" / "grid.png").stat().st_size > 5000
    photos = (tmp_path / "compare" / "photos.md").read_text()  # scikit-image's, 256 x 256
    assert "astronaut" in photos and "| DEQ |" in photos
    # deqlab analyze: one row per image (the targets are a pair of tensors, not a batch)
    import csv

    from deqlab.runner.analyze import analyze

    for limit, rows in ((None, 10), (6, 6)):
        out = tmp_path / f"analysis_{limit}"
        analyze(deq, out=out, limit=limit, sradius_iters=0)
        with open(out / "samples.csv") as fh:
            assert len(list(csv.DictReader(fh))) == rows


def test_an_unrolled_network_trains_its_k_iterations_and_evaluates_through_the_solver():
    """fit.unrolled = 3: in training the output is the cell applied 3 times from A^T y, with
    the gradient through all three; in evaluation the solver runs (4 fixed-point
    evaluations returning the last iterate x_3: the same network) and reports its
    statistics."""
    from deqlab.tasks.inverse.module import ReconstructionModule

    torch.manual_seed(0)
    net = Reconstructor({"kind": "blur", "blur_sigma": 0.5}, SMALL, width=4, depth=2).double()
    module = ReconstructionModule(
        net,
        solver={"name": "fixed_point", "max_iter": 4, "tol": None, "return_final": True},
        init={"name": "net"},
        fit={"unrolled": 3},
    )
    y = torch.rand(2, *SMALL, dtype=torch.float64)
    u, z = net.inject(y)
    for _ in range(3):
        z = net.cell(z, u)
    module.train()
    (trained,), info = module(y)
    assert info is None
    torch.testing.assert_close(trained, z, rtol=0, atol=0)
    (eta_grad,) = torch.autograd.grad(trained.sum(), [net.cell.eta])
    (want,) = torch.autograd.grad(z.sum(), [net.cell.eta])
    torch.testing.assert_close(eta_grad, want)
    module.eval()
    with torch.no_grad():
        (evaluated,), info = module(y)
    assert info is not None and info.nfe == 4  # the 4th evaluation measures x_3
    torch.testing.assert_close(evaluated, z.detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"fit\.unrolled=-1"):
        ReconstructionModule(net, fit={"unrolled": -1})
