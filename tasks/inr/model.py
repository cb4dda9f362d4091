"""Coordinate networks for images, in the form of the (Implicit)^2 authors' code
(github.com/locuslab/ImpSq, ``modules/structs.py`` and ``modules/models.py``).

A multiplicative filter network (MFN; Fathony et al., ICLR 2021) with Fourier filters
g_l(x) = sin(Omega_l x + phi_l) computes z_0 = g_0(x), z_l = g_l(x) * (W_l z_{l-1} + b_l).
The equilibrium version (Huang, Bai and Kolter, NeurIPS 2021) makes one such layer a fixed
point: z* = g_1(x) * (W (z* + g_0(x)) + b). With |g_1| <= 1 and ||W|| < 1 (spectral
normalization to 0.97, theirs) the map is a contraction, so z* exists and is unique. The
filters depend only on the coordinates: ``inject`` computes them once per solve.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FourierFilter(nn.Module):
    """g(x) = sin(Omega x + phi): Omega of ``nn.Linear``'s initialization times ``scale``,
    phi uniform in [-pi, pi] (their ``FourierFilter``)."""

    def __init__(self, in_features: int, width: int, scale: float):
        super().__init__()
        self.map = nn.Linear(in_features, width)
        with torch.no_grad():
            self.map.weight.mul_(scale)
            self.map.bias.uniform_(-math.pi, math.pi)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.map(x))


def _mixing(width: int) -> nn.Linear:
    """W_l: uniform in +-sqrt(1 / width), their initialization."""
    layer = nn.Linear(width, width)
    nn.init.uniform_(layer.weight, -math.sqrt(1 / width), math.sqrt(1 / width))
    return layer


class MFNCell(nn.Module):
    """f(z; u) = g_1 * (W (z + g_0) + b), u = [g_0, g_1] (the filters at the coordinates)."""

    def __init__(self, width: int):
        super().__init__()
        self.mix = _mixing(width)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        g0, g1 = u.chunk(2, dim=-1)
        return g1 * self.mix(z + g0)


class ImplicitMFN(nn.Module):
    """The equilibrium MFN on the DEQ interface: (B, pixels, 2) coordinates in, (B, pixels,
    C) values out, the state (B, pixels, width).

    Args:
        channels: the image's channels.
        width: the state's features per pixel (theirs: 256 or 512).
        input_scale: the filters' frequency scale (theirs: 256 for 512 x 512 images), divided
            by sqrt(2) as their ``get_filter`` divides by sqrt(layers + 1).
    """

    def __init__(self, channels: int = 3, width: int = 256, input_scale: float = 256.0):
        super().__init__()
        scale = input_scale / math.sqrt(2)
        self.filters = nn.ModuleList(FourierFilter(2, width, scale) for _ in range(2))
        self.cell = MFNCell(width)
        self.out = nn.Linear(width, channels)
        self.width = width

    def inject(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.cat([g(coords) for g in self.filters], -1)
        return u, coords.new_zeros(*coords.shape[:-1], self.width)

    def head(self, z: Tensor) -> Tensor:
        return self.out(z)


class MFN(nn.Module):
    """The explicit MFN of ``layers`` filtered layers, their baseline (``one_pass``: the same
    layer applied once from zero is ``layers=1``)."""

    def __init__(
        self, channels: int = 3, width: int = 256, layers: int = 1, input_scale: float = 256.0
    ):
        super().__init__()
        scale = input_scale / math.sqrt(layers + 1)
        self.filters = nn.ModuleList(FourierFilter(2, width, scale) for _ in range(layers + 1))
        self.mixes = nn.ModuleList(_mixing(width) for _ in range(layers))
        self.out = nn.Linear(width, channels)

    def forward(self, coords: Tensor) -> Tensor:
        z = self.filters[0](coords)
        for g, mix in zip(self.filters[1:], self.mixes):
            z = g(coords) * mix(z)
        return self.out(z)


class Siren(nn.Module):
    """SIREN (Sitzmann et al., NeurIPS 2020) as their ``SIREN``: sin(scale W_1 x), then
    ``layers - 1`` layers sin(omega W h), a linear output; W_1 uniform in +-1/2, the others in
    +-sqrt(6 / width) / omega."""

    def __init__(
        self,
        channels: int = 3,
        width: int = 256,
        layers: int = 4,
        input_scale: float = 256.0,
        omega: float = 30.0,
    ):
        super().__init__()
        self.maps = nn.ModuleList(
            [nn.Linear(2, width), *(nn.Linear(width, width) for _ in range(layers - 1))]
        )
        self.out = nn.Linear(width, channels)
        self.scale, self.omega = input_scale, omega
        nn.init.uniform_(self.maps[0].weight, -1 / 2, 1 / 2)
        bound = math.sqrt(6 / width) / omega
        for layer in (*self.maps[1:], self.out):
            nn.init.uniform_(layer.weight, -bound, bound)

    def forward(self, coords: Tensor) -> Tensor:
        h = torch.sin(self.scale * self.maps[0](coords))
        for layer in self.maps[1:]:
            h = torch.sin(self.omega * layer(h))
        return self.out(h)
