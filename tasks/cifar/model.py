"""The single-scale ResNet-cell DEQ of the implicit-layers tutorial (Kolter, Duvenaud &
Johnson, NeurIPS 2020 tutorial, chapter 4), split into inject / cell / head for DEQLitModule.

    u  = BN(conv3x3(x))                                   input injection, once per batch
    f(z; u) = GN(relu(z + GN(u + conv2(GN(relu(conv1(z)))))))
    y  = linear(flatten(avgpool8(BN(z*))))
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deqlab.dropout import VariationalDropout2d


class ResNetCell(nn.Module):
    """f(z; u) with a bottleneck of ``inner`` channels, GroupNorm, small-variance init."""

    def __init__(
        self,
        channels: int = 48,
        inner: int = 64,
        groups: int = 8,
        kernel: int = 3,
        dropout: float = 0.0,
        init_std: float = 0.01,
    ):
        super().__init__()
        pad = kernel // 2
        self.conv1 = nn.Conv2d(channels, inner, kernel, padding=pad, bias=False)
        self.conv2 = nn.Conv2d(inner, channels, kernel, padding=pad, bias=False)
        self.norm1 = nn.GroupNorm(groups, inner)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.norm3 = nn.GroupNorm(groups, channels)
        self.drop = VariationalDropout2d(dropout)
        # Small weights keep f contractive at initialization, so the first solves converge.
        nn.init.normal_(self.conv1.weight, 0, init_std)
        nn.init.normal_(self.conv2.weight, 0, init_std)

    def forward(self, z: Tensor, u: Tensor) -> Tensor:
        y = self.drop(self.norm1(torch.relu(self.conv1(z))))
        return self.norm3(torch.relu(z + self.norm2(u + self.conv2(y))))


class TutorialDEQ(nn.Module):
    """Conv stem + BatchNorm -> DEQ(ResNetCell) -> BatchNorm, 8x8 average pool, linear."""

    def __init__(
        self,
        channels: int = 48,
        inner: int = 64,
        groups: int = 8,
        kernel: int = 3,
        dropout: float = 0.0,
        num_classes: int = 10,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=True), nn.BatchNorm2d(channels)
        )
        self.cell = ResNetCell(channels, inner, groups, kernel, dropout)
        self.classifier = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.AvgPool2d(8, 8),
            nn.Flatten(),
            nn.Linear(channels * 4 * 4, num_classes),
        )

    def inject(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = self.stem(x)
        return u, torch.zeros_like(u)

    def head(self, z: Tensor) -> Tensor:
        return self.classifier(z)
