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
    """

    def __init__(self, channels: int = 3, width: int = 32, depth: int = 5):
        super().__init__()
        if depth < 2:
            raise ValueError(f"a denoiser needs depth >= 2 convolutions, got {depth}")
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
        layers.append(nn.Conv2d(width, channels, 3, padding=1))
        self.noise = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return x - self.noise(x)


class GradientStep(nn.Module):
    """DE-Grad: f(x; y) = D(x - eta A^T (A x - y)), a gradient step on ||A x - y||^2 / 2 with
    step ``eta``, then the denoiser."""

    def __init__(self, physics: Any, denoiser: Denoiser, eta: float, learn_eta: bool):
        super().__init__()
        self.physics, self.denoiser = physics, denoiser
        self.eta = nn.Parameter(torch.tensor(float(eta)), requires_grad=learn_eta)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        residual = self.physics.A(z) - y
        return self.denoiser(z - self.eta * self.physics.A_adjoint(residual))


class ProxStep(nn.Module):
    """DE-Prox: f(x; y) = D(prox(x)), prox(x) = argmin_u ||A u - y||^2 / 2 + ||u - x||^2 /
    (2 eta), exact for the blur (in Fourier space, deepinv's ``prox_l2``)."""

    def __init__(self, physics: Any, denoiser: Denoiser, eta: float, learn_eta: bool):
        super().__init__()
        self.physics, self.denoiser = physics, denoiser
        self.eta = nn.Parameter(torch.tensor(float(eta)), requires_grad=learn_eta)

    def forward(self, z: Tensor, y: Tensor) -> Tensor:
        return self.denoiser(self.physics.prox_l2(z, y, self.eta))


STEPS = {"grad": GradientStep, "prox": ProxStep}


class Reconstructor(nn.Module):
    """A reconstruction network on the DEQ interface: ``inject`` checks the measurement y and
    starts from A^T y (with ``init=net``), ``cell`` is one DE-Grad or DE-Prox step, ``head``
    the image itself.

    Args:
        operator: ``make_physics``'s arguments (``task.operator``): the same A as the data's.
        image_size: (C, H, W) of the images.
        step: ``grad`` (DE-Grad) or ``prox`` (DE-Prox).
        eta: the step size's start.
        learn_eta: learn the step size with the network.
        width, depth: the denoiser's (:class:`Denoiser`).
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
    ):
        super().__init__()
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}: net.step is one of {sorted(STEPS)}")
        if not eta > 0:
            raise ValueError(f"net.eta={eta}: a step size is > 0")
        self.image_size = tuple(image_size)
        physics = make_physics(image_size=self.image_size, noise=False, **dict(operator))
        self.cell = STEPS[step](physics, Denoiser(image_size[0], width, depth), eta, learn_eta)

    def inject(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_measurement(self.cell.physics, y, self.image_size)
        return y, self.cell.physics.A_adjoint(y)

    def head(self, z: Tensor) -> Tensor:
        return z
