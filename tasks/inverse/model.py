"""Deep equilibrium reconstruction (Gilton, Ongie and Willett, IEEE TCI 2021): the state is
the image, f one step of an optimization algorithm on the data fidelity followed by a learned
denoiser, z* the reconstruction. The same cell iterated a fixed number of times, trained by
backprop, is the unrolled network it is compared with (``fit.unrolled``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .operators import check_measurement, make_physics


class Denoiser(nn.Module):
    """A residual CNN denoiser in the manner of DnCNN (Zhang et al., 2017), smaller:
    D(x) = x - N(x), N a stack of 3x3 convolutions with ReLUs that estimates the noise.

    Args:
        channels: image channels.
        width: feature channels of the hidden convolutions.
        depth: convolutions in N (>= 2).
        batch_norm: DnCNN's own layout: batch normalization after each hidden convolution,
            and no biases (Gilton et al.'s code uses it, 17 convolutions of 64 channels).
    """

    def __init__(
        self, channels: int = 3, width: int = 32, depth: int = 5, batch_norm: bool = False
    ):
        super().__init__()
        if depth < 2:
            raise ValueError(f"a denoiser needs depth >= 2 convolutions, got {depth}")
        bias = not batch_norm
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1, bias=bias), nn.ReLU()]
        for _ in range(depth - 2):
            layers.append(nn.Conv2d(width, width, 3, padding=1, bias=bias))
            layers += [nn.BatchNorm2d(width), nn.ReLU()] if batch_norm else [nn.ReLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1, bias=bias))
        self.noise = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x - self.noise(x)


class Step(nn.Module):
    """What DE-Grad and DE-Prox share: the operator (``physics``), the denoiser, the step
    size ``eta`` (learned or fixed) and, with ``clamp``, images clipped to [0, 1] after the
    denoiser, as Gilton et al.'s cell clips to its data's range."""

    def __init__(
        self, physics: Any, denoiser: Denoiser, eta: float, learn_eta: bool, clamp: bool = False
    ):
        super().__init__()
        self.physics, self.denoiser, self.clamp = physics, denoiser, clamp
        self.eta = nn.Parameter(torch.tensor(float(eta)), requires_grad=learn_eta)

    def denoise(self, x: Tensor) -> Tensor:
        image = self.denoiser(x)
        return image.clamp(0, 1) if self.clamp else image


class GradientStep(Step):
    """DE-Grad: f(x; y) = D(x - eta A^T (A x - y)), a gradient step on ||A x - y||^2 / 2 with
    step ``eta``, then the denoiser."""

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        residual = self.physics.A(z) - y
        return self.denoise(z - self.eta * self.physics.A_adjoint(residual))


class ProxStep(Step):
    """DE-Prox: f(x; y) = D(prox(x)), prox(x) = argmin_u ||A u - y||^2 / 2 + ||u - x||^2 /
    (2 eta), exact for the blur (in Fourier space, deepinv's ``prox_l2``)."""

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return self.denoise(self.physics.prox_l2(z, y, self.eta))


STEPS = {"grad": GradientStep, "prox": ProxStep}


class Reconstructor(nn.Module):
    """A reconstruction network on the DEQ interface: ``inject`` checks the measurement y and
    gives the solve's start (with ``init=net``), ``cell`` is one DE-Grad or DE-Prox step,
    ``head`` the image itself.

    Args:
        operator: ``make_physics``'s arguments (``task.operator``): the same A as the data's.
        image_size: (C, H, W) of the images.
        step: ``grad`` (DE-Grad) or ``prox`` (DE-Prox).
        eta: the step size's start.
        learn_eta: learn the step size with the network.
        width, depth, batch_norm: the denoiser's (:class:`Denoiser`).
        start_ridge: None: start from A^T y. A number lambda: from the ridge solution
            (A^T A + lambda I)^-1 A^T y, as Gilton et al.'s code starts (conjugate gradient,
            lambda its noise level); deepinv's ``prox_l2`` from zero with gamma = 1 / lambda.
        clamp: clip each step's image to [0, 1], as their cell clips to its data's range.
    """

    def __init__(
        self,
        operator: dict[str, Any],
        image_size: tuple[int, int, int] = (3, 32, 32),
        step: str = "grad",
        eta: float = 1.0,
        learn_eta: bool = True,
        width: int = 32,
        depth: int = 5,
        batch_norm: bool = False,
        start_ridge: float | None = None,
        clamp: bool = False,
    ):
        super().__init__()
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}: net.step is one of {sorted(STEPS)}")
        if not eta > 0:
            raise ValueError(f"net.eta={eta}: a step size is > 0")
        if start_ridge is not None and not start_ridge > 0:
            raise ValueError(f"net.start_ridge={start_ridge}: a ridge is > 0 (null: A^T y)")
        self.image_size, self.start_ridge = tuple(image_size), start_ridge
        physics = make_physics(image_size=self.image_size, noise=False, **dict(operator))
        denoiser = Denoiser(image_size[0], width, depth, batch_norm)
        self.cell = STEPS[step](physics, denoiser, eta, learn_eta, clamp)

    @property
    def physics(self) -> Any:
        return self.cell.physics

    def inject(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_measurement(self.physics, y, self.image_size)
        adjoint = self.physics.A_adjoint(y)
        if self.start_ridge is None:
            return y, adjoint
        with torch.no_grad():
            # exact in Fourier space for BlurFFT, else deepinv's conjugate gradient
            start = self.physics.prox_l2(torch.zeros_like(adjoint), y, 1.0 / self.start_ridge)
        return y, start

    def head(self, z: Tensor) -> Tensor:
        return z
