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
dropout is variational: one mask per batch, held through the solve. The structure is the
reference code's (locuslab/deq at 1fb7059, MDEQ-Vision/lib/models/mdeq_core.py and mdeq.py):
which GroupNorms are affine is configurable as there (BLOCK_/FUSE_/POST_GN_AFFINE), the head's
bottleneck BatchNorms are not affine, its merge and final convolutions have biases, and with
more than two branches the stem is followed by a 1x1 conv + BN + ReLU injection (``stage0``).

Initialization (``init_std``, ``default_init``) follows the reference's ``init_weights``: every
convolution's weight and bias ~ N(0, init_std), BatchNorms at (1, 0), the classifier at
PyTorch's default, except the layers under ``default_init``, whose weights keep PyTorch's
default: the reference initializes after weight normalization, whose recomputation from g and v
discards the draws for the weight-normalized layers (the block convs and the post-fuse convs).
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

    def __init__(
        self, channels: int, expansion: int, groups: int, dropout: float, affine: bool = True
    ):
        super().__init__()
        inner = int(channels * expansion)
        self.conv1 = conv3x3(channels, inner)
        self.gn1 = nn.GroupNorm(groups, inner, affine=affine)
        self.conv2 = conv3x3(inner, channels)
        self.gn2 = nn.GroupNorm(groups, channels, affine=affine)
        self.gn3 = nn.GroupNorm(groups, channels, affine=affine)
        self.drop = VariationalDropout2d(dropout)

    def forward(self, z: Tensor, injection: Tensor | None = None) -> Tensor:
        out = self.drop(self.conv2(torch.relu(self.gn1(self.conv1(z)))))
        if injection is not None:
            out = out + injection
        return self.gn3(torch.relu(self.gn2(out) + z))


def _down(cin: int, cout: int, steps: int, groups: int, affine: bool) -> nn.Sequential:
    """``steps`` strided 3x3 convs (resolution / 2^steps); channels change at the last one."""
    layers: list[nn.Module] = []
    for k in range(steps):
        last = k == steps - 1
        layers += [
            conv3x3(cin, cout if last else cin, stride=2),
            nn.GroupNorm(groups, cout if last else cin, affine=affine),
        ]
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _up(cin: int, cout: int, steps: int, groups: int, affine: bool) -> nn.Sequential:
    return nn.Sequential(
        conv1x1(cin, cout),
        nn.GroupNorm(groups, cout, affine=affine),
        nn.Upsample(scale_factor=2**steps, mode="nearest"),
    )


