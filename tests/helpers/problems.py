"""Small DEQ problems with known answers, shared by the tests."""

from __future__ import annotations

import torch
from torch import nn

SOLVERS = ("fixed_point", "anderson", "broyden")
GRADS = ("ift", "phantom", "onestep")


def contraction(d: int, norm: float = 0.8, dtype=torch.float64) -> torch.Tensor:
    """A random d x d matrix with spectral norm ``norm``."""
    w = torch.randn(d, d, dtype=dtype)
    return norm * w / torch.linalg.matrix_norm(w, 2)


class LinearProblem:
    """f(z) = z W^T + x U^T, so z* = x U^T (I - W)^-T, with W, U, x leaves."""

    def __init__(self, batch: int = 3, d: int = 8, norm: float = 0.8):
        self.W = contraction(d, norm).requires_grad_()
        self.U = torch.randn(d, d, dtype=torch.float64, requires_grad=True)
        self.x = torch.randn(batch, d, dtype=torch.float64, requires_grad=True)

    def f(self, z):
        return z @ self.W.T + self.x @ self.U.T

    def z_star(self):
        eye = torch.eye(self.W.shape[0], dtype=torch.float64)
        return torch.linalg.solve(eye - self.W, (self.x @ self.U.T).T).T


class ConvCell(nn.Module):
    """The implicit-layers tutorial's ResNet cell, tiny: f(z, x) with GroupNorm."""

    def __init__(self, chan: int = 4, inner: int = 6, groups: int = 2):
        super().__init__()
        self.conv1 = nn.Conv2d(chan, inner, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(inner, chan, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, inner)
        self.norm2 = nn.GroupNorm(groups, chan)
        self.norm3 = nn.GroupNorm(groups, chan)
        for conv in (self.conv1, self.conv2):
            conv.weight.data.normal_(0, 0.05)

    def forward(self, z, x):
        y = self.norm1(torch.relu(self.conv1(z)))
        return self.norm3(torch.relu(z + self.norm2(x + self.conv2(y))))


class StaggeredCell(nn.Module):
    """f(z, x) = s_b tanh(W z + x), ||W|| = 0.9, with per-sample scales s_b from 0.3 to 0.97:
    the samples converge at different steps, so freezing one early or late shows."""

    def __init__(self, batch: int = 6, dim: int = 32):
        super().__init__()
        self.register_buffer("w", contraction(dim, 0.9))
        scale = torch.linspace(0.3, 0.97, batch, dtype=torch.float64).unsqueeze(1)
        self.register_buffer("scale", scale)

    def forward(self, z, x):
        return self.scale * torch.tanh(z @ self.w.T + x)


class RotatingCell(nn.Module):
    """f(z, x) = s_b Q z + x with Q orthogonal and per-sample scales s_b from 0.5 to 1.5: the
    samples with s_b > 1 make Anderson stall (and fixed-point iteration diverge) while Broyden
    converges; those below 1 converge under either."""

    def __init__(self, batch: int = 6, dim: int = 16):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64))
        self.register_buffer("q", q)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, batch, dtype=torch.float64)[:, None])

    def forward(self, z, x):
        return self.scale * (z @ self.q.T) + x
