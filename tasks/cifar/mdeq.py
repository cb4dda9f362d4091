"""Multiscale DEQ (MDEQ) for image classification (Bai, Koltun & Kolter, "Multiscale Deep
Equilibrium Models", NeurIPS 2020), split into inject / cell / head for DEQLitModule.

The equilibrium state is a tuple of per-resolution feature maps z = (z_1, ..., z_n), branch i
at 1/2^(i-1) of the input resolution with ``channels[i]`` channels, solved jointly:

    x_i = block_i(z_i, u if i = 1 else 0)             residual block per branch, u injected at
                                                      the highest resolution only
    f(z)_i = post_i(sum_j fuse_ij(x_j))               multi-resolution fusion: strided 3x3 convs
                                                      down, 1x1 conv + nearest upsample up

The engine handles the tuple state directly (no concatenation by the model); weight
normalization goes through ``deqlab.apply_norm`` (the ``norm`` config group), and the block
dropout is variational: one mask per batch, held through the solve.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from deqlab.dropout import VariationalDropout2d


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, bias=False)


class BranchBlock(nn.Module):
    """MDEQ's residual block: conv3x3 to ``expansion`` x channels, GN, ReLU, conv3x3 back,
    dropout, + injection, GN, + residual, ReLU, GN."""

    def __init__(self, channels: int, expansion: int, groups: int, dropout: float):
        super().__init__()
        inner = channels * expansion
        self.conv1 = conv3x3(channels, inner)
        self.gn1 = nn.GroupNorm(groups, inner)
        self.conv2 = conv3x3(inner, channels)
        self.gn2 = nn.GroupNorm(groups, channels)
        self.gn3 = nn.GroupNorm(groups, channels)
        self.drop = VariationalDropout2d(dropout)

    def forward(self, z: Tensor, injection: Tensor | None = None) -> Tensor:
        out = self.drop(self.conv2(torch.relu(self.gn1(self.conv1(z)))))
        if injection is not None:
            out = out + injection
        return self.gn3(torch.relu(self.gn2(out) + z))


def _down(cin: int, cout: int, steps: int, groups: int) -> nn.Sequential:
    """``steps`` strided 3x3 convs (resolution / 2^steps); channels change at the last one."""
    layers: list[nn.Module] = []
    for k in range(steps):
        last = k == steps - 1
        layers += [
            conv3x3(cin, cout if last else cin, stride=2),
            nn.GroupNorm(groups, cout if last else cin),
        ]
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _up(cin: int, cout: int, steps: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        conv1x1(cin, cout),
        nn.GroupNorm(groups, cout),
        nn.Upsample(scale_factor=2**steps, mode="nearest"),
    )


class MDEQCell(nn.Module):
    """f(z; u) on a tuple of per-resolution states (see the module docstring)."""

    def __init__(
        self,
        channels: Sequence[int],
        blocks: int = 1,
        expansion: int = 5,
        groups: int = 8,
        dropout: float = 0.0,
        init_std: float = 0.01,
    ):
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(
            nn.ModuleList(BranchBlock(c, expansion, groups, dropout) for _ in range(blocks))
            for c in channels
        )
        self.fuse = nn.ModuleList(
            nn.ModuleList(
                nn.Identity()
                if j == i
                else _down(channels[j], channels[i], i - j, groups)
                if j < i
                else _up(channels[j], channels[i], j - i, groups)
                for j in range(n)
            )
            for i in range(n)
        )
        self.post = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(), conv1x1(c, c), nn.GroupNorm(max(1, groups // 2), c, affine=False)
            )
            for c in channels
        )
        # Small weights, as in the MDEQ code. The GroupNorms rescale every branch, so the
        # untrained cell is not a contraction whatever the init: MDEQ relies on unrolled
        # pre-training (fit.pretrain_steps) before the first equilibrium solves.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=init_std)

    def forward(self, z: tuple[Tensor, ...], u: Tensor) -> tuple[Tensor, ...]:
        x = []
        for i, (blocks, zi) in enumerate(zip(self.branches, z)):
            for k, block in enumerate(blocks):
                zi = block(zi, u if i == 0 and k == 0 else None)
            x.append(zi)
        out = []
        for i, fuse in enumerate(self.fuse):
            y = x[i]
            for j, layer in enumerate(fuse):
                if j != i:
                    y = y + layer(x[j])
            out.append(self.post[i](y))
        return tuple(out)


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4) used by the classification head."""

    def __init__(self, cin: int, planes: int):
        super().__init__()
        cout = planes * 4
        self.body = nn.Sequential(
            conv1x1(cin, planes), nn.BatchNorm2d(planes), nn.ReLU(),
            conv3x3(planes, planes), nn.BatchNorm2d(planes), nn.ReLU(),
            conv1x1(planes, cout), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.skip = nn.Sequential(conv1x1(cin, cout), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class MDEQClassifier(nn.Module):
    """Stem -> MDEQ cell on ``len(channels)`` resolutions -> classification head.

    Head (as in the MDEQ code): a bottleneck per branch to ``head_channels[i] * 4``, strided
    3x3 convs merging each branch into the next lower resolution, a 1x1 conv to
    ``final_channels``, global average pooling and a linear layer.
    """

    def __init__(
        self,
        channels: Sequence[int] = (24, 24),
        head_channels: Sequence[int] = (8, 16),
        final_channels: int = 200,
        blocks: int = 1,
        expansion: int = 5,
        groups: int = 8,
        dropout: float = 0.0,
        stem_channels: int | None = None,
        num_classes: int = 10,
    ):
        super().__init__()
        channels, head_channels = list(channels), list(head_channels)
        if len(head_channels) != len(channels):
            raise ValueError(
                f"need one head channel count per branch: channels={channels}, head_channels={head_channels}"
            )
        stem = stem_channels or channels[0]
        self.channels = channels
        self.stem = nn.Sequential(
            conv3x3(3, stem), nn.BatchNorm2d(stem), nn.ReLU(),
            conv3x3(stem, stem), nn.BatchNorm2d(stem), nn.ReLU(),
        )  # fmt: skip
        self.inject_proj = nn.Identity() if stem == channels[0] else conv1x1(stem, channels[0])
        self.cell = MDEQCell(channels, blocks, expansion, groups, dropout)
        self.incre = nn.ModuleList(Bottleneck(c, h) for c, h in zip(channels, head_channels))
        self.merge = nn.ModuleList(
            nn.Sequential(
                conv3x3(head_channels[i] * 4, head_channels[i + 1] * 4, stride=2),
                nn.BatchNorm2d(head_channels[i + 1] * 4),
                nn.ReLU(),
            )
            for i in range(len(channels) - 1)
        )
        self.final = nn.Sequential(
            conv1x1(head_channels[-1] * 4, final_channels),
            nn.BatchNorm2d(final_channels),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(final_channels, num_classes)

    def inject(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        u = self.inject_proj(self.stem(x))
        b, _, h, w = u.shape
        z0 = tuple(u.new_zeros(b, c, h >> i, w >> i) for i, c in enumerate(self.channels))
        return u, z0

    def head(self, z: tuple[Tensor, ...]) -> Tensor:
        y = self.incre[0](z[0])
        for i, merge in enumerate(self.merge):
            y = self.incre[i + 1](z[i + 1]) + merge(y)
        y = self.final(y).mean(dim=(2, 3))
        return self.classifier(y)
