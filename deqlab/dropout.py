"""Variational dropout for DEQ cells (Gal & Ghahramani, 2016; as used by Bai et al., 2019).

A fixed point only exists if f is the same function at every iteration, so the dropout mask
is drawn once per batch and held through the whole solve and the backward pass. The mask is
drawn lazily on the first call after ``reset_dropout`` (or when the input's shape, device or
dtype changes), on the input's device and in its dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class VariationalDropout(nn.Module):
    """Dropout with a mask held fixed until ``reset()``.

    ``shared_dims`` are the input dimensions along which one mask value is shared (e.g.
    ``(2, 3)`` drops whole channels of an image). Identity in eval mode or when p == 0.
    """

    shared_dims: tuple[int, ...] = ()

    def __init__(self, p: float = 0.0, shared_dims: tuple[int, ...] | None = None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = p
        if shared_dims is not None:
            self.shared_dims = tuple(shared_dims)
        self.mask: Tensor | None = None

    def reset(self) -> None:
        """Forget the mask; the next call draws a new one."""
        self.mask = None

    def _mask_shape(self, x: Tensor) -> list[int]:
        shape = list(x.shape)
        for d in self.shared_dims:
            if d >= x.dim():
                raise ValueError(
                    f"{type(self).__name__} shares its mask over dim {d}, but the input has "
                    f"shape {tuple(x.shape)}"
                )
            shape[d] = 1
        return shape

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        shape = self._mask_shape(x)
        m = self.mask
        if m is None or list(m.shape) != shape or m.device != x.device or m.dtype != x.dtype:
            keep = 1.0 - self.p
            m = torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(keep) / keep
            self.mask = m
        return x * m

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"


class VariationalDropout1d(VariationalDropout):
    """Drops whole channels of (B, C, L) inputs."""

    shared_dims = (2,)


class VariationalDropout2d(VariationalDropout):
    """Drops whole channels of (B, C, H, W) inputs."""

    shared_dims = (2, 3)


class VariationalDropout3d(VariationalDropout):
    """Drops whole channels of (B, C, D, H, W) inputs."""

    shared_dims = (2, 3, 4)


class VariationalTokenDropout(VariationalDropout):
    """Drops whole tokens of (B, T, D) inputs (one mask value per token, shared over D)."""

    shared_dims = (2,)


def reset_dropout(module: nn.Module) -> None:
    """Reset every variational dropout mask in ``module`` (call once per batch)."""
    for m in module.modules():
        if isinstance(m, VariationalDropout):
            m.reset()
