"""Coordinate networks for images, in the form of the (Implicit)^2 authors' code
(github.com/locuslab/ImpSq, ``modules/structs.py`` and ``modules/models.py``).

A multiplicative filter network (MFN; Fathony et al., ICLR 2021) with Fourier filters
g_l(x) = sin(Omega_l x + phi_l) computes z_0 = g_0(x), z_l = g_l(x) * (W_l z_{l-1} + b_l).
The equilibrium version (Huang, Bai and Kolter, NeurIPS 2021) makes one such layer a fixed
point, with one of their two filters:

- ``fourier``: z* = g_1(x) * (W (z* + g_0(x)) + b);
- ``siren_like``: z* = sin(W (z* + g_0(x)) + b + Omega_1 x + phi_1), a sine-activated layer
  with the coordinates injected.

With |g_1| <= 1 (or |sin'| <= 1) and ||W|| < 1 (spectral normalization to 0.97, theirs) the
map is a contraction, so z* exists and is unique. The filters depend only on the coordinates:
``inject`` computes them once per solve.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn


class FourierFilter(nn.Module):
    """g(x) = sin(Omega x + phi): Omega of ``nn.Linear``'s initialization times ``scale``,
    phi uniform in [-pi, pi] (their ``FourierFilter``); ``phase(x)`` = Omega x + phi."""

    def __init__(self, in_features: int, width: int, scale: float):
        super().__init__()
        self.map = nn.Linear(in_features, width)
        with torch.no_grad():
            self.map.weight.mul_(scale)
            self.map.bias.uniform_(-math.pi, math.pi)

    def phase(self, x: Tensor) -> Tensor:
        return self.map(x)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.map(x))


def _mixing(width: int) -> nn.Linear:
    """W_l: uniform in +-sqrt(1 / width), their initialization."""
    layer = nn.Linear(width, width)
    nn.init.uniform_(layer.weight, -math.sqrt(1 / width), math.sqrt(1 / width))
    return layer


FILTERS = ("fourier", "siren_like")


class MFNCell(nn.Module):
    """u = [g_0, p_1], p_1 = Omega_1 x + phi_1 the second filter's phase at the coordinates:
    ``fourier`` f(z; u) = sin(p_1) * (W (z + g_0) + b); ``siren_like`` sin(W (z + g_0) + b
    + p_1)."""

    def __init__(self, width: int, filter: str = "fourier"):
        super().__init__()
        if filter not in FILTERS:
            raise ValueError(f"unknown filter {filter!r}: net.filter is one of {FILTERS}")
        self.mix, self.filter = _mixing(width), filter

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        g0, p1 = u.chunk(2, dim=-1)
        if self.filter == "fourier":
            return torch.sin(p1) * self.mix(z + g0)
        return torch.sin(self.mix(z + g0) + p1)


class ImplicitMFN(nn.Module):
    """The equilibrium MFN on the DEQ interface: (B, pixels, 2) coordinates in, (B, pixels,
    C) values out, the state (B, pixels, width).

    Args:
        channels: the image's channels.
        width: the state's features per pixel (theirs: 256 or 512).
        input_scale: the filters' frequency scale (theirs: 256 for 512 x 512 images), divided
            by sqrt(2) as their ``get_filter`` divides by sqrt(layers + 1).
        filter: ``fourier`` (multiplicative) or ``siren_like`` (sine-activated).
    """

    def __init__(
        self,
        channels: int = 3,
        width: int = 256,
        input_scale: float = 256.0,
        filter: str = "fourier",
    ):
        super().__init__()
        scale = input_scale / math.sqrt(2)
        self.filters = nn.ModuleList(FourierFilter(2, width, scale) for _ in range(2))
        self.cell = MFNCell(width, filter)
        self.out = nn.Linear(width, channels)
        self.width = width

    def inject(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        u = torch.cat([self.filters[0](coords), self.filters[1].phase(coords)], -1)
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


class FourierFeatures(nn.Module):
    """A Fourier-feature MLP (Tancik et al., NeurIPS 2020) as their ``FFN``: features
    [sin(2 pi B x), cos(2 pi B x)] with B fixed, N(0, sigma^2), then ``layers`` ReLU layers
    and a sine output.

    Args:
        channels: the image's channels.
        width: hidden features.
        layers: hidden ReLU layers.
        features: frequencies in B (2 x features inputs to the first layer).
        sigma: B's standard deviation (theirs: 10).
    """

    def __init__(
        self,
        channels: int = 3,
        width: int = 256,
        layers: int = 4,
        features: int = 256,
        sigma: float = 10.0,
    ):
        super().__init__()
        self.register_buffer("frequencies", torch.randn(2, features) * sigma)
        sizes = [2 * features, *([width] * layers)]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(sizes))
        self.out = nn.Linear(sizes[-1], channels)

    def forward(self, coords: Tensor) -> Tensor:
        angle = 2 * math.pi * coords @ self.frequencies
        h = torch.cat([torch.sin(angle), torch.cos(angle)], -1)
        for layer in self.hidden:
            h = torch.relu(layer(h))
        return torch.sin(self.out(h))
