"""The single-scale ResNet-cell DEQ of the implicit-layers tutorial (Kolter, Duvenaud &
Johnson, NeurIPS 2020 tutorial, chapter 4), split into inject / cell / head for DEQLitModule.

    u  = BN(conv3x3(x))                                   input injection, once per batch
    f(z; u) = GN(relu(z + GN(u + conv2(GN(relu(conv1(z)))))))
    y  = linear(flatten(avgpool8(BN(z*))))
"""

from __future__ import annotations

from typing import ClassVar

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

    # The tutorial's model: nn.Sequential(conv, BN, DEQFixedPoint(f, ...), BN, AvgPool2d,
    # Flatten, Linear), its cell's layers under the DEQ layer's `f`.
    REFERENCE: ClassVar[dict[str, str]] = {
        "0": "stem.0",
        "1": "stem.1",
        "2.f": "cell",
        "3": "classifier.0",
        "6": "classifier.3",
    }

    @classmethod
    def is_reference_state(cls, state: dict[str, Tensor]) -> bool:
        return any(k.startswith("2.f.") for k in state) and all(
            any(k.startswith(p + ".") for p in cls.REFERENCE) for k in state
        )

    def convert_reference_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The tutorial's ``nn.Sequential`` model's state dict as this network's."""
        out = {}
        for key, value in state.items():
            prefix = next((p for p in self.REFERENCE if key.startswith(p + ".")), None)
            if prefix is None:
                raise ValueError(f"{key} is not a tensor of the implicit-layers tutorial's model")
            out[self.REFERENCE[prefix] + key[len(prefix) :]] = value
        return out

    def inject(self, x: Tensor) -> tuple[Tensor, Tensor]:
        u = self.stem(x)
        return u, torch.zeros_like(u)

    def enable_learned_start(self) -> None:
        """``init=learned`` (the runner calls this before the optimizer is built): add the
        predictor of z0 from the injection, one 3x3 convolution, zero at first, so that the
        solve starts where init=zeros does until the prediction has learned."""
        w = self.cell.conv2.weight  # built beside it: its device and dtype
        self.start = nn.Conv2d(w.shape[0], w.shape[0], 3, padding=1, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.start.weight)
        nn.init.zeros_(self.start.bias)

    def predict_start(self, u: Tensor) -> Tensor:
        return self.start(u)

    def head(self, z: Tensor) -> Tensor:
        return self.classifier(z)
