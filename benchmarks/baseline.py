"""The implicit-layers tutorial's plain-PyTorch DEQ (chapter 4), as a reference to beat.

Its Anderson solver (Gram matrix recomputed every step, one host sync per step for the
residual) and its hook-based backward (an extra f evaluation to re-engage the tape and a
second one to set up the vector-Jacobian products), written out here from the tutorial's
description so the benchmark measures that algorithm, not ours.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn


def tutorial_anderson(
    f: Callable[[Tensor], Tensor],
    x0: Tensor,
    m: int = 5,
    lam: float = 1e-4,
    max_iter: int = 25,
    tol: float = 1e-2,
    beta: float = 1.0,
) -> tuple[Tensor, list[float]]:
    bsz = x0.shape[0]
    d = x0[0].numel()
    X = torch.zeros(bsz, m, d, dtype=x0.dtype, device=x0.device)
    F = torch.zeros(bsz, m, d, dtype=x0.dtype, device=x0.device)
    X[:, 0], F[:, 0] = x0.reshape(bsz, -1), f(x0).reshape(bsz, -1)
    X[:, 1], F[:, 1] = F[:, 0], f(F[:, 0].view_as(x0)).reshape(bsz, -1)
    H = torch.zeros(bsz, m + 1, m + 1, dtype=x0.dtype, device=x0.device)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    y = torch.zeros(bsz, m + 1, 1, dtype=x0.dtype, device=x0.device)
    y[:, 0] = 1
    res: list[float] = []
    k = 1
    for k in range(2, max_iter):
        n = min(k, m)
        G = F[:, :n] - X[:, :n]
        H[:, 1 : n + 1, 1 : n + 1] = (
            torch.bmm(G, G.transpose(1, 2))
            + lam * torch.eye(n, dtype=x0.dtype, device=x0.device)[None]
        )
        alpha = torch.linalg.solve(H[:, : n + 1, : n + 1], y[:, : n + 1])[:, 1 : n + 1, 0]
        X[:, k % m] = (
            beta * (alpha[:, None] @ F[:, :n])[:, 0]
            + (1 - beta) * (alpha[:, None] @ X[:, :n])[:, 0]
        )
        F[:, k % m] = f(X[:, k % m].view_as(x0)).reshape(bsz, -1)
        res.append((F[:, k % m] - X[:, k % m]).norm().item() / (1e-5 + F[:, k % m].norm().item()))
        if res[-1] < tol:
            break
    return X[:, k % m].view_as(x0), res


class TutorialDEQFixedPoint(nn.Module):
    """The tutorial's DEQ layer: solve without a tape, re-engage it with one f call, and
    solve the backward fixed point in a gradient hook."""

    def __init__(self, f: nn.Module, **kwargs):
        super().__init__()
        self.f, self.kwargs = f, kwargs

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            z, self.forward_res = tutorial_anderson(
                lambda z: self.f(z, x), torch.zeros_like(x), **self.kwargs
            )
        z = self.f(z, x)
        z0 = z.clone().detach().requires_grad_()
        f0 = self.f(z0, x)

        def backward_hook(grad: Tensor) -> Tensor:
            g, self.backward_res = tutorial_anderson(
                lambda y: torch.autograd.grad(f0, z0, y, retain_graph=True)[0] + grad,
                grad,
                **self.kwargs,
            )
            return g

        if z.requires_grad:
            z.register_hook(backward_hook)
        return z


def tutorial_sequential(f: nn.Module, chan: int) -> nn.Sequential:
    """The chapter's CIFAR-10 model around its DEQ layer and cell ``f`` (``chan`` channels, 32 x
    32 images): conv 3 -> chan with bias, BatchNorm, DEQFixedPoint(f, anderson, tol=1e-2,
    max_iter=25, m=5), BatchNorm, 8 x 8 average pooling, a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, chan, kernel_size=3, bias=True, padding=1),
        nn.BatchNorm2d(chan),
        TutorialDEQFixedPoint(f, tol=1e-2, max_iter=25, m=5),
        nn.BatchNorm2d(chan),
        nn.AvgPool2d(8, 8),
        nn.Flatten(),
        nn.Linear(chan * 4 * 4, 10),
    )