class MDEQCell(nn.Module):
    """f(z; u) on a tuple of per-resolution states (see the module docstring)."""

    def __init__(
        self,
        channels: Sequence[int],
        blocks: int = 1,
        expansion: float = 5,
        groups: int = 8,
        dropout: float = 0.0,
        block_gn_affine: bool = True,
        fuse_gn_affine: bool = True,
        post_gn_affine: bool = True,
    ):
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(
            nn.ModuleList(
                BranchBlock(c, expansion, groups, dropout, block_gn_affine) for _ in range(blocks)
            )
            for c in channels
        )
        self.fuse = nn.ModuleList(
            nn.ModuleList(
                nn.Identity()
                if j == i
                else _down(channels[j], channels[i], i - j, groups, fuse_gn_affine)
                if j < i
                else _up(channels[j], channels[i], j - i, groups, fuse_gn_affine)
                for j in range(n)
            )
            for i in range(n)
        )
        self.post = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                conv1x1(c, c),
                nn.GroupNorm(max(1, groups // 2), c, affine=post_gn_affine),
            )
            for c in channels
        )

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
    """ResNet bottleneck (expansion 4) used by the classification head; its three
    BatchNorms have no affine parameters, as in the reference's head."""

    def __init__(self, cin: int, planes: int):
        super().__init__()
        cout = planes * 4
        self.body = nn.Sequential(
            conv1x1(cin, planes), nn.BatchNorm2d(planes, affine=False), nn.ReLU(),
            conv3x3(planes, planes), nn.BatchNorm2d(planes, affine=False), nn.ReLU(),
            conv1x1(planes, cout), nn.BatchNorm2d(cout, affine=False),
        )  # fmt: skip
        same = cin == cout  # the reference projects the residual only when widths differ
        self.skip = (
            nn.Identity() if same else nn.Sequential(conv1x1(cin, cout), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.skip(x))


class MDEQClassifier(nn.Module):
    """Stem -> MDEQ cell on ``len(channels)`` resolutions -> classification head.

    Head (as in the MDEQ code): a bottleneck per branch to ``head_channels[i] * 4``, strided
    3x3 convs (with bias) merging each branch into the next lower resolution, a 1x1 conv (with
    bias) to ``final_channels``, global average pooling and a linear layer. The stem is two
    3x3 convs at full resolution; with more than two branches a 1x1 conv + BN + ReLU
    (``stage0``) maps it to the injection, as the reference does. See the module docstring
    for ``init_std`` and ``default_init``.
    """

    def __init__(
        self,
        channels: Sequence[int] = (24, 24),
        head_channels: Sequence[int] = (8, 16),
        final_channels: int = 200,
        blocks: int = 1,
        expansion: float = 5,
        groups: int = 8,
        dropout: float = 0.0,
        num_classes: int = 10,
        block_gn_affine: bool = True,
        fuse_gn_affine: bool = True,
        post_gn_affine: bool = True,
        init_std: float = 0.01,
        default_init: Sequence[str] = (),
    ):
        super().__init__()
        channels, head_channels = list(channels), list(head_channels)
        if len(head_channels) != len(channels):
            raise ValueError(
                f"need one head channel count per branch: channels={channels}, head_channels={head_channels}"
            )
        c0 = channels[0]
        self.channels = channels
        self.stem = nn.Sequential(
            conv3x3(3, c0), nn.BatchNorm2d(c0), nn.ReLU(),
            conv3x3(c0, c0), nn.BatchNorm2d(c0), nn.ReLU(),
        )  # fmt: skip
        self.stage0 = (
            nn.Sequential(conv1x1(c0, c0), nn.BatchNorm2d(c0), nn.ReLU())
            if len(channels) > 2
            else nn.Identity()
        )
        self.cell = MDEQCell(
            channels,
            blocks,
            expansion,
            groups,
            dropout,
            block_gn_affine,
            fuse_gn_affine,
            post_gn_affine,
        )
        self.incre = nn.ModuleList(Bottleneck(c, h) for c, h in zip(channels, head_channels))
        self.merge = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(head_channels[i] * 4, head_channels[i + 1] * 4, 3, 2, 1, bias=True),
                nn.BatchNorm2d(head_channels[i + 1] * 4),
                nn.ReLU(),
            )
            for i in range(len(channels) - 1)
        )
        self.final = nn.Sequential(
            nn.Conv2d(head_channels[-1] * 4, final_channels, 1, bias=True),
            nn.BatchNorm2d(final_channels),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(final_channels, num_classes)
        self.init_weights(init_std, default_init)

    @staticmethod
    def is_reference_state(state: dict[str, Tensor]) -> bool:
        from .convert import is_locuslab_mdeq

        return is_locuslab_mdeq(state)

    def convert_reference_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A reference MDEQClsNet state dict as this network's (tasks/cifar/convert.py): what
        ``init_from`` loads a released reference model through."""
        from .convert import from_locuslab_mdeq

        return from_locuslab_mdeq(state, self)

    @torch.no_grad()
    def init_weights(self, std: float, default_init: Sequence[str] = ()) -> None:
        """Conv weights and biases ~ N(0, std), except the weights of convs under the module
        names in ``default_init``, which keep PyTorch's default (module docstring)."""
        kept = tuple(default_init)
        for name, m in self.named_modules():
            if not isinstance(m, nn.Conv2d):
                continue
            if not any(name == k or name.startswith(k + ".") for k in kept):
                m.weight.normal_(0.0, std)
            if m.bias is not None:
                m.bias.normal_(0.0, std)

    def inject(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        u = self.stage0(self.stem(x))
        b, _, h, w = u.shape
        z0 = tuple(u.new_zeros(b, c, h >> i, w >> i) for i, c in enumerate(self.channels))
        return u, z0

    def enable_learned_start(self) -> None:
        """``init=learned`` (the runner calls this before the optimizer is built): one 3x3
        convolution per branch predicts its state from the injection, strided down to the
        branch's resolution, zero at first so that the first solves start where init=zeros
        does."""
        c0, w = self.channels[0], self.classifier.weight  # built beside it: device, dtype
        self.start = nn.ModuleList(
            nn.Conv2d(c0, c, 3, stride=1 << i, padding=1, device=w.device, dtype=w.dtype)
            for i, c in enumerate(self.channels)
        )
        for conv in self.start:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def predict_start(self, u: Tensor) -> tuple[Tensor, ...]:
        return tuple(conv(u) for conv in self.start)

    def head(self, z: tuple[Tensor, ...]) -> Tensor:
        y = self.incre[0](z[0])
        for i, merge in enumerate(self.merge):
            y = self.incre[i + 1](z[i + 1]) + merge(y)
        y = self.final(y).mean(dim=(2, 3))
        return self.classifier(y)
