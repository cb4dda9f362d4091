"""The cells every benchmark runs: the tutorial's ResNet cell and a cheap tanh cell."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deqlab.tasks.cifar.model import ResNetCell, TutorialDEQ


class TanhCell(nn.Module):
    """f(z; x) = tanh(W z + x): so cheap that solver overhead dominates."""

    def __init__(self, width: int = 512):
        super().__init__()
        self.lin = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.lin.weight.mul_(0.9 / torch.linalg.matrix_norm(self.lin.weight, 2))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(z) + x)


def resnet_problem(device: torch.device, batch: int = 32) -> tuple[nn.Module, Tensor]:
    """The tutorial's cell (48 channels, 64 inner, 32x32) and an input injection."""
    cell = ResNetCell(48, 64, groups=8).to(device)
    x = torch.randn(batch, 48, 32, 32, device=device)
    return cell, x


def tanh_problem(
    device: torch.device, batch: int = 64, width: int = 512
) -> tuple[nn.Module, Tensor]:
    return TanhCell(width).to(device), torch.randn(batch, width, device=device)


def tutorial_model(device: torch.device) -> TutorialDEQ:
    return TutorialDEQ(48, 64, groups=8).to(device)
